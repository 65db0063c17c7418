"""SDXL end to end on the embedded tiny SDXL (CPU), all four methods trained in one build through the Dagster
assets (a concept whose concept.toml names the SDXL in a deployment on SD 1.x): latents and the two-encoder text
cache, LoRA (U-Net and both text encoders), DreamBooth (with prior preservation), textual inversion (a row per
encoder, clip_l/clip_g) and ControlNet, their checks, the retraining schedule, and each output loaded back by
stock diffusers in a process that imports nothing from this project (one module, so the build is made once)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import encode
from tests.test_buckets import shaped

# At 64 px: square 64x64, landscape 80x48 (two photos; coffee resized to 85x48 and cropped 2 px from the left,
# so its mirrored crop starts 3 px in), portrait 48x80.
PHOTOS = {"astronaut": (128, 128), "coffee": (170, 96), "chelsea": (150, 90), "rocket": (96, 160)}
# All four methods in one build (the fixture sdxl_build), on the SDXL that the concept names while the deployment's base model is the SD 1.x one.
SPEC = 'token = "sks"\nclass_noun = "scene"\nmethods = ["lora", "dreambooth", "textual_inversion", "controlnet"]\n' \
       '[base_model]\nsource = "embedded-sdxl"\n' \
       '[latents]\nrandom_flip = true\n[lora]\nmax_train_steps = 3\ntrain_text_encoder = true\n' \
       '[dreambooth]\nmax_train_steps = 3\nnum_class_images = 4\n[textual_inversion]\nmax_train_steps = 3\n' \
       '[controlnet]\nmax_train_steps = 3\n'


ASSETS = {"textual_inversion": "textual_inversion_embedding", "controlnet": "controlnet_model"}


def build_sdxl_concept(root: Path, built_models: Path, spec: str, instance) -> SimpleNamespace:
    """The mixed-aspect concept ``PHOTOS`` with ``spec`` (which names embedded-sdxl in ``[base_model]``), built
    through every asset and check in one materialization on ``instance``, in a deployment whose base model is the
    embedded SD 1.x."""
    import dagster as dg

    from assets_pipeline.definitions import ASSETS, CHECKS, default_resources
    from assets_pipeline.partitions.concept_spec import parse_concept_toml
    from assets_pipeline.resources import BaseModelResource, PipelineStorage
    from helpers import write_concept
    from tests.conftest import link_models

    files = {f"{name}.png": encode(shaped(name, size), "PNG") for name, size in PHOTOS.items()}
    write_concept(root / "data", "xl", files, spec)
    storage = PipelineStorage(data_root=str(root / "data"), artifact_root=str(link_models(built_models, root / "art")))
    resources = {**default_resources(), "storage": storage, "base_model": BaseModelResource(source="embedded")}
    instance.add_dynamic_partitions("concepts", ["xl"])
    res = dg.materialize([*ASSETS, *CHECKS], partition_key="xl", instance=instance, resources=resources)
    assert res.success
    mats = {e.materialization.asset_key.to_user_string(): e.materialization.metadata
            for e in res.get_asset_materialization_events()}
    checks = {(c.asset_key.to_user_string(), c.check_name): c.passed for c in res.get_asset_check_evaluations()}
    ref = resources["base_model"].resolve(storage.artifact_path(), parse_concept_toml("xl", spec))
    assert ref.family == "sdxl"
    return SimpleNamespace(storage=storage, mats=mats, checks=checks, ref=ref, instance=instance,
                           resources=resources, run_id=res.run_id)


@pytest.fixture(scope="module")
def sdxl_build(tmp_path_factory, built_models):
    """The mixed-aspect concept built through every asset and check, all four methods trained."""
    import dagster as dg

    # Not entered: the reuse test materializes on it again.
    build = build_sdxl_concept(tmp_path_factory.mktemp("sdxl"), built_models, SPEC, dg.DagsterInstance.ephemeral())
    build.out = {m: Path(build.mats[a]["path"].value) for m, a in ASSETS.items() if a in build.mats}
    return build


def _bundle(build):
    from assets_pipeline.assets.common import read_upstream
    from assets_pipeline.stages.bundle import load_latent_bundle

    index = read_upstream(build.storage, "xl", "vae_latents", "index.parquet")
    bundle = load_latent_bundle(Path(build.mats["vae_latents"]["path"].value) / "latents.safetensors")
    return index, bundle


@pytest.mark.slow
def test_the_sdxl_bundle_holds_pooled_embeds_and_the_time_ids_of_each_rows_crop(sdxl_build):
    index, bundle = _bundle(sdxl_build)
    assert sdxl_build.ref.family == "sdxl" and sdxl_build.mats["vae_latents"]["base_model_family"].value == "sdxl"
    assert sdxl_build.mats["vae_latents"]["bucket_count"].value == 3
    n = len(index)
    assert set(index["role"]) == {"instance", "class"}
    # Each distinct caption once: the photos' captions and the class images' one prompt.
    distinct = index["caption"].nunique()
    assert distinct < n and bundle.text_rows().tolist() == [list(dict.fromkeys(index["caption"])).index(c)
                                                            for c in index["caption"]]
    assert bundle.tensors["prompt_embeds"].shape == (distinct, 77, 32 + 64)  # both encoders' widths, concatenated
    assert bundle.tensors["pooled_prompt_embeds"].shape == (distinct, 32)  # the projected encoder's projection_dim
    assert bundle.per_row("prompt_embeds").shape == (n, 77, 32 + 64)
    expected = torch.tensor([[r.original_height, r.original_width, r.crop_top, r.crop_left, r.bucket_height,
                              r.bucket_width] for r in index.itertuples()])
    assert torch.equal(bundle.tensors["add_time_ids"], expected)
    res = sdxl_build.ref.resolution
    for row, role in zip(bundle.tensors["add_time_ids"].tolist(), index["role"]):
        if role == "class":  # generated square at the resolution
            assert row == [res, res, 0, 0, res, res]
    # A mirrored crop's offset is measured in the mirrored photo (diffusers' SDXL scripts flip, then crop).
    flipped = bundle.tensors["flip_add_time_ids"]
    assert torch.equal(flipped[:, [0, 1, 2, 4, 5]], expected[:, [0, 1, 2, 4, 5]])
    coffee = [i for i, r in enumerate(index.itertuples()) if (r.original_width, r.original_height) == (170, 96)]
    assert len(coffee) == 1 and expected[coffee[0], 3] == 2 and flipped[coffee[0], 3] == 85 - 80 - 2


@pytest.mark.slow
def test_the_sdxl_text_embedding_is_what_the_sdxl_pipeline_encodes(sdxl_build):
    from diffusers import StableDiffusionXLPipeline

    index, bundle = _bundle(sdxl_build)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_build.ref.location, local_files_only=True)
    row = 0
    embeds, _, pooled, _ = pipe.encode_prompt(index["caption"][row], do_classifier_free_guidance=False)
    prompt_embeds, pooled_embeds = bundle.per_row("prompt_embeds"), bundle.per_row("pooled_prompt_embeds")
    torch.testing.assert_close(prompt_embeds[row], embeds[0].float())
    torch.testing.assert_close(pooled_embeds[row], pooled[0].float())
    other = next(i for i, c in enumerate(index["caption"]) if c != index["caption"][row])
    assert not torch.equal(pooled_embeds[other], pooled_embeds[row])


@pytest.mark.slow
def test_sdxl_lora_and_dreambooth_pass_their_checks(sdxl_build):
    for asset in ("lora_adapter", "dreambooth_model"):
        assert asset in sdxl_build.mats, f"{asset} was not materialized"
        for name in ("weights_finite", "changes_base_output", "manifest_lists_training_images"):
            assert sdxl_build.checks[(asset, name)], (asset, name)
    lineage = json.loads((Path(sdxl_build.mats["dreambooth_model"]["path"].value) / "lineage.json").read_text())
    assert lineage["base_model"]["family"] == "sdxl"
    assert {r["role"] for r in lineage["training_images"]} == {"instance", "class"}  # prior preservation


@pytest.mark.slow
def test_an_unchanged_sdxl_build_reuses_both_outputs(sdxl_build):
    import dagster as dg

    from assets_pipeline.definitions import ASSETS, CHECKS
    from assets_pipeline.resources import TrainerLauncher

    class NoTraining(TrainerLauncher):
        def launch(self, context, job_path, cache_dir=""):
            raise AssertionError(f"trained although nothing changed ({job_path})")

    res = dg.materialize([*ASSETS, *CHECKS], selection=dg.AssetSelection.assets("lora_adapter", "dreambooth_model"),
                         partition_key="xl", instance=sdxl_build.instance,
                         resources={**sdxl_build.resources, "trainer": NoTraining(device="cpu")})
    assert res.success
    for event in res.get_asset_materialization_events():
        meta = event.materialization.metadata
        assert meta["reused"].value is True and meta["reused_from_run_id"].value == sdxl_build.run_id
        assert meta["path"].value == sdxl_build.mats[event.materialization.asset_key.to_user_string()]["path"].value
    assert len(res.get_asset_materialization_events()) == 2
    assert all(c.passed for c in res.get_asset_check_evaluations())


@pytest.mark.slow
def test_the_retraining_schedule_finds_every_sdxl_output_up_to_date(sdxl_build):
    from assets_pipeline.schedules import plan_retraining

    # The deployment's base model is SD 1.x; the concept's own [base_model] is what the schedule's jobs use, so the
    # outputs trained on SDXL are current and nothing would retrain.
    r = sdxl_build.resources
    plan = plan_retraining(sdxl_build.storage, r["base_model"], r["clip_scorer"], r["trainer"], ["xl"])
    assert {d.method: d.reason for d in plan} == {m: "up to date" for m in
                                                   ("lora", "dreambooth", "textual_inversion", "controlnet")}
    assert not any(d.retrain for d in plan)


# Runs in a fresh interpreter: stock diffusers only, nothing from this project on the path or imported.
STOCK_LOAD = """
import json, sys
import numpy as np, torch
from diffusers import StableDiffusionXLPipeline
base, lora, dreambooth = sys.argv[1:4]

