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

from assets_pipeline.concept import MIN_IMAGES
from assets_pipeline.models.families import ModelFamily, get_family
from assets_pipeline.training.config import TrainConfig


class TrainingInputError(ValueError):
    """The concept's data does not fit the method; the message says what to fix."""


@dataclass
class Models:
    """The base model's parts as the loop uses them (frozen unless a method marks them trainable), named as the
    family's pipeline names them: the denoiser (SD's ``unet``), the text encoders (``text_encoder``,
    ``text_encoder_2``) and a method's ``controlnet``."""

    family: ModelFamily
    denoiser: Any
    noise_scheduler: Any
    # In the family's order; an entry is None while no method runs that encoder (cached embeddings are used).
    text_encoders: tuple = ()
    tokenizers: tuple = ()
    controlnet: Any = None
    # What the denoiser is trained to predict, as the job's config sets it up (``objective.configured``); None =
    # the family's own.
    objective: Any = None
    scaling_factor: float = 0.18215
    shift_factor: float | None = None  # the VAE's latent shift (SD 3.x, Flux); None = none (SD, SDXL)
    vae_scale_factor: int = 8

    def network(self, name: str):
        """A network by its pipeline name (what ``Method.prepare`` returns for the trained ones)."""
        if name == self.family.denoiser.component:
            return self.denoiser
        if name == "controlnet":
            return self.controlnet
        if name in self.family.text_encoder_names:
            return self.text_encoders[self.family.text_encoder_names.index(name)]
        raise KeyError(f"{name!r} is not a network of a {self.family.name} model: "
                       f"{[self.family.denoiser.component, *self.family.text_encoder_names, 'controlnet']}")

    def set_network(self, name: str, module) -> None:
        """Put ``module`` in ``name``'s place (a new tuple for an encoder: a shallow copy keeps the old one)."""
        if name == self.family.denoiser.component:
            self.denoiser = module
        elif name == "controlnet":
            self.controlnet = module
        else:
            self.network(name)  # a KeyError for a name the family does not have
            i = self.family.text_encoder_names.index(name)
            self.text_encoders = (*self.text_encoders[:i], module, *self.text_encoders[i + 1:])

    def networks(self) -> dict[str, Any]:
        """Every network loaded, by name: the denoiser, a ControlNet, the text encoders a method runs."""
        named = {self.family.denoiser.component: self.denoiser, "controlnet": self.controlnet,
                 **dict(zip(self.family.text_encoder_names, self.text_encoders))}
        return {name: module for name, module in named.items() if module is not None}

    @classmethod
    def load(cls, ref, with_text_encoders: bool, denoiser_kwargs: dict | None = None) -> Models:
        """The denoiser, the training noise scheduler (the family objective's, from the pipeline's scheduler
        config, as diffusers' scripts build it), the VAE's scaling numbers and the tokenizers of the resolved base
        model ``ref``; the text encoders only when a method runs them. ``denoiser_kwargs``: how the denoiser
        loads (a quantized base: training/quantization.py)."""
        from assets_pipeline.models.families import diffusers_class
        from assets_pipeline.models.load import load_components

        family = ref.model_family
        parts = load_components(ref, ("denoiser", "tokenizers", *(("text_encoders",) if with_text_encoders else ())),
                                denoiser_kwargs)
        return cls(
            family=family, denoiser=parts.denoiser,
            noise_scheduler=diffusers_class(family.objective.scheduler_class).from_config(parts.scheduler_config),
            text_encoders=parts.text_encoders or (None,) * family.num_text_encoders, tokenizers=parts.tokenizers,
            scaling_factor=parts.vae_config.scaling_factor,
            shift_factor=getattr(parts.vae_config, "shift_factor", None),
            vae_scale_factor=2 ** (len(parts.vae_config.block_out_channels) - 1))


