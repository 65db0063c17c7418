"""ControlNet (Zhang et al. 2023): a trainable copy of the U-Net encoder joined through zero convolutions
(``ControlNetModel.from_unet``), trained on (conditioning image, caption, latent) triples; the U-Net is frozen.
SD 3.x and Flux: a copy of the transformer's first blocks (``SD3ControlNetModel`` / ``FluxControlNetModel``
``from_transformer``, as train_controlnet_sd3.py / _flux.py build it), conditioned on the conditioning image's VAE
latents (encoded once before training: :meth:`ControlNetMethod.prepare_data`), and validated through the family's
ControlNet pipeline with ``control_image``.

Default lr 1e-5 from diffusers' examples/controlnet/train_controlnet.py. The base model's family builds the
ControlNet from its denoiser and says how the two are called together (``models/unet.py``). Saved with
``save_pretrained``; loads with ``ControlNetModel.from_pretrained(dir)`` into the family's ControlNet pipeline
(``StableDiffusionControlNetPipeline``; ``StableDiffusionXLControlNetPipeline`` for SDXL, whose ControlNet gets the
same ``added_cond_kwargs`` as the U-Net, as in train_controlnet_sdxl.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from assets_pipeline.concept import MIN_IMAGES
from assets_pipeline.training.config import TrainConfig, added_field
from assets_pipeline.training.methods.registry import register
from assets_pipeline.training.methods.base import Method, Models, TrainContext, TrainingInputError

MIN_TRAINING_PAIRS = 8  # pairs are held out for validation only where at least this many remain to train on


def held_out(pairs: list[str], holdout: int) -> list[str]:
    """The photos (sha256) whose pairs a ControlNet keeps out of training for its validation renders: the
    ``holdout`` lowest sha256 of ``pairs``, where at least :data:`MIN_TRAINING_PAIRS` pairs remain to train on;
    otherwise none (validation then conditions on training pairs). Content-defined: renaming or reordering photos
    holds out the same pairs."""
    if holdout < 1 or len(pairs) - holdout < MIN_TRAINING_PAIRS:
        return []
    return sorted(pairs)[:holdout]


@dataclass(frozen=True)
class ControlNetConfig(TrainConfig):
    learning_rate: float = field(default=1e-5, metadata={"help": "diffusers' ControlNet example default."})
    conditioning_scale: float = field(default=1.0, metadata={"help": "controlnet_conditioning_scale at validation."})
    validation_holdout: int = added_field(2, (
        "Pairs (photo + conditioning image) kept out of training for the validation renders to follow, where at "
        f"least {MIN_TRAINING_PAIRS} pairs remain to train on (otherwise validation follows training pairs); the "
        "pairs with the lowest photo sha256, listed in the manifest's validation_pairs. 0: none held out."))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.validation_holdout, int) and self.validation_holdout >= 0):
            raise ValueError(f"validation_holdout must be an integer >= 0, got {self.validation_holdout!r}")


class ControlNetMethod(Method):
    """ControlNet (Zhang et al. 2023): a trainable copy of the denoiser's encoder (of its first transformer
    blocks for SD 3.x and Flux), joined through zero convolutions and conditioned on each photo's Canny edge
    image (the control_images asset); the base model is frozen. Output: a ControlNet folder, which loads with
    `ControlNetModel.from_pretrained(folder)` (`SD3ControlNetModel`, `FluxControlNetModel`) into the family's
    ControlNet pipeline, e.g. `StableDiffusionControlNetPipeline`, given an edge image (`image`; `control_image`
    for SD 3.x and Flux)."""
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
        models.denoiser.requires_grad_(False)
        models.controlnet = models.family.denoiser.controlnet_from(models.denoiser, models.vae_scale_factor)
        models.controlnet.train()
        return ["controlnet"]

    def prepare_data(self, models: Models, data, job) -> None:
        """A family whose ControlNet is conditioned on latents (SD 3.x, Flux): every conditioning image (and its
        mirror, for flipped rows) encoded once by the base model's VAE before training, which is then freed."""
        if not models.family.denoiser.control_latents:
            return
        from assets_pipeline.models.load import load_components

        vae = load_components(job.base_model, ("vae",)).vae.to(data.device).eval()
        data.encode_control(vae, models.scaling_factor, models.shift_factor)
        del vae

    def predict(self, models: Models, noisy_latents, timesteps, prompt_embeds, batch):
        denoiser = models.family.denoiser
        residuals = denoiser.control(models.controlnet, noisy_latents, timesteps, prompt_embeds, batch, batch.control)
        return denoiser.predict(models.denoiser, noisy_latents, timesteps, prompt_embeds, batch, residuals)

    def save(self, models: Models, load_base, out_dir: Path, cfg, ctx: TrainContext):
        models.controlnet.save_pretrained(out_dir, safe_serialization=True)
        return sorted(out_dir.glob("*.safetensors"))

    def load_pipeline(self, load_base, out_dir: Path, ctx: TrainContext):
        from assets_pipeline.models.families import diffusers_class

        family = ctx.model_family
        controlnet = diffusers_class(family.denoiser.controlnet_class).from_pretrained(str(out_dir),
                                                                                      local_files_only=True)
        return diffusers_class(family.controlnet_pipeline_class)(**load_base().components, controlnet=controlnet)

    def validation_kwargs(self, out_dir: Path, ctx: TrainContext, index: int) -> dict:
        from PIL import Image

        paths = ctx.extra["control_paths"]
        return {ctx.model_family.denoiser.control_image_argument: Image.open(paths[index % len(paths)]).convert("RGB")}


register(ControlNetMethod())
