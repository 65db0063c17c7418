"""SD 3.x and Flux.1 end to end on the embedded tiny models (CPU): one concept per family with all four methods
trained in one build through the Dagster assets, in a deployment whose base model is SD 1.x (the concept's
[base_model] names the family's embedded model): the T5 text cache (deduplicated, at the configured length), the
16-channel latents with the VAE's shift, flow-matching training, the checks, and every output opened by the
family's stock diffusers pipeline in a process that imports nothing from this project. Also: the kohya Flux LoRA
file against diffusers' own converter at Flux's real width, and the settings a flow family refuses."""

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

PHOTOS = {"astronaut": (128, 128), "coffee": (170, 96), "rocket": (96, 160)}
METHODS = ("lora", "dreambooth", "textual_inversion", "controlnet")
ASSETS = {"lora": "lora_adapter", "dreambooth": "dreambooth_model", "textual_inversion": "textual_inversion_embedding",
          "controlnet": "controlnet_model"}
# SD 3.x: LoRA on its CLIP encoders too, T5 cached at 64 tokens (its pipeline's default is 256) and flipped latents
# (so ControlNet encodes mirrored conditioning images); Flux at its family's defaults (512 T5 tokens), its LoRA over
# a float8-quantized transformer (training/quantization.py).
EXTRA = {"sd3": ("[latents]\nmax_sequence_length = 64\nrandom_flip = true\n", "train_text_encoder = true\n"),
         "flux": ("", 'base_quantization = "float8"\n')}


def spec(family: str) -> str:
    latents, lora = EXTRA[family]
    return (f'token = "sks"\nclass_noun = "scene"\nmethods = {json.dumps(list(METHODS))}\n'
            f'[base_model]\nsource = "embedded-{family}"\n{latents}'
            f'[lora]\nmax_train_steps = 2\n{lora}'
            '[dreambooth]\nmax_train_steps = 2\nnum_class_images = 2\n[class_images]\nnum_inference_steps = 2\n'
            '[textual_inversion]\nmax_train_steps = 2\n[controlnet]\nmax_train_steps = 2\n')


@pytest.fixture(scope="module", params=["sd3", "flux"])
def flow_build(request, tmp_path_factory, flow_root):
    """The concept on the family's embedded model, built through every asset and check in one materialization."""
    import dagster as dg

    from assets_pipeline.definitions import ASSETS as ALL_ASSETS, CHECKS, default_resources
    from assets_pipeline.partitions.concept_spec import parse_concept_toml
    from assets_pipeline.resources import BaseModelResource, PipelineStorage
    from conftest import link_models
    from helpers import write_concept

    family, root = request.param, tmp_path_factory.mktemp(request.param)
    files = {f"{name}.png": encode(shaped(name, size), "PNG") for name, size in PHOTOS.items()}
    write_concept(root / "data", "c", files, spec(family))
    # The session's models with the embedded SD 3.x and Flux built once (flow_root), linked in.
    storage = PipelineStorage(data_root=str(root / "data"), artifact_root=str(link_models(flow_root, root / "art")))
    resources = {**default_resources(), "storage": storage, "base_model": BaseModelResource(source="embedded")}
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("concepts", ["c"])
    res = dg.materialize([*ALL_ASSETS, *CHECKS], partition_key="c", instance=instance, resources=resources)
    assert res.success
    mats = {e.materialization.asset_key.to_user_string(): e.materialization.metadata
            for e in res.get_asset_materialization_events()}
    checks = {(c.asset_key.to_user_string(), c.check_name): c.passed for c in res.get_asset_check_evaluations()}
    ref = resources["base_model"].resolve(storage.artifact_path(), parse_concept_toml("c", spec(family)))
    out = {m: Path(mats[a]["path"].value) for m, a in ASSETS.items()}
    return SimpleNamespace(family=family, storage=storage, mats=mats, checks=checks, ref=ref, out=out)


@pytest.mark.slow
def test_all_four_methods_train_on_the_family_and_pass_their_checks(flow_build):
    assert flow_build.ref.family == flow_build.family
    for method, asset in ASSETS.items():
        assert flow_build.mats[asset]["steps"].value == 2, method
        for check in ("changes_base_output", "manifest_lists_training_images"):
            assert flow_build.checks[asset, check], (asset, check)
        lineage = json.loads((flow_build.out[method] / "lineage.json").read_text())
        assert lineage["base_model"]["family"] == flow_build.family
    assert flow_build.mats["vae_latents"]["base_model_family"].value == flow_build.family
    # The frozen transformer the LoRA trained over: float8 on Flux (a byte a linear weight), fp32 on SD 3.x, as
    # the DreamBooth's trained one.
    lora_gib = flow_build.mats["lora_adapter"]["denoiser_gib"].value
    full_gib = flow_build.mats["dreambooth_model"]["denoiser_gib"].value
    assert (lora_gib < 0.5 * full_gib) if flow_build.family == "flux" else lora_gib == full_gib


