"""SDXL end to end on the embedded tiny SDXL (CPU): latents and the two-encoder text cache, LoRA and DreamBooth
(with prior preservation) trained through the Dagster assets, their checks, and each output loaded back by stock
diffusers in a process that imports nothing from this project. Textual inversion and ControlNet on SDXL:
test_sdxl_ti_controlnet.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import encode
from tests.test_buckets import shaped

# At 64 px: square 64x64, landscape 80x48 (two photos; coffee resized to 85x48 and cropped 2 px from the left,
# so its mirrored crop starts 3 px in), portrait 48x80.
PHOTOS = {"astronaut": (128, 128), "coffee": (170, 96), "chelsea": (150, 90), "rocket": (96, 160)}
SPEC = 'token = "sks"\nclass_noun = "scene"\nmethods = ["lora", "dreambooth"]\n[latents]\nrandom_flip = true\n' \
       '[lora]\nmax_train_steps = 3\n[dreambooth]\nmax_train_steps = 3\nnum_class_images = 4\n'


def build_sdxl_concept(root: Path, built_models: Path, spec: str, instance) -> SimpleNamespace:
    """The mixed-aspect concept ``PHOTOS`` with ``spec``, built on embedded-sdxl through every asset and check in
    one materialization on ``instance`` (also for test_sdxl_ti_controlnet.py)."""
    import dagster as dg

    from assets_pipeline.definitions import ASSETS, CHECKS, default_resources
    from assets_pipeline.resources import BaseModelResource, PipelineStorage
    from helpers import write_concept
    from tests.conftest import link_models

    files = {f"{name}.png": encode(shaped(name, size), "PNG") for name, size in PHOTOS.items()}
    write_concept(root / "data", "xl", files, spec)
    storage = PipelineStorage(data_root=str(root / "data"), artifact_root=str(link_models(built_models, root / "art")))
    resources = {**default_resources(), "storage": storage, "base_model": BaseModelResource(source="embedded-sdxl")}
    instance.add_dynamic_partitions("concepts", ["xl"])
    res = dg.materialize([*ASSETS, *CHECKS], partition_key="xl", instance=instance, resources=resources)
    assert res.success
    mats = {e.materialization.asset_key.to_user_string(): e.materialization.metadata
            for e in res.get_asset_materialization_events()}
    checks = {(c.asset_key.to_user_string(), c.check_name): c.passed for c in res.get_asset_check_evaluations()}
    ref = BaseModelResource(source="embedded-sdxl").resolve(storage.artifact_path())
    return SimpleNamespace(storage=storage, mats=mats, checks=checks, ref=ref, instance=instance,
                           resources=resources, run_id=res.run_id)


@pytest.fixture(scope="module")
def sdxl_build(tmp_path_factory, built_models):
    """A mixed-aspect concept built on embedded-sdxl through every asset, with LoRA and DreamBooth outputs."""
    import dagster as dg

    # Not entered: the reuse test materializes on it again.
    return build_sdxl_concept(tmp_path_factory.mktemp("sdxl"), built_models, SPEC, dg.DagsterInstance.ephemeral())


def _bundle(build):
    from assets_pipeline.assets.common import read_upstream
    from assets_pipeline.stages.latents import load_latent_bundle

    index = read_upstream(build.storage, "xl", "vae_latents", "index.parquet")
    bundle = load_latent_bundle(Path(build.mats["vae_latents"]["path"].value) / "latents.safetensors")
    return index, bundle


def test_the_sdxl_bundle_holds_pooled_embeds_and_the_time_ids_of_each_rows_crop(sdxl_build):
    index, bundle = _bundle(sdxl_build)
    assert sdxl_build.ref.family == "sdxl" and sdxl_build.mats["vae_latents"]["base_model_family"].value == "sdxl"
    assert sdxl_build.mats["vae_latents"]["bucket_count"].value == 3
    n = len(index)
    assert set(index["role"]) == {"instance", "class"}
    assert bundle.tensors["prompt_embeds"].shape == (n, 77, 32 + 64)  # both encoders' widths, concatenated
    assert bundle.tensors["pooled_prompt_embeds"].shape == (n, 32)  # the projected encoder's projection_dim
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


def test_the_sdxl_text_embedding_is_what_the_sdxl_pipeline_encodes(sdxl_build):
    from diffusers import StableDiffusionXLPipeline

    index, bundle = _bundle(sdxl_build)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_build.ref.location, local_files_only=True)
    row = 0
    embeds, _, pooled, _ = pipe.encode_prompt(index["caption"][row], do_classifier_free_guidance=False)
    torch.testing.assert_close(bundle.tensors["prompt_embeds"][row], embeds[0].float())
    torch.testing.assert_close(bundle.tensors["pooled_prompt_embeds"][row], pooled[0].float())
    other = next(i for i, c in enumerate(index["caption"]) if c != index["caption"][row])
    assert not torch.equal(bundle.tensors["pooled_prompt_embeds"][other], bundle.tensors["pooled_prompt_embeds"][row])


def test_sdxl_lora_and_dreambooth_pass_their_checks(sdxl_build):
    for asset in ("lora_adapter", "dreambooth_model"):
        assert asset in sdxl_build.mats, f"{asset} was not materialized"
        for name in ("weights_finite", "changes_base_output", "manifest_lists_training_images"):
            assert sdxl_build.checks[(asset, name)], (asset, name)
    lineage = json.loads((Path(sdxl_build.mats["dreambooth_model"]["path"].value) / "lineage.json").read_text())
    assert lineage["base_model"]["family"] == "sdxl"
    assert {r["role"] for r in lineage["training_images"]} == {"instance", "class"}  # prior preservation


def test_an_unchanged_sdxl_build_reuses_both_outputs(sdxl_build):
    import dagster as dg

    from assets_pipeline.definitions import ASSETS, CHECKS
    from assets_pipeline.resources import TrainerLauncher

    class NoTraining(TrainerLauncher):
        def launch(self, context, job_path):
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

reference = render(StableDiffusionXLPipeline.from_pretrained(base, local_files_only=True))
images = {}
for weight_name in ("pytorch_lora_weights.safetensors", "kohya_lora.safetensors"):
    pipe = StableDiffusionXLPipeline.from_pretrained(base, local_files_only=True)
    pipe.load_lora_weights(lora, weight_name=weight_name)
    images[weight_name] = render(pipe)
pipe = StableDiffusionXLPipeline.from_pretrained(base, local_files_only=True)
pipe.load_lora_weights(lora)
images["default"] = render(pipe)
images["dreambooth"] = render(StableDiffusionXLPipeline.from_pretrained(dreambooth, local_files_only=True))
print(json.dumps({"modules": sorted(m for m in sys.modules if m.startswith(("assets_pipeline", "helpers"))),
                  "shape": list(reference.shape),
                  "change": {k: float(np.abs(v - reference).max()) for k, v in images.items()},
                  "kohya_vs_diffusers": float(np.abs(images["kohya_lora.safetensors"]
                                                     - images["pytorch_lora_weights.safetensors"]).max())}))
"""


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