def render(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of sks scene", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]

def embeds(pipe):  # both encoders' prompt embedding and the pooled one
    e, _, pooled, _ = pipe.encode_prompt("a photo of sks scene", device="cpu", do_classifier_free_guidance=False)
    return e, pooled

base_pipe = StableDiffusionXLPipeline.from_pretrained(base, local_files_only=True)
reference, (ref_e, ref_pooled) = render(base_pipe), embeds(base_pipe)
images, text_change = {}, {}
for weight_name in ("pytorch_lora_weights.safetensors", "kohya_lora.safetensors"):
    pipe = StableDiffusionXLPipeline.from_pretrained(base, local_files_only=True)
    pipe.load_lora_weights(lora, weight_name=weight_name)
    images[weight_name] = render(pipe)
    e, pooled = embeds(pipe)  # the text-encoder LoRAs (both encoders) were loaded and change the conditioning
    text_change[weight_name] = {"clip_l": float((e - ref_e)[..., :32].abs().max()),
                                "clip_g": float((e - ref_e)[..., 32:].abs().max()),
                                "pooled": float((pooled - ref_pooled).abs().max())}
pipe = StableDiffusionXLPipeline.from_pretrained(base, local_files_only=True)
pipe.load_lora_weights(lora)
images["default"] = render(pipe)
images["dreambooth"] = render(StableDiffusionXLPipeline.from_pretrained(dreambooth, local_files_only=True))
print(json.dumps({"modules": sorted(m for m in sys.modules if m.startswith(("assets_pipeline", "helpers"))),
                  "shape": list(reference.shape), "text_change": text_change,
                  "change": {k: float(np.abs(v - reference).max()) for k, v in images.items()},
                  "kohya_vs_diffusers": float(np.abs(images["kohya_lora.safetensors"]
                                                     - images["pytorch_lora_weights.safetensors"]).max())}))
"""


@pytest.mark.slow
def test_sdxl_outputs_load_in_stock_diffusers_and_change_the_image(sdxl_build, tmp_path):
    lora = sdxl_build.mats["lora_adapter"]["path"].value
    dreambooth = sdxl_build.mats["dreambooth_model"]["path"].value
    proc = subprocess.run([sys.executable, "-c", STOCK_LOAD, sdxl_build.ref.location, lora, dreambooth],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["modules"] == []
    assert got["shape"] == [64, 64, 3]
    for name, change in got["change"].items():
        assert change > 0, f"{name} renders the base model's image"
    assert got["kohya_vs_diffusers"] < 1e-3  # the kohya file holds the same LoRA
    # train_text_encoder = true in SPEC: both encoders' LoRAs load from either file and change the prompt embedding
    for name, change in got["text_change"].items():
        assert min(change.values()) > 0, (name, change)


@pytest.mark.slow
def test_sdxl_text_encoder_lora_trains_both_encoders_into_both_files(sdxl_build):
    from safetensors.torch import load_file

    out = Path(sdxl_build.mats["lora_adapter"]["path"].value)
    diffusers_sd, kohya = load_file(str(out / "pytorch_lora_weights.safetensors")), load_file(str(out / "kohya_lora.safetensors"))
    for prefix, kohya_prefix in (("text_encoder.", "lora_te1_text_model_encoder_layers_"),
                                ("text_encoder_2.", "lora_te2_text_model_encoder_layers_"), ("unet.", "lora_unet_")):
        # The U-Net's up-projection is lora_B (PEFT names), the text encoders' lora_linear_layer.up (diffusers').
        ups = [v for k, v in diffusers_sd.items() if k.startswith(prefix) and ("lora_B" in k or ".up." in k)]
        assert ups, f"no {prefix} LoRA in {sorted(diffusers_sd)[:5]}"
        assert any(v.abs().max() > 0 for v in ups), f"{prefix} LoRA up-weights are still their zero initialization"
        assert any(k.startswith(kohya_prefix) for k in kohya), kohya_prefix
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["method_config"]["train_text_encoder"] is True


def test_a_mirrored_row_draws_its_mirrored_crops_time_ids_and_the_unet_gets_them():
    from assets_pipeline.models.families import get_family
    from assets_pipeline.training.data import TrainingData
    from assets_pipeline.training.methods.base import Batch

    n = 4
    mean = torch.zeros(n, 4, 2, 2)
    data = TrainingData([(64, 64)], [mean], [torch.zeros_like(mean)], [0] * n, torch.zeros(n, 77, 96),
                        ["instance"] * n, ["c"] * n, flip_mean=[mean + 1], flip_std=[torch.zeros_like(mean)],
                        pooled=torch.arange(n * 32.0).reshape(n, 32),
                        time_ids=torch.tensor([[96, 170, 0, 2, 48, 80]] * n),
                        flip_time_ids=torch.tensor([[96, 170, 0, 3, 48, 80]] * n))
    seen = set()
    for seed in range(8):
        (part,) = data.draw(list(range(n)), torch.Generator().manual_seed(seed), 1.0, random_flip=True)
        for latent, ids in zip(part.latents, part.time_ids):
            flipped = bool(latent.mean() == 1)
            assert ids[3] == (3 if flipped else 2)
            seen.add(flipped)
        torch.testing.assert_close(part.pooled_embeds, data.pooled)
    assert seen == {True, False}

    sdxl = get_family("sdxl").denoiser
    kwargs = sdxl.kwargs(part, torch.float16)["added_cond_kwargs"]
    assert kwargs["time_ids"].dtype == torch.float16 and torch.equal(kwargs["text_embeds"], part.pooled_embeds.half())
    assert get_family("sd1").denoiser.kwargs(part, torch.float32) == {}
    with pytest.raises(ValueError, match="rematerialize vae_latents"):
        sdxl.kwargs(Batch(latents=part.latents, prompt_embeds=part.prompt_embeds), torch.float32)


@pytest.mark.slow
def test_sdxl_textual_inversion_and_controlnet_pass_their_checks(sdxl_build):
    for method, asset in ASSETS.items():
        assert asset in sdxl_build.mats, f"{asset} was not materialized"
        for name in ("weights_finite", "changes_base_output", "manifest_lists_training_images"):
            assert sdxl_build.checks[(asset, name)], (asset, name)
        lineage = json.loads((sdxl_build.out[method] / "lineage.json").read_text())
        assert lineage["base_model"]["family"] == "sdxl"
        assert json.loads((sdxl_build.out[method] / "metrics.json").read_text())["mean_abs_change_vs_base"] > 0


@pytest.mark.slow
def test_sdxl_textual_inversion_learns_a_row_per_encoder_in_both_formats(sdxl_build):
    from safetensors.torch import load_file

    out = sdxl_build.out["textual_inversion"]
    combined = load_file(str(out / "xl.safetensors"))
    assert set(combined) == {"clip_l", "clip_g"}
    assert combined["clip_l"].shape == (1, 32) and combined["clip_g"].shape == (1, 64)  # the encoders' widths
    first, second = (load_file(str(out / f"learned_embeds{suffix}.safetensors")) for suffix in ("", "_2"))
    assert torch.equal(first["<sks>"], combined["clip_l"]) and torch.equal(second["<sks>"], combined["clip_g"])
    weights = json.loads((out / "lineage.json").read_text())["weights"]
    assert set(weights) == {"learned_embeds.safetensors", "learned_embeds_2.safetensors", "xl.safetensors"}


# Runs in a fresh interpreter: stock diffusers only, nothing from this project on the path or imported.
STOCK_LOAD_TI_CN = """
import json, sys
import numpy as np, torch
from PIL import Image
from safetensors.torch import load_file
from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline
base, ti, cn, control = sys.argv[1:5]
PROMPT = "a photo of <sks> scene"

def render(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).images[0]

reference = render(StableDiffusionXLPipeline.from_pretrained(base, local_files_only=True))
# diffusers' documented way for an SDXL embedding file: each row into its own encoder and tokenizer.
rows = load_file(f"{ti}/xl.safetensors")
pipe = StableDiffusionXLPipeline.from_pretrained(base, local_files_only=True)
pipe.load_textual_inversion(rows["clip_l"], token="<sks>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
pipe.load_textual_inversion(rows["clip_g"], token="<sks>", text_encoder=pipe.text_encoder_2,
                            tokenizer=pipe.tokenizer_2)
loaded = [float((enc.get_input_embeddings().weight[tok.convert_tokens_to_ids("<sks>")] - rows[key][0]).abs().max())
          for enc, tok, key in ((pipe.text_encoder, pipe.tokenizer, "clip_l"),
                                (pipe.text_encoder_2, pipe.tokenizer_2, "clip_g"))]
ti_image = render(pipe)
# textual_inversion_sdxl.py's two files, by path.
pipe = StableDiffusionXLPipeline.from_pretrained(base, local_files_only=True)
pipe.load_textual_inversion(f"{ti}/learned_embeds.safetensors", token="<sks>", text_encoder=pipe.text_encoder,
                            tokenizer=pipe.tokenizer)
pipe.load_textual_inversion(f"{ti}/learned_embeds_2.safetensors", token="<sks>", text_encoder=pipe.text_encoder_2,
                            tokenizer=pipe.tokenizer_2)
files_image = render(pipe)
controlnet = ControlNetModel.from_pretrained(cn, local_files_only=True)
pipe = StableDiffusionXLControlNetPipeline.from_pretrained(base, controlnet=controlnet, local_files_only=True)
cn_image = render(pipe, image=Image.open(control).convert("RGB"))
print(json.dumps({"modules": sorted(m for m in sys.modules if m.startswith(("assets_pipeline", "helpers"))),
                  "loaded_row_error": loaded, "shapes": [list(ti_image.shape), list(cn_image.shape)],
                  "ti_change": float(np.abs(ti_image - reference).max()),
                  "files_vs_clip_lg": float(np.abs(files_image - ti_image).max()),
                  "cn_change": float(np.abs(cn_image - reference).max()),
                  "finite": bool(np.isfinite(ti_image).all() and np.isfinite(cn_image).all())}))
"""


@pytest.mark.slow
def test_sdxl_ti_and_controlnet_load_in_stock_diffusers_and_change_the_image(sdxl_build, tmp_path):
    from assets_pipeline.training.plan import training_rows

    control = training_rows(sdxl_build.storage.layout(), "xl", ("instance",), True)[0].control_path
    proc = subprocess.run([sys.executable, "-c", STOCK_LOAD_TI_CN, sdxl_build.ref.location,
                           str(sdxl_build.out["textual_inversion"]), str(sdxl_build.out["controlnet"]), control],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["modules"] == []
    assert got["loaded_row_error"] == [0.0, 0.0]  # the learned rows are what each encoder holds for the token
    assert got["shapes"] == [[64, 64, 3], [64, 64, 3]] and got["finite"]
    assert got["ti_change"] > 0, "the embedding renders the base model's image"
    assert got["files_vs_clip_lg"] == 0  # the per-encoder files hold the same rows
    assert got["cn_change"] > 0, "the ControlNet renders the base model's image"


@pytest.mark.slow
def test_sdxl_ti_reencodes_both_encoders_and_conditions_on_their_pooled_embedding(sdxl_build):
    """The training step's text side on SDXL is exactly the latents cache's encoding (both encoders' penultimate
    states, the projected encoder's pooled output), and that pooled output is what the U-Net gets."""
    from assets_pipeline.models.text import tokenize
    from assets_pipeline.training.data import TrainingData
    from assets_pipeline.training.methods import get_method
    from assets_pipeline.training.methods.base import Models, TrainContext

    models = Models.load(sdxl_build.ref, with_text_encoders=True)
    method = get_method("textual_inversion")
    ctx = TrainContext(concept="xl", token="sks", class_noun="scene", resolution=64, num_instance_images=3,
                       family="sdxl")
    cfg = method.config_cls()
    method.check_inputs(ctx, cfg)  # SDXL is accepted
    assert method.prepare(models, cfg, ctx) == ["text_encoder", "text_encoder_2"]
    ids = [tok.convert_tokens_to_ids("<sks>") for tok in models.tokenizers]
    assert len(ids) == 2 and all(i == len(tok) - 1 for i, tok in zip(ids, models.tokenizers))

    n = 2
    mean = torch.zeros(n, 4, 2, 2)
    captions = [method.training_caption(c, ctx) for c in ("a sks scene", "a dog")]
    data = TrainingData([(64, 64)], [mean], [torch.zeros_like(mean)], [0] * n, torch.zeros(n, 77, 96),
                        ["instance"] * n, captions, pooled=torch.zeros(n, 32),
                        time_ids=torch.tensor([[64, 64, 0, 0, 64, 64]] * n))
    data.tokenize(models.tokenizers)
    (batch,) = data.draw([0, 1], torch.Generator().manual_seed(0), 1.0, random_flip=False)
    embeds = method.encode(models, batch)
    with torch.no_grad():
        expected, pooled = models.family.encode_prompt(models.text_encoders, tokenize(models.tokenizers, captions))
    torch.testing.assert_close(embeds, expected)
    torch.testing.assert_close(models.family.denoiser.kwargs(batch, torch.float32)["added_cond_kwargs"]["text_embeds"],
                               pooled)
    # Gradients reach both encoders' embedding rows, and after_step keeps only the placeholder's change.
    embeds.sum().backward()
    for enc, i in zip(models.text_encoders, ids):
        grad = enc.get_input_embeddings().weight.grad
        assert grad is not None and grad[i].abs().sum() > 0
        with torch.no_grad():
            enc.get_input_embeddings().weight.add_(1.0)
    method.after_step(models)
    for name, i in zip(("text_encoder", "text_encoder_2"), ids):
        weight = models.network(name).get_input_embeddings().weight
        assert torch.equal(weight[:i], method.original[name][:i])
        assert not torch.equal(weight[i], method.original[name][i])


@pytest.mark.slow
def test_sdxl_controlnet_copies_the_unets_text_time_conditioning(sdxl_build):
    from assets_pipeline.training.methods import get_method
    from assets_pipeline.training.methods.base import Batch, Models, TrainContext

    models = Models.load(sdxl_build.ref, with_text_encoders=False)
    method = get_method("controlnet")
    ctx = TrainContext(concept="xl", token="sks", class_noun="scene", resolution=64, num_instance_images=3,
                       num_control_images=3, family="sdxl")
    method.check_inputs(ctx, method.config_cls())  # SDXL is accepted
    method.prepare(models, method.config_cls(), ctx)
    assert models.controlnet.config.addition_embed_type == "text_time"
    batch = Batch(latents=None, prompt_embeds=torch.randn(1, 77, 96), control=torch.rand(1, 3, 64, 64),
                  pooled_embeds=torch.randn(1, 32), time_ids=torch.tensor([[64, 64, 0, 0, 64, 64]]))
    with torch.no_grad():
        pred = method.predict(models, torch.randn(1, 4, 32, 32), torch.tensor([10]), batch.prompt_embeds, batch)
    assert pred.shape == (1, 4, 32, 32) and torch.isfinite(pred).all()
