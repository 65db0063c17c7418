"""models/detect.py: a base model's family and prediction type from configs alone: a diffusers folder's JSON, a
single-file checkpoint's key names (LDM and SGM layouts)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from assets_pipeline.models.detect import detect_checkpoint_family
from assets_pipeline.models.load import load_pipeline, load_tokenizers
from assets_pipeline.models.resolve import resolve_base_model
from assets_pipeline.models.unet import sdxl_add_time_ids
from helpers import edited_copy, same_weights


def test_sdxl_folder_detected_by_class_or_text_time(sdxl_ref, tmp_path):
    copy = resolve_base_model(str(edited_copy(Path(sdxl_ref.location), tmp_path / "xl", {})), tmp_path / "art")
    assert (copy.kind, copy.family, copy.resolution) == ("folder", "sdxl", 1024)  # the family's default

    # text_time on the U-Net alone is enough (a folder saved by another pipeline class, e.g. img2img)
    other = edited_copy(Path(sdxl_ref.location), tmp_path / "xl-img2img",
                        {"model_index.json": {"_class_name": "StableDiffusionXLImg2ImgPipeline"}})
    assert resolve_base_model(str(other), tmp_path / "art").family == "sdxl"

    broken = edited_copy(Path(sdxl_ref.location), tmp_path / "broken",
                         {"unet/config.json": {"addition_embed_type": None}})
    with pytest.raises(ValueError, match=r"StableDiffusionXLPipeline.*unet/config.json.*addition_embed_type"):
        resolve_base_model(str(broken), tmp_path / "art")
    bad_pred = edited_copy(Path(sdxl_ref.location), tmp_path / "bad-pred",
                           {"scheduler/scheduler_config.json": {"prediction_type": "flow"}})
    with pytest.raises(ValueError, match=r"scheduler_config.json: prediction_type = 'flow'"):
        resolve_base_model(str(bad_pred), tmp_path / "art")


def test_checkpoint_family_from_keys(embedded_model_dir, sdxl_pipe, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors.torch import save_file

    from assets_pipeline.models.detect import CheckpointKeys
    from ldm_checkpoint import pipeline_to_ldm_state_dict, sdxl_pipeline_to_sgm_state_dict

    sd1 = pipeline_to_ldm_state_dict(StableDiffusionPipeline.from_pretrained(embedded_model_dir,
                                                                             local_files_only=True))
    torch.save({"state_dict": sd1}, tmp_path / "sd1.ckpt")  # a pickled, Lightning-style checkpoint
    assert detect_checkpoint_family(tmp_path / "sd1.ckpt").name == "sd1"

    save_file(sdxl_pipeline_to_sgm_state_dict(sdxl_pipe), str(tmp_path / "xl.safetensors"))
    # diffusers' own marker for SDXL is the 10th block of OpenCLIP-G, which a 2-layer encoder lacks: it says
    # "v1", and the SGM layout's prefix is what names the family.
    assert infer_diffusers_model_type(CheckpointKeys.read(tmp_path / "xl.safetensors")) == "v1"
    assert detect_checkpoint_family(tmp_path / "xl.safetensors").name == "sdxl"

    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(1)}, str(tmp_path / "unet-only.safetensors"))
    with pytest.raises(ValueError, match="unet-only.safetensors: no text encoder keys"):
        detect_checkpoint_family(tmp_path / "unet-only.safetensors")


def test_sdxl_single_file_round_trip(sdxl_ref, sdxl_pipe, embedded_model_dir, tmp_path):
    """An SGM-layout .safetensors loads as StableDiffusionXLPipeline with the configs from the tiny folder.

    Every weight of the checkpoint is shifted from the folder's, so equal weights after loading show they came
    from the file (diffusers falls back to a config folder's own weights when it finds no component in a file).
    """
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from ldm_checkpoint import sdxl_pipeline_to_sgm_state_dict

    components = ("unet", "vae", "text_encoder", "text_encoder_2")
    original = {n: {k: v.clone() for k, v in getattr(sdxl_pipe, n).state_dict().items()} for n in components}
    with torch.no_grad():
        for n in components:
            for p in getattr(sdxl_pipe, n).parameters():
                p.add_(0.25)
    try:
        ckpt = tmp_path / "tiny-sdxl.safetensors"
        save_file(sdxl_pipeline_to_sgm_state_dict(sdxl_pipe), str(ckpt))
        ref = resolve_base_model(str(ckpt), tmp_path / "art", single_file_config=sdxl_ref.location)
        assert (ref.kind, ref.family, ref.prediction_type, ref.resolution) == ("single_file", "sdxl", "epsilon", 1024)

        pipe = load_pipeline(ref)
        assert type(pipe) is StableDiffusionXLPipeline
        for n in components:
            assert same_weights(getattr(pipe, n), getattr(sdxl_pipe, n)), n
            loaded = getattr(pipe, n).state_dict()
            assert any(not torch.equal(loaded[k], original[n][k]) for k in loaded), n  # not the folder's
        # The U-Net's output on a fixed input, through the text_time path (pooled text + add_time_ids).
        torch.manual_seed(0)
        sample, hidden = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 96)
        cond = {"text_embeds": torch.randn(1, 32), "time_ids": sdxl_add_time_ids((64, 64), (0, 0), (64, 64))}
        with torch.no_grad():
            out = pipe.unet(sample, 10, hidden, added_cond_kwargs=cond).sample
            expected = sdxl_pipe.unet(sample, 10, hidden, added_cond_kwargs=cond).sample
        # Same weights, yet not bit-identical: float32 sums in another order (activations reach ~400 here).
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
        assert [t.pad_token for t in load_tokenizers(ref)] == ["<|endoftext|>", "!"]

        # Without a config folder the family still comes from the keys (loading would then need the hub).
        bare = resolve_base_model(str(ckpt), tmp_path / "art")
        assert (bare.family, bare.prediction_type, bare.single_file_config) == ("sdxl", "epsilon", None)
        with pytest.raises(ValueError, match="is an sdxl model but its config folder .* is sd1"):
            resolve_base_model(str(ckpt), tmp_path / "art", single_file_config=str(embedded_model_dir))
    finally:
        with torch.no_grad():
            for n in components:
                getattr(sdxl_pipe, n).load_state_dict(original[n])


def test_flow_folders_detected_by_their_transformer(sd3_ref, flux_ref, tmp_path):
    """A folder with transformer/ instead of unet/: the transformer's class names the family, the pipeline class in
    model_index.json must agree with it, and such a model is recorded as predicting the flow."""
    assert (sd3_ref.family, sd3_ref.prediction_type, sd3_ref.kind) == ("sd3", "flow", "embedded")
    assert (flux_ref.family, flux_ref.prediction_type) == ("flux", "flow")
    copy = resolve_base_model(str(edited_copy(Path(flux_ref.location), tmp_path / "flux", {})), tmp_path / "art")
    assert (copy.kind, copy.family, copy.resolution) == ("folder", "flux", 1024)  # the family's default size

    mixed = edited_copy(Path(flux_ref.location), tmp_path / "mixed",
                        {"model_index.json": {"_class_name": "StableDiffusion3Pipeline"}})
    with pytest.raises(ValueError, match=r"names StableDiffusion3Pipeline, but .*transformer/config.json is a "
                                         r"FluxTransformer2DModel \(FluxPipeline's transformer\)"):
        resolve_base_model(str(mixed), tmp_path / "art")
    unknown = edited_copy(Path(sd3_ref.location), tmp_path / "qwen",
                          {"transformer/config.json": {"_class_name": "QwenImageTransformer2DModel"}})
    with pytest.raises(ValueError, match=r"class 'QwenImageTransformer2DModel'; the families trained here have "
                                         r"\['FluxTransformer2DModel', 'SD3Transformer2DModel'\]"):
        resolve_base_model(str(unknown), tmp_path / "art")


def test_flow_checkpoints_detected_by_their_blocks(tmp_path):
    """Original-layout files: Black Forest Labs' Flux (double_blocks, with guidance_in on dev), Stability's SD 3.x
    (model.diffusion_model.joint_blocks): diffusers' own model types, or the layout's prefix for a small model."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors.torch import save_file

    from assets_pipeline.models.detect import CheckpointKeys

    flux = {"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(8),
            "double_blocks.0.img_attn.qkv.weight": torch.zeros(96, 32), "guidance_in.in_layer.bias": torch.zeros(32),
            "img_in.weight": torch.zeros(32, 64)}
    save_file(flux, str(tmp_path / "flux1-dev.safetensors"))
    assert infer_diffusers_model_type(CheckpointKeys.read(tmp_path / "flux1-dev.safetensors")) == "flux-dev"
    assert detect_checkpoint_family(tmp_path / "flux1-dev.safetensors").name == "flux"
    sd3 = {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": torch.zeros(4 * 32),
           "model.diffusion_model.x_embedder.proj.weight": torch.zeros(32, 16, 2, 2)}
    save_file(sd3, str(tmp_path / "sd3-tiny.safetensors"))
    assert detect_checkpoint_family(tmp_path / "sd3-tiny.safetensors").name == "sd3"
    # Flux Fill (384 input channels: image, mask and latents) is a Flux model this pipeline does not train.
    save_file({**flux, "img_in.weight": torch.zeros(3072, 384)}, str(tmp_path / "fill.safetensors"))
    with pytest.raises(ValueError, match="model type 'flux-fill'; this pipeline trains"):
        detect_checkpoint_family(tmp_path / "fill.safetensors")
