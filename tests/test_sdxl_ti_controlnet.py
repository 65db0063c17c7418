"""Textual inversion and ControlNet on the embedded tiny SDXL (CPU), trained through the Dagster assets in one
build, their checks, and each output loaded back by stock diffusers in a process that imports nothing from this
project: the embedding's clip_l/clip_g rows into the SDXL pipeline's two encoders, the ControlNet into
StableDiffusionXLControlNetPipeline with a conditioning image."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_sdxl_training import build_sdxl_concept

SPEC = 'token = "sks"\nclass_noun = "scene"\nmethods = ["textual_inversion", "controlnet"]\n' \
       '[latents]\nrandom_flip = true\n[textual_inversion]\nmax_train_steps = 3\n[controlnet]\nmax_train_steps = 3\n'
ASSETS = {"textual_inversion": "textual_inversion_embedding", "controlnet": "controlnet_model"}


@pytest.fixture(scope="module")
def sdxl_ti_cn(tmp_path_factory, built_models):
    """A mixed-aspect concept built on embedded-sdxl through every asset, with TI and ControlNet outputs."""
    import dagster as dg

    with dg.DagsterInstance.ephemeral() as instance:
        build = build_sdxl_concept(tmp_path_factory.mktemp("sdxl_ti_cn"), built_models, SPEC, instance)
    build.out = {m: Path(build.mats[a]["path"].value) for m, a in ASSETS.items() if a in build.mats}
    return build


def test_sdxl_textual_inversion_and_controlnet_pass_their_checks(sdxl_ti_cn):
    for method, asset in ASSETS.items():
        assert asset in sdxl_ti_cn.mats, f"{asset} was not materialized"
        for name in ("weights_finite", "changes_base_output", "manifest_lists_training_images"):
            assert sdxl_ti_cn.checks[(asset, name)], (asset, name)
        lineage = json.loads((sdxl_ti_cn.out[method] / "lineage.json").read_text())
        assert lineage["base_model"]["family"] == "sdxl"
        assert json.loads((sdxl_ti_cn.out[method] / "metrics.json").read_text())["mean_abs_change_vs_base"] > 0


def test_sdxl_textual_inversion_learns_a_row_per_encoder_in_both_formats(sdxl_ti_cn):
    from safetensors.torch import load_file

    out = sdxl_ti_cn.out["textual_inversion"]
    combined = load_file(str(out / "xl.safetensors"))
    assert set(combined) == {"clip_l", "clip_g"}
    assert combined["clip_l"].shape == (1, 32) and combined["clip_g"].shape == (1, 64)  # the encoders' widths
    first, second = (load_file(str(out / f"learned_embeds{suffix}.safetensors")) for suffix in ("", "_2"))
    assert torch.equal(first["<sks>"], combined["clip_l"]) and torch.equal(second["<sks>"], combined["clip_g"])
    weights = json.loads((out / "lineage.json").read_text())["weights"]
    assert set(weights) == {"learned_embeds.safetensors", "learned_embeds_2.safetensors", "xl.safetensors"}


# Runs in a fresh interpreter: stock diffusers only, nothing from this project on the path or imported.
STOCK_LOAD = """
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


def test_sdxl_ti_and_controlnet_load_in_stock_diffusers_and_change_the_image(sdxl_ti_cn, tmp_path):
    from assets_pipeline.assets.models import training_rows

    control = training_rows(sdxl_ti_cn.storage, "xl", ("instance",), True)[0]["control_path"]
    proc = subprocess.run([sys.executable, "-c", STOCK_LOAD, sdxl_ti_cn.ref.location,
                           str(sdxl_ti_cn.out["textual_inversion"]), str(sdxl_ti_cn.out["controlnet"]), control],
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


def test_sdxl_ti_reencodes_both_encoders_and_conditions_on_their_pooled_embedding(sdxl_ti_cn):
    """The training step's text side on SDXL is exactly the latents cache's encoding (both encoders' penultimate
    states, the projected encoder's pooled output), and that pooled output is what the U-Net gets."""
    from dataclasses import asdict

    from assets_pipeline.families import encode_sdxl_prompt, tokenize
    from assets_pipeline.training.data import TrainingData
    from assets_pipeline.training.methods import get_method
    from assets_pipeline.training.methods.base import TrainContext, unet_kwargs
    from assets_pipeline.training.models import load_training_models

    models = load_training_models(asdict(sdxl_ti_cn.ref), with_text_encoder=True)
    method = get_method("textual_inversion")
    ctx = TrainContext(concept="xl", token="sks", class_noun="scene", resolution=64, num_instance_images=3,
                       family="sdxl")
    cfg = method.config_cls()
    method.check_inputs(ctx, cfg)  # SDXL is accepted
    assert method.prepare(models, cfg, ctx) == ["text_encoder", "text_encoder_2"]
    ids = [tok.convert_tokens_to_ids("<sks>") for tok in (models.tokenizer, models.tokenizer_2)]
    assert all(i == len(tok) - 1 for i, tok in zip(ids, (models.tokenizer, models.tokenizer_2)))

    n = 2
    mean = torch.zeros(n, 4, 2, 2)
    captions = [method.training_caption(c, ctx) for c in ("a sks scene", "a dog")]
    data = TrainingData([(64, 64)], [mean], [torch.zeros_like(mean)], [0] * n, torch.zeros(n, 77, 96),
                        ["instance"] * n, captions, pooled=torch.zeros(n, 32),
                        time_ids=torch.tensor([[64, 64, 0, 0, 64, 64]] * n))
    data.tokenize(models.tokenizer, models.tokenizer_2)
    (batch,) = data.draw([0, 1], torch.Generator().manual_seed(0), 1.0, random_flip=False)
    embeds = method.encode(models, batch)
    with torch.no_grad():
        expected, pooled = encode_sdxl_prompt([models.text_encoder, models.text_encoder_2],
                                              tokenize([models.tokenizer, models.tokenizer_2], captions))
    torch.testing.assert_close(embeds, expected)
    torch.testing.assert_close(unet_kwargs(models, batch, torch.float32)["added_cond_kwargs"]["text_embeds"], pooled)
    # Gradients reach both encoders' embedding rows, and after_step keeps only the placeholder's change.
    embeds.sum().backward()
    for enc, i in zip((models.text_encoder, models.text_encoder_2), ids):
        grad = enc.get_input_embeddings().weight.grad
        assert grad is not None and grad[i].abs().sum() > 0
        with torch.no_grad():
            enc.get_input_embeddings().weight.add_(1.0)
    method.after_step(models)
    for name, i in zip(("text_encoder", "text_encoder_2"), ids):
        weight = getattr(models, name).get_input_embeddings().weight
        assert torch.equal(weight[:i], method.original[name][:i])
        assert not torch.equal(weight[i], method.original[name][i])


def test_sdxl_controlnet_copies_the_unets_text_time_conditioning(sdxl_ti_cn):
    from dataclasses import asdict

    from assets_pipeline.training.methods import get_method
    from assets_pipeline.training.methods.base import Batch, TrainContext
    from assets_pipeline.training.models import load_training_models

    models = load_training_models(asdict(sdxl_ti_cn.ref), with_text_encoder=False)
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