@pytest.mark.slow
def test_the_bundle_holds_each_caption_once_at_the_t5_length_with_the_vaes_shift(flow_build):
    from assets_pipeline.assets.common import read_upstream
    from assets_pipeline.stages.bundle import load_latent_bundle

    meta = flow_build.mats["vae_latents"]
    bundle = load_latent_bundle(Path(meta["path"].value) / "latents.safetensors")
    index = read_upstream(flow_build.storage, "c", "vae_latents", "index.parquet")
    roles = list(index["role"])
    assert roles.count("class") == 2 and roles.count("instance") == 3
    # The class images share one caption: one embedding in the bundle, which both class rows point at.
    distinct = len(set(index["text_key"]))
    assert meta["distinct_captions"].value == distinct == bundle.tensors["prompt_embeds"].shape[0] < len(index)
    rows = bundle.text_rows().tolist()
    assert rows[roles.index("class")] == rows[len(roles) - 1 - roles[::-1].index("class")]
    assert meta["text_embeds_bytes"].value > 0
    tokens = {"sd3": 77 + 64, "flux": 512}[flow_build.family]  # SD 3.x: CLIP's 77 then the configured 64 of T5
    assert bundle.tensors["prompt_embeds"].shape[1:] == (tokens, 128)  # the embedded T5's width
    vae = json.loads((Path(flow_build.ref.location) / "vae" / "config.json").read_text())
    assert bundle.meta["shift_factor"] == vae["shift_factor"] and bundle.meta["scaling_factor"] == vae["scaling_factor"]
    assert bundle.meta["text_max_lengths"] == {"sd3": [None, None, 64], "flux": [None, 512]}[flow_build.family]
    assert all(bundle.latents("latent_mean", b).shape[1] == 16 for b in bundle.sizes)  # 16 latent channels


def test_training_latents_are_shifted_then_scaled():
    """(sample - shift_factor) x scaling_factor, as train_dreambooth_lora_sd3.py scales the VAE's latents; a VAE
    without a shift (SD, SDXL) gets sample x scaling_factor exactly as before."""
    from assets_pipeline.training.data import TrainingData

    mean = torch.randn(2, 16, 4, 4)
    data = TrainingData([(32, 32)], [mean], [torch.zeros_like(mean)], [0, 0], torch.randn(2, 8, 4),
                        ["instance"] * 2, ["a", "b"])
    (flow,) = data.draw([0, 1], torch.Generator().manual_seed(0), 1.5, False, shift_factor=0.1)
    (plain,) = data.draw([0, 1], torch.Generator().manual_seed(0), 1.5, False)
    torch.testing.assert_close(flow.latents, (mean - 0.1) * 1.5)
    assert torch.equal(plain.latents, mean * 1.5)


