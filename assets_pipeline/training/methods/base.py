"""What a fine-tuning method is: a config dataclass plus a few hooks on the one training loop.

The loop (``training/loop.py``) owns devices, precision, noise, timesteps, accumulation, checkpoints and
logging. A method says which weights train (``prepare``), how conditioning is built (``encode``,
``predict``), how the per-row losses are combined (``loss``), what to restore after a step (``after_step``),
how the result is saved (``save``) and how stock diffusers loads it back (``load_pipeline``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assets_pipeline.training.config import MIN_IMAGES, TrainConfig


class TrainingInputError(ValueError):
    """The concept's data does not fit the method; the message says what to fix."""


@dataclass
class Models:
    """The base model's parts as the loop uses them (frozen unless a method marks them trainable)."""

    unet: Any
    noise_scheduler: Any
    text_encoder: Any = None
    tokenizer: Any = None
    controlnet: Any = None
    scaling_factor: float = 0.18215
    vae_scale_factor: int = 8
    # SDXL's second text encoder and tokenizer (None for SD 1.x/2.x, and while no method runs the encoders).
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    family: Any = None  # the base model's families.ModelFamily (None = SD 1.x)

    @property
    def text_time(self) -> bool:
        """The U-Net takes SDXL's ``added_cond_kwargs`` (pooled text embedding + add_time_ids)."""
        return bool(self.family and self.family.text_time_conditioning)


@dataclass
class Batch:
    """One micro-batch on the training device, or the part of it in one aspect-ratio bucket (one latent shape)."""

    latents: Any  # [B, 4, h, w], already scaled by the VAE scaling factor
    prompt_embeds: Any  # [B, 77, dim] cached embeddings (None where a method re-encodes)
    control: Any = None  # [B, 3, H, W] in [0, 1] for ControlNet
    is_class: Any = None  # [B] bool: prior-preservation rows (a tensor, so no step needs a host sync)
    input_ids: Any = None  # [B, 77] token ids for methods that run the text encoder
    input_ids_2: Any = None  # [B, 77] SDXL's second tokenizer's ids, for methods that run both encoders
    pooled_embeds: Any = None  # [B, dim] SDXL's pooled text embedding (cached; encode_text replaces it), else None
    time_ids: Any = None  # [B, 6] SDXL's add_time_ids: original (h, w), crop (top, left), bucket (h, w)


@dataclass(frozen=True)
class TrainContext:
    """What a method needs to know about the concept and its data."""

    concept: str
    token: str
    class_noun: str
    resolution: int
    num_instance_images: int
    num_class_images: int = 0
    num_control_images: int = 0
    family: str = "sd1"  # the base model's family (assets_pipeline.families)
    extra: dict = field(default_factory=dict)

    @property
    def instance_prompt(self) -> str:
        return f"a photo of {self.token} {self.class_noun}".strip()

    @property
    def class_prompt(self) -> str:
        return f"a photo of a {self.class_noun}"


def encode_text(models: Models, batch: Batch):
    """The text encoder on the batch's token ids (tokenized once, on the device; per step for shuffled captions),
    for methods that train it and for ``shuffle_caption``, whose captions differ every step.

    SDXL: both encoders, as the latents cache encodes (``families.encode_sdxl_prompt``); the pooled embedding they
    give replaces the batch's cached one, which ``unet_kwargs`` passes to the U-Net (textual_inversion_sdxl.py
    likewise conditions on the pooled output of the encoder being trained)."""
    if not models.text_time:
        return models.text_encoder(batch.input_ids)[0]
    from assets_pipeline.families import encode_sdxl_prompt

    embeds, batch.pooled_embeds = encode_sdxl_prompt([models.text_encoder, models.text_encoder_2],
                                                     [batch.input_ids, batch.input_ids_2])
    return embeds


def unet_kwargs(models: Models, batch: Batch, dtype) -> dict:
    """The U-Net's extra conditioning: SDXL's ``added_cond_kwargs`` (pooled text embedding and add_time_ids, in
    the embeddings' dtype as train_dreambooth_lora_sdxl.py casts them), nothing for SD 1.x/2.x."""
    if not models.text_time:
        return {}
    if batch.pooled_embeds is None or batch.time_ids is None:
        raise ValueError("an SDXL U-Net needs the batch's pooled text embeddings and add_time_ids: the latents "
                         "bundle has none (made before SDXL support?); rematerialize vae_latents")
    return {"added_cond_kwargs": {"text_embeds": batch.pooled_embeds.to(dtype), "time_ids": batch.time_ids.to(dtype)}}


