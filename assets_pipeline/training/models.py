"""Loading the base model's parts for training, from a BaseModelRef's fields (folder or single file)."""

from __future__ import annotations

from typing import Any

from assets_pipeline.training.methods.base import Models


def render_dtype():
    """The one dtype renders (validation, the base model's reference images, the changes_base_output check) load
    pipelines in, whatever dtype the weights were saved in: fp32. The trained parts applied to the base are fp32,
    and a checkpoint saved in fp16 would otherwise give a pipeline of mixed dtypes ("mat1 and mat2 must have the
    same dtype": transformers loads the text encoders as saved, diffusers the rest in fp32)."""
    import torch

    return torch.float32


def base_pipeline_loader(base_model: dict[str, Any], torch_dtype=None):
    """A zero-argument function that loads the base pipeline (what methods apply their outputs to). ``torch_dtype``
    None keeps each component's saved dtype (what an output folder built on the base keeps); renders pass
    :func:`render_dtype`."""
    from assets_pipeline.base_model import BaseModelRef, load_pipeline

    ref = BaseModelRef(**base_model)

    def load():
        return load_pipeline(ref, torch_dtype=torch_dtype)

    return load


def load_training_models(base_model: dict[str, Any], with_text_encoder: bool) -> Models:
    """The U-Net, the noise scheduler, the VAE's scaling numbers and the tokenizers; the text encoders only when
    a method runs them (``with_text_encoder``). SDXL's second encoder and tokenizer go to ``*_2``."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from assets_pipeline.base_model import quiet_progress_bars
    from assets_pipeline.families import get_family

    quiet_progress_bars()
    family = get_family(base_model.get("family", "sd1"))
    location = base_model["location"]
    if base_model["kind"] == "single_file":
        pipe = base_pipeline_loader(base_model)()
        unet, vae_cfg = pipe.unet, pipe.vae.config
        encoders = [getattr(pipe, name) for name in family.text_encoders]
        tokenizers = [getattr(pipe, name) for name in family.tokenizers]
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    else:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet", local_files_only=True)
        # diffusers' scripts train with DDPMScheduler built from the pipeline's scheduler config.
        scheduler = DDPMScheduler.from_pretrained(location, subfolder="scheduler", local_files_only=True)
        vae_cfg = AutoencoderKL.load_config(location, subfolder="vae", local_files_only=True)
        vae_cfg = type("Cfg", (), vae_cfg)
        encoders = [None] * family.num_text_encoders
        if with_text_encoder:
            # SDXL's last encoder is the projected one (its pooled output conditions the U-Net).
            classes = [CLIPTextModel] * (family.num_text_encoders - 1) + [
                CLIPTextModelWithProjection if family.text_time_conditioning else CLIPTextModel]
            encoders = [cls.from_pretrained(location, subfolder=name, local_files_only=True)
                        for cls, name in zip(classes, family.text_encoders)]
        tokenizers = [CLIPTokenizer.from_pretrained(location, subfolder=name, local_files_only=True)
                      for name in family.tokenizers]
    if not with_text_encoder:
        encoders = [None] * len(encoders)
    second = len(encoders) > 1
    return Models(
        unet=unet,
        noise_scheduler=scheduler,
        text_encoder=encoders[0],
        tokenizer=tokenizers[0],
        scaling_factor=vae_cfg.scaling_factor,
        vae_scale_factor=2 ** (len(vae_cfg.block_out_channels) - 1),
        text_encoder_2=encoders[1] if second else None,
        tokenizer_2=tokenizers[1] if second else None,
        family=family,
    )