def test_textual_inversion_and_controlnet_accept_sdxl_jobs(sdxl_build):
    from assets_pipeline.assets.common import spec_from_snapshot
    from assets_pipeline.assets.models import build_train_job
    from assets_pipeline.resources import ClipScorerResource, TrainerLauncher
    from assets_pipeline.training.loop import train_context
    from assets_pipeline.training.methods import get_method

    # The jobs the model assets would launch for this concept pass the check the asset runs first: an SDXL base
    # model is no reason to refuse (both train in test_sdxl_ti_controlnet.py).
    for method in ("textual_inversion", "controlnet"):
        m = get_method(method)
        job = build_train_job(sdxl_build.storage, sdxl_build.ref, spec_from_snapshot(sdxl_build.storage, "xl"),
                              method, run_id="sdxl", input_versions={}, trainer=TrainerLauncher(device="cpu"),
                              clip_scorer=ClipScorerResource())
        ctx = train_context(job)
        assert ctx.family == "sdxl" and ctx.num_instance_images >= 3
        if method == "controlnet":
            assert ctx.num_control_images == ctx.num_instance_images
        m.check_inputs(ctx, m.config_cls(**job.config))


def test_sdxl_lora_refuses_text_encoder_training_naming_the_setting():
    from assets_pipeline.training.methods import get_method
    from assets_pipeline.training.methods.base import TrainContext, TrainingInputError

    m = get_method("lora")
    ctx = TrainContext(concept="xl", token="sks", class_noun="scene", resolution=64, num_instance_images=5,
                       family="sdxl")
    with pytest.raises(TrainingInputError, match="train_text_encoder = true is not yet supported for SDXL"):
        m.check_inputs(ctx, m.config_cls(train_text_encoder=True))
    m.check_inputs(ctx, m.config_cls())


def test_a_mirrored_row_draws_its_mirrored_crops_time_ids_and_the_unet_gets_them():
    from assets_pipeline.families import get_family
    from assets_pipeline.training.data import TrainingData
    from assets_pipeline.training.methods.base import Batch, Models, unet_kwargs

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

    sdxl = Models(unet=None, noise_scheduler=None, family=get_family("sdxl"))
    kwargs = unet_kwargs(sdxl, part, torch.float16)["added_cond_kwargs"]
    assert kwargs["time_ids"].dtype == torch.float16 and torch.equal(kwargs["text_embeds"], part.pooled_embeds.half())
    assert unet_kwargs(Models(unet=None, noise_scheduler=None, family=get_family("sd1")), part, torch.float32) == {}
    with pytest.raises(ValueError, match="rematerialize vae_latents"):
        unet_kwargs(sdxl, Batch(latents=part.latents, prompt_embeds=part.prompt_embeds), torch.float32)
