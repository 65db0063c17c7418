"""Loading the base model's parts for training, from a BaseModelRef's fields (folder or single file)."""

from __future__ import annotations

from typing import Any

from assets_pipeline.training.methods.base import Models


def base_pipeline_loader(base_model: dict[str, Any], torch_dtype=None):
    """A zero-argument function that loads the base pipeline (what methods apply their outputs to)."""
    from assets_pipeline.base_model import BaseModelRef, load_pipeline

    ref = BaseModelRef(**base_model)

    def load():
        return load_pipeline(ref, torch_dtype=torch_dtype)

    return load


def load_training_models(base_model: dict[str, Any], with_text_encoder: bool) -> Models:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from assets_pipeline.base_model import quiet_progress_bars

    quiet_progress_bars()
    location = base_model["location"]
    if base_model["kind"] == "single_file":
        pipe = base_pipeline_loader(base_model)()
        unet, text_encoder, tokenizer, vae_cfg = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae.config
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    else:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet", local_files_only=True)
        # diffusers' scripts train with DDPMScheduler built from the pipeline's scheduler config.
        scheduler = DDPMScheduler.from_pretrained(location, subfolder="scheduler", local_files_only=True)
        vae_cfg = AutoencoderKL.load_config(location, subfolder="vae", local_files_only=True)
        vae_cfg = type("Cfg", (), vae_cfg)
        text_encoder = tokenizer = None
        if with_text_encoder:
            text_encoder = CLIPTextModel.from_pretrained(location, subfolder="text_encoder", local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer", local_files_only=True)
    return Models(
        unet=unet,
        noise_scheduler=scheduler,
        text_encoder=text_encoder if with_text_encoder else None,
        tokenizer=tokenizer,
        scaling_factor=vae_cfg.scaling_factor,
        vae_scale_factor=2 ** (len(vae_cfg.block_out_channels) - 1),
    )