def per_sample_mse(pred, target):
    return ((pred.float() - target.float()) ** 2).mean(dim=list(range(1, pred.ndim)))


def snr_weights(noise_scheduler, timesteps, gamma: float):
    """Min-SNR-gamma weights (Hang et al. 2023), as in diffusers' train_text_to_image.py."""
    import torch
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    if noise_scheduler.config.prediction_type == "v_prediction":
        return weights / (snr + 1)
    return weights / snr


class Method:
    name: str = ""
    asset_name: str = ""
    config_cls: type[TrainConfig] = TrainConfig

    # -- inputs -------------------------------------------------------------------------------------------------
    def default_config(self, num_images: int, quick: bool) -> dict:
        """Overrides of ``config_cls`` defaults that depend on the dataset and the base model."""
        from assets_pipeline.training.config import quick_steps

        return {"max_train_steps": quick_steps(num_images), "checkpointing_steps": 2} if quick else {}

    def batch_roles(self, cfg: TrainConfig) -> tuple[str, ...]:
        """Which rows of the latents bundle a batch draws from, in equal numbers ("instance", "class")."""
        return ("instance",)

    def check_inputs(self, ctx: TrainContext, cfg: TrainConfig) -> None:
        if ctx.num_instance_images < MIN_IMAGES:
            raise TrainingInputError(
                f"{self.name} for concept {ctx.concept!r} needs at least {MIN_IMAGES} photos in the quality subset, "
                f"found {ctx.num_instance_images}: add sharp, varied photos (5-10 is the usual advice) or relax "
                "the [quality]/[scoring] settings in concept.toml"
            )

    def needs_text_encoder(self, cfg: TrainConfig) -> bool:
        """The method itself runs the text encoder(s) (trains them, or a token in them)."""
        return False

    def runs_text_encoder(self, cfg: TrainConfig) -> bool:
        """Whether the loop loads the text encoder(s) and encodes the batch's token ids every step: the method
        needs them, or ``shuffle_caption`` makes each step's captions new (frozen encoders then: only methods
        that train them mark them trainable in ``prepare``)."""
        return self.needs_text_encoder(cfg) or cfg.shuffle_caption

    def training_caption(self, caption: str, ctx: TrainContext) -> str:
        return caption

    # -- training -----------------------------------------------------------------------------------------------
    def prepare(self, models: Models, cfg: TrainConfig, ctx: TrainContext) -> list:
        """Mark what trains; return the trainable modules (the loop hands them to accelerate)."""
        raise NotImplementedError

    def encode(self, models: Models, batch: Batch):
        # Token ids are there only when the loop runs the text encoder (runs_text_encoder): encode them then.
        return encode_text(models, batch) if batch.input_ids is not None else batch.prompt_embeds

    def predict(self, models: Models, noisy_latents, timesteps, prompt_embeds, batch: Batch):
        return models.unet(noisy_latents, timesteps, encoder_hidden_states=prompt_embeds,
                           **unet_kwargs(models, batch, prompt_embeds.dtype)).sample

    def loss(self, losses, is_class, cfg: TrainConfig):
        """The step's loss from ``losses`` [B]: each row's MSE (Min-SNR-weighted when snr_gamma is set), in row
        order over every part of the batch (rows of different aspect-ratio buckets run separate forwards, so the
        loop concatenates per-row losses rather than predictions); ``is_class`` [B] marks prior rows."""
        return losses.mean()

    def after_step(self, models: Models) -> None:
        pass

    # -- output -------------------------------------------------------------------------------------------------
    def save(self, models: Models, load_base, out_dir: Path, cfg: TrainConfig, ctx: TrainContext) -> list[Path]:
        raise NotImplementedError

    def load_pipeline(self, load_base, out_dir: Path, ctx: TrainContext):
        """The trained output in a stock diffusers pipeline: ``load_base()`` gives the base pipeline, and the
        output is applied with diffusers' own loaders (what a user without this project would do), or with PEFT
        where diffusers has no loader for the format (LoRA's loha/lokr variants)."""
        raise NotImplementedError

    def validation_prompt(self, ctx: TrainContext) -> str:
        return ctx.instance_prompt

    def validation_kwargs(self, out_dir: Path, ctx: TrainContext, index: int) -> dict:
        return {}