# Runs in a fresh interpreter: stock diffusers only. Each output applied to the family's pipeline as its model card
# would say; SD 3.x's embedding with the README's lines (its pipeline has no load_textual_inversion).
STOCK_LOAD = """
import json, sys
import numpy as np, torch
from PIL import Image
from safetensors.torch import load_file
import diffusers
base, family, lora, dreambooth, ti, cn, control = sys.argv[1:8]
Pipeline = {"sd3": diffusers.StableDiffusion3Pipeline, "flux": diffusers.FluxPipeline}[family]
ControlNet = {"sd3": diffusers.SD3ControlNetModel, "flux": diffusers.FluxControlNetModel}[family]
ControlNetPipeline = {"sd3": diffusers.StableDiffusion3ControlNetPipeline,
                      "flux": diffusers.FluxControlNetPipeline}[family]

def render(pipe, prompt="a photo of sks scene", **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).images[0]

reference = render(Pipeline.from_pretrained(base, local_files_only=True))
images = {}
pipe = Pipeline.from_pretrained(base, local_files_only=True)
pipe.load_lora_weights(lora)
adapted = [hasattr(pipe.transformer.transformer_blocks[0].attn, n) and hasattr(
    getattr(pipe.transformer.transformer_blocks[0].attn, n), "lora_A") for n in ("to_q", "add_q_proj")]
images["lora"] = render(pipe)
images["dreambooth"] = render(Pipeline.from_pretrained(dreambooth, local_files_only=True))

rows = load_file(f"{ti}/c.safetensors")
pipe = Pipeline.from_pretrained(base, local_files_only=True)
encoders = {"clip_l": (pipe.tokenizer, pipe.text_encoder)}
if family == "sd3":
    encoders.update(clip_g=(pipe.tokenizer_2, pipe.text_encoder_2), t5=(pipe.tokenizer_3, pipe.text_encoder_3))
    # README: SD 3.x's pipeline has no load_textual_inversion; add each row to its tokenizer and encoder.
    for key, (tokenizer, encoder) in encoders.items():
        tokenizer.add_tokens("<sks>")
        encoder.resize_token_embeddings(max(len(tokenizer), encoder.get_input_embeddings().num_embeddings))
        with torch.no_grad():
            encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("<sks>")] = rows[key][0]
else:
    encoders["t5"] = (pipe.tokenizer_2, pipe.text_encoder_2)
    for key, (tokenizer, encoder) in encoders.items():
        pipe.load_textual_inversion(rows[key], token="<sks>", text_encoder=encoder, tokenizer=tokenizer)
loaded = {key: float((enc.get_input_embeddings().weight[tok.convert_tokens_to_ids("<sks>")] - rows[key][0]).abs().max())
          for key, (tok, enc) in encoders.items()}
images["textual_inversion"] = render(pipe, "a photo of <sks> scene")
reference_ti = render(Pipeline.from_pretrained(base, local_files_only=True), "a photo of <sks> scene")

controlnet = ControlNet.from_pretrained(cn, local_files_only=True)
pipe = ControlNetPipeline.from_pretrained(base, controlnet=controlnet, local_files_only=True)
images["controlnet"] = render(pipe, control_image=Image.open(control).convert("RGB"))
print(json.dumps({"modules": sorted(m for m in sys.modules if m.startswith(("assets_pipeline", "helpers"))),
                  "rows": sorted(rows), "loaded_row_error": loaded, "adapted": adapted,
                  "shapes": sorted({tuple(v.shape) for v in images.values()}),
                  "finite": all(bool(np.isfinite(v).all()) for v in images.values()),
                  "change": {k: float(np.abs(v - (reference_ti if k == "textual_inversion" else reference)).max())
                             for k, v in images.items()}}))
"""


@pytest.mark.slow
def test_every_output_opens_in_the_familys_stock_pipeline_and_changes_the_image(flow_build, tmp_path):
    from assets_pipeline.training.plan import training_rows

    control = training_rows(flow_build.storage.layout(), "c", ("instance",), True)[0].control_path
    out = flow_build.out
    proc = subprocess.run([sys.executable, "-c", STOCK_LOAD, flow_build.ref.location, flow_build.family,
                           str(out["lora"]), str(out["dreambooth"]), str(out["textual_inversion"]),
                           str(out["controlnet"]), control],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["modules"] == []
    assert got["adapted"] == [True, True]  # the LoRA reaches the image and the text projections
    assert got["rows"] == {"sd3": ["clip_g", "clip_l", "t5"], "flux": ["clip_l", "t5"]}[flow_build.family]
    assert set(got["loaded_row_error"].values()) == {0.0}  # each encoder holds the learned row for the token
    assert got["shapes"] == [[64, 64, 3]] and got["finite"]
    for method, change in got["change"].items():
        assert change > 0, f"{method} renders the base model's image"


@pytest.mark.slow
def test_the_lora_files_hold_the_transformer_and_clip_loras(flow_build):
    from safetensors.torch import load_file

    out = flow_build.out["lora"]
    sd = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
            "transformer.transformer_blocks.0.attn.add_q_proj.lora_B.weight"} <= set(sd)  # PEFT's key names
    clip = sorted({k.split(".")[0] for k in sd if not k.startswith("transformer.")})
    assert clip == {"sd3": ["text_encoder", "text_encoder_2"], "flux": []}[flow_build.family]  # never T5
    kohya = out / "kohya_lora.safetensors"
    if flow_build.family == "sd3":  # ComfyUI reads SD 3.x LoRAs in diffusers' layout: no second file
        assert not kohya.exists()
        return
    keys = load_file(str(kohya))
    assert {k.split(".")[0] for k in keys} >= {"lora_unet_double_blocks_0_img_attn_qkv",
                                                "lora_unet_double_blocks_0_txt_attn_qkv",
                                                "lora_unet_single_blocks_0_linear1"}