@dataclass
class Batch:
    """One micro-batch on the training device, or the part of it in one aspect-ratio bucket (one latent shape)."""

    latents: Any  # [B, C, h, w], already scaled by the VAE scaling factor
    prompt_embeds: Any  # [B, 77, dim] cached embeddings (replaced where a method re-encodes)
    control: Any = None  # [B, 3, H, W] in [0, 1] for ControlNet
    is_class: Any = None  # [B] bool: prior-preservation rows (a tensor, so no step needs a host sync)
    token_ids: tuple | None = None  # [B, 77] per tokenizer, for methods that run the text encoders
    pooled_embeds: Any = None  # [B, dim] a pooled text embedding (SDXL; cached, re-encoding replaces it), else None
    time_ids: Any = None  # [B, 6] SDXL's add_time_ids: original (h, w), crop (top, left), bucket (h, w)


@dataclass(frozen=True)
class TrainContext:
    """What a method needs to know about the concept and its data (``training/plan.py`` builds it for a job)."""

    concept: str
    token: str
    class_noun: str
    resolution: int
    num_instance_images: int
    num_class_images: int = 0
    num_control_images: int = 0
    family: str = "sd1"  # the base model's family (models/families.py)
    extra: dict = field(default_factory=dict)

    @property
    def model_family(self) -> ModelFamily:
        return get_family(self.family)

    @property
    def instance_prompt(self) -> str:
        return f"a photo of {self.token} {self.class_noun}".strip()

    @property
    def class_prompt(self) -> str:
        return f"a photo of a {self.class_noun}"


def encode_text(models: Models, batch: Batch):
    """The text encoders on the batch's token ids (tokenized once, on the device; per step for shuffled captions),
    for methods that train them and for ``shuffle_caption``, whose captions differ every step, as the latents
    cache encodes (``ModelFamily.encode_prompt``). A pooled embedding (SDXL) replaces the batch's cached one,
    which the denoiser then takes (textual_inversion_sdxl.py likewise conditions on the pooled output of the
    encoder being trained)."""
    embeds, pooled = models.family.encode_prompt(models.text_encoders, batch.token_ids)
    if pooled is not None:
        batch.pooled_embeds = pooled
    return embeds


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
        try:
            ctx.model_family.objective.configured(cfg)
        except ValueError as e:
            raise TrainingInputError(f"[{self.name}] for concept {ctx.concept!r} on a {ctx.family} base model: {e}") \
                from e
        if ctx.num_instance_images < MIN_IMAGES:
            raise TrainingInputError(
                f"{self.name} for concept {ctx.concept!r} needs at least {MIN_IMAGES} photos in the quality subset, "
                f"found {ctx.num_instance_images}: add sharp, varied photos (5-10 is the usual advice) or relax "
                "the [quality]/[scoring] settings in concept.toml"
            )

    def check_model(self, ref, cfg: TrainConfig, concept: str) -> None:
        """Settings checked against the base model's shapes (``ref``: a resolved BaseModelRef; its configs only,
        no weights read), before a trainer starts: a :class:`TrainingInputError` naming the setting if one cannot
        apply to this model. Nothing by default."""

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
    def prepare_data(self, models: Models, data, job) -> None:
        """Anything the method derives from the training data once, with the base model, before the first step
        (ControlNet on a latent-conditioned family: the conditioning images' latents)."""

    def prepare(self, models: Models, cfg: TrainConfig, ctx: TrainContext) -> list:
        """Mark what trains; return the trainable modules (the loop hands them to accelerate)."""
        raise NotImplementedError

    def encode(self, models: Models, batch: Batch):
        # Token ids are there only when the loop runs the text encoder (runs_text_encoder): encode them then.
        return encode_text(models, batch) if batch.token_ids is not None else batch.prompt_embeds

    def predict(self, models: Models, noisy_latents, timesteps, prompt_embeds, batch: Batch):
        """The denoiser's prediction, called as the base model's family calls it."""
        return models.family.denoiser.predict(models.denoiser, noisy_latents, timesteps, prompt_embeds, batch)

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
