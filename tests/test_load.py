"""models/load.py: a resolved base model as its family's pipeline, or as named components, in the dtype renders
need."""

from __future__ import annotations

import torch

from assets_pipeline.models.load import load_pipeline, load_tokenizers
from assets_pipeline.models.resolve import resolve_base_model


def test_loading_by_family(models_root, sdxl_ref):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    sd1 = resolve_base_model("embedded", models_root)
    assert type(load_pipeline(sd1)) is StableDiffusionPipeline
    assert type(load_pipeline(sdxl_ref)) is StableDiffusionXLPipeline
    assert len(load_tokenizers(sd1)) == 1
    tokenizers = load_tokenizers(sdxl_ref)
    assert [t.pad_token for t in tokenizers] == ["<|endoftext|>", "!"]


def test_a_checkpoint_saved_in_fp16_renders_with_fp32_trained_parts(tiny_pipe, tmp_path):
    """Many published checkpoints are fp16. The trained parts are fp32 (a ControlNet, a DreamBooth U-Net saved
    beside the base's fp16 components), so the renders (validation, base renders, changes_base_output) load the base
    in one dtype; loaded as saved, the ControlNet pipeline failed with "mat1 and mat2 must have the same dtype"."""
    import copy

    from assets_pipeline.models.families import get_family
    from assets_pipeline.models.load import base_pipeline_loader, render_dtype
    from assets_pipeline.training.methods import get_method
    from assets_pipeline.training.methods.base import TrainContext
    from assets_pipeline.training.render import render_batch

    folder = tmp_path / "sd-fp16"
    copy.deepcopy(tiny_pipe).to(torch.float16).save_pretrained(folder, safe_serialization=True)
    ref = resolve_base_model(str(folder), tmp_path / "art", resolution=64)
    from safetensors import safe_open

    for part in ("unet", "vae", "text_encoder"):
        weights = next((folder / part).glob("*.safetensors"))
        with safe_open(str(weights), "pt") as f:
            assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16, part
    ctx = TrainContext(concept="dog", token="sks", class_noun="dog", resolution=64, num_instance_images=3)
    load_base = base_pipeline_loader(ref, render_dtype())

    controlnet_dir = tmp_path / "controlnet"
    get_family("sd1").denoiser.controlnet_from(tiny_pipe.unet.float(),
                                               2 ** (len(tiny_pipe.vae.config.block_out_channels) - 1)) \
        .save_pretrained(controlnet_dir, safe_serialization=True)
    pipe = get_method("controlnet").load_pipeline(load_base, controlnet_dir, ctx)
    assert {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.controlnet)} == {torch.float32}
    from PIL import Image

    control = Image.new("RGB", (64, 64), (255, 255, 255))
    assert render_batch(pipe, [("a photo of sks dog", 0)], 64, 2, image=[control])[0].size == (64, 64)

    dreambooth_dir = tmp_path / "dreambooth"  # what DreamBoothMethod.save writes: the base with its U-Net trained
    base = load_pipeline(ref)
    base.unet = copy.deepcopy(tiny_pipe.unet).float()
    base.save_pretrained(dreambooth_dir, safe_serialization=True)
    pipe = get_method("dreambooth").load_pipeline(load_base, dreambooth_dir, ctx)
    assert {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder)} == {torch.float32}
    assert render_batch(pipe, [("a photo of sks dog", 0)], 64, 2)[0].size == (64, 64)