def test_the_kohya_flux_file_is_what_diffusers_converter_reads_back():
    """At Flux.1's real width (3072; diffusers' converter assumes it for single blocks): random LoRA weights on one
    double and one single block, written by training/kohya_flux.py and read by diffusers'
    ``_convert_kohya_flux_lora_to_diffusers``, give every module the same weight change B @ A x scale."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from assets_pipeline.models.mmdit import FLUX_LORA_TARGETS
    from assets_pipeline.training.kohya_flux import flux_lora_to_kohya

    inner, mlp, r, scale = 3072, 4 * 3072, 4, 2.0
    out_features = {}
    for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
              "attn.to_out.0", "attn.to_add_out", "ff.net.2", "ff_context.net.2"):
        out_features[f"transformer_blocks.0.{m}"] = inner
    for m in ("ff.net.0.proj", "ff_context.net.0.proj"):
        out_features[f"transformer_blocks.0.{m}"] = mlp
    out_features.update({"single_transformer_blocks.0.attn.to_q": inner, "single_transformer_blocks.0.attn.to_k": inner,
                         "single_transformer_blocks.0.attn.to_v": inner, "single_transformer_blocks.0.proj_mlp": mlp})
    inputs = {"ff.net.2": mlp, "ff_context.net.2": mlp}
    g = torch.Generator().manual_seed(0)
    sd = {}
    for module in out_features:  # the default targets (PEFT matches them in the single blocks too), not proj_mlp
        if module.endswith("proj_mlp") or not module.endswith(FLUX_LORA_TARGETS):
            continue
        width = inputs.get(module.split(".", 2)[2], inner)
        sd[f"{module}.lora_A.weight"] = torch.randn(r, width, generator=g) / 10
        sd[f"{module}.lora_B.weight"] = torch.randn(out_features[module], r, generator=g) / 10
    modules = {k.rpartition(".lora_")[0] for k in sd}
    kohya = flux_lora_to_kohya(sd, dict.fromkeys(modules, scale), out_features)
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * inner + mlp, 4 * r)
    back = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    for module in modules:
        ours = sd[f"{module}.lora_B.weight"] @ sd[f"{module}.lora_A.weight"] * scale
        theirs = back[f"transformer.{module}.lora_B.weight"] @ back[f"transformer.{module}.lora_A.weight"]
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    # proj_mlp had no LoRA: the fused file holds zeros for it, which the converter reads back as a zero change.
    mlp_change = back["transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"] @ \
        back["transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight"]
    assert not mlp_change.any()
    with pytest.raises(ValueError, match="outside Flux's transformer blocks"):
        flux_lora_to_kohya({"x_embedder.lora_A.weight": torch.zeros(r, 64)}, {"x_embedder": 1.0}, {})


def test_what_a_flow_family_refuses_and_what_a_ddpm_family_refuses():
    from assets_pipeline.training.methods import get_method
    from assets_pipeline.training.methods.base import TrainContext, TrainingInputError

    lora = get_method("lora")
    flux = TrainContext("c", "sks", "dog", 64, 5, family="flux")
    with pytest.raises(TrainingInputError, match=r"\[lora\] for concept 'c' on a flux base model: snr_gamma = 5.0 "
                                                 r"weights DDPM's loss.*unset snr_gamma"):
        lora.check_inputs(flux, lora.config_cls(snr_gamma=5.0))
    lora.check_inputs(flux, lora.config_cls(weighting_scheme="mode"))
    sd = TrainContext("c", "sks", "dog", 64, 5, family="sd1")
    with pytest.raises(TrainingInputError, match=r"weighting_scheme = 'cosmap' is a flow-matching setting"):
        lora.check_inputs(sd, lora.config_cls(weighting_scheme="cosmap"))
    with pytest.raises(ValueError, match=r"weighting_scheme = 'uniform' is not one of"):
        lora.config_cls(weighting_scheme="uniform")


def test_added_settings_enter_a_jobs_identity_only_when_set():
    """A field added after outputs existed (weighting_scheme, logit_mean, ...) leaves the identity of every job
    that does not set it as it was: outputs trained before it are still reused."""
    from dataclasses import asdict

    from assets_pipeline.training.config import identity_config
    from assets_pipeline.training.methods import get_method

    cfg = get_method("lora").config_cls()
    assert "weighting_scheme" in asdict(cfg) and "weighting_scheme" not in identity_config(cfg)
    assert identity_config(get_method("lora").config_cls(weighting_scheme="mode"))["weighting_scheme"] == "mode"
    assert identity_config(get_method("lora").config_cls(logit_std=0.5))["logit_std"] == 0.5
