"""ControlNet (Zhang et al. 2023): a trainable copy of the U-Net encoder joined through zero convolutions
(``ControlNetModel.from_unet``), trained on (conditioning image, caption, latent) triples; the U-Net is frozen.

Default lr 1e-5 from diffusers' examples/controlnet/train_controlnet.py. Saved with ``save_pretrained``;
loads with ``ControlNetModel.from_pretrained(dir)`` into ``StableDiffusionControlNetPipeline``
(``StableDiffusionXLControlNetPipeline`` for SDXL: ``from_unet`` copies the U-Net's text_time conditioning, and
the ControlNet gets the same ``added_cond_kwargs`` as the U-Net, as in train_controlnet_sdxl.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from assets_pipeline.training.config import TrainConfig
from assets_pipeline.training.methods import register
from assets_pipeline.training.methods.base import Method, Models, TrainContext, TrainingInputError, unet_kwargs
from assets_pipeline.training.config import MIN_IMAGES

# SD's conditioning embedding (16, 32, 96, 256) downsamples 8x with 3 stride-2 convs, matching SD's VAE;
# a model with a smaller VAE factor takes the first log2(factor) + 1 of them.
_COND_CHANNELS = (16, 32, 96, 256)


def controlnet_from_unet(unet, vae_scale_factor: int):
    """A ControlNet initialized from the U-Net's encoder, its conditioning embedding downsampling as the VAE."""
    from diffusers import ControlNetModel

    n = int(math.log2(vae_scale_factor)) + 1
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=_COND_CHANNELS[:n])


@dataclass(frozen=True)
class ControlNetConfig(TrainConfig):
    learning_rate: float = field(default=1e-5, metadata={"help": "diffusers' ControlNet example default."})
    conditioning_scale: float = field(default=1.0, metadata={"help": "controlnet_conditioning_scale at validation."})


class ControlNetMethod(Method):
    name = "controlnet"
    asset_name = "controlnet_model"
    config_cls = ControlNetConfig

    def check_inputs(self, ctx: TrainContext, cfg) -> None:
        super().check_inputs(ctx, cfg)
        if ctx.num_control_images < MIN_IMAGES:
            raise TrainingInputError(
                f"controlnet for concept {ctx.concept!r} needs a conditioning image per training photo; found "
                f"{ctx.num_control_images}: materialize control_images for this concept first"
            )

    def prepare(self, models: Models, cfg, ctx: TrainContext) -> list[str]:
        models.unet.requires_grad_(False)
        models.controlnet = controlnet_from_unet(models.unet, models.vae_scale_factor)
        models.controlnet.train()
        return ["controlnet"]

    def predict(self, models: Models, noisy_latents, timesteps, prompt_embeds, batch):
        added = unet_kwargs(models, batch, prompt_embeds.dtype)  # SDXL's: both networks take them
        down, mid = models.controlnet(noisy_latents, timesteps, encoder_hidden_states=prompt_embeds,
                                      controlnet_cond=batch.control.to(noisy_latents.dtype), return_dict=False,
                                      **added)
        return models.unet(noisy_latents, timesteps, encoder_hidden_states=prompt_embeds,
                           down_block_additional_residuals=[d.to(noisy_latents.dtype) for d in down],
                           mid_block_additional_residual=mid.to(noisy_latents.dtype), **added).sample

    def save(self, models: Models, load_base, out_dir: Path, cfg, ctx: TrainContext):
        models.controlnet.save_pretrained(out_dir, safe_serialization=True)
        return sorted(out_dir.glob("*.safetensors"))

    def load_pipeline(self, load_base, out_dir: Path, ctx: TrainContext):
        from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

        from assets_pipeline.families import get_family

        controlnet = ControlNetModel.from_pretrained(str(out_dir), local_files_only=True)
        base = load_base()
        xl = get_family(ctx.family).text_time_conditioning
        pipeline = StableDiffusionXLControlNetPipeline if xl else StableDiffusionControlNetPipeline
        return pipeline(**base.components, controlnet=controlnet)

    def validation_kwargs(self, out_dir: Path, ctx: TrainContext, index: int) -> dict:
        from PIL import Image

        paths = ctx.extra["control_paths"]
        return {"image": Image.open(paths[index % len(paths)]).convert("RGB")}


register(ControlNetMethod())
