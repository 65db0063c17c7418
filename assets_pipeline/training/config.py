"""Training configuration shared by every method, and the step count that scales with the dataset.

Method modules subclass :class:`TrainConfig` only to change defaults or add their own fields; the defaults
cite diffusers' example scripts (examples/dreambooth, examples/text_to_image, examples/textual_inversion,
examples/controlnet). The training recipes (noise offset, input perturbation, caption dropout and shuffling, EMA,
the optimizer) are fields here, so every method's ``concept.toml`` section takes them; each is off by default,
which trains exactly as without it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

OPTIMIZERS = ("adamw", "adamw_8bit", "prodigy", "adafactor")
SELECT_BEST = ("none", "clip_i", "clip_t")
# diffusers' SD3/Flux scripts' --weighting_scheme choices (compute_density_for_timestep_sampling draws uniform
# timesteps for all but logit_normal and mode; compute_loss_weighting_for_sd3 weights only sigma_sqrt and cosmap).
WEIGHTING_SCHEMES = ("logit_normal", "mode", "none", "sigma_sqrt", "cosmap")


def added_field(default, help: str):
    """A field added after outputs were trained: it enters a job's identity only when set to something other than
    its default (:func:`identity_config`), so an output trained before it existed is still the one its job makes."""
    return field(default=default, metadata={"help": help, "identity_when_set": True})


def identity_config(cfg) -> dict:
    """The config as it enters a job's identity: every field, less :func:`added_field` fields at their default."""
    out = asdict(cfg)
    for f in fields(cfg):
        if f.metadata.get("identity_when_set") and getattr(cfg, f.name) == f.default:
            del out[f.name]
    return out


@dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = field(default=1e-4, metadata={"help": (
        "The optimizer's learning rate; with optimizer = 'prodigy' a multiplier of its own estimate (use 1.0).")})
    train_batch_size: int = field(default=1, metadata={"help": "Images per micro-batch (per process)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_train_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps; None = steps_per_image x images, within the bounds below."}
    )
    steps_per_image: int = field(default=100, metadata={"help": "Scales steps with the dataset (~100/image)."})
    min_train_steps: int = field(default=200, metadata={"help": "Lower bound of the scaled step count."})
    max_scaled_steps: int = field(default=3000, metadata={"help": "Upper bound of the scaled step count."})
    lr_scheduler: str = field(default="constant", metadata={"help": "diffusers.optimization.get_scheduler name."})
    lr_warmup_steps: int = field(default=0, metadata={"help": "Warm-up steps of the LR schedule."})
    adam_weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay (diffusers: 1e-2)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (diffusers: 1.0)."})
    snr_gamma: float | None = field(
        default=None, metadata={"help": "Min-SNR loss weighting gamma (Hang et al. 2023; 5.0 recommended)."}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for activation memory."})
    checkpointing_steps: int = field(default=500, metadata={"help": "Save a resumable checkpoint every N steps."})
    checkpoints_total_limit: int = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    seed: int = field(default=0, metadata={"help": "Seeds data order, noise and timesteps."})
    random_flip: bool = field(default=False, metadata={"help": "Use cached flipped latents half of the time."})
    validation_steps: int = field(default=0, metadata={"help": (
        "Every N optimizer steps (and at the last step) render the final validation's fixed prompts and seeds with "
        "the weights being trained, as diffusers' train_dreambooth.py and train_controlnet.py --validation_steps "
        "do; the images and one labeled strip per step land in the output's validation_steps/ folder, listed in "
        "validation_steps.json/.csv. Costs one save, one pipeline load and one batch of renders per validation. "
        "0 = off.")})
    select_best: str = field(default="none", metadata={"help": (
        f"One of {SELECT_BEST}. With validation_steps, the output's weights are those of the validated step with "
        "the highest mean CLIP-I (likeness to the training photos) or CLIP-T (agreement with the prompt), the "
        "DreamBooth paper's metrics (Ruiz et al. 2022, section 4.1), instead of the last step's: an early stop "
        "chosen after the fact. The chosen step is recorded in metrics.json and lineage.json. 'none' = the last "
        "step.")})
    # -- flow matching (SD 3.x, Flux) --------------------------------------------------------------------------
    weighting_scheme: str | None = added_field(None, (
        f"Flow-matching families only: how training timesteps are drawn and losses weighted, one of "
        f"{WEIGHTING_SCHEMES} (diffusers' train_dreambooth_lora_sd3.py / _flux.py --weighting_scheme): logit_normal "
        "(Esser et al. 2024: middle noise levels most often), mode (heavy tails), none (uniform, unweighted), "
        "sigma_sqrt and cosmap (uniform, weighted). None = the family's: SD 3.x logit_normal, Flux none (each "
        "script's default). A DDPM family (SD, SDXL) refuses it (use snr_gamma there)."))
    logit_mean: float = added_field(0.0, "weighting_scheme = logit_normal: the normal's mean (diffusers: 0).")
    logit_std: float = added_field(1.0, "weighting_scheme = logit_normal: the normal's std (diffusers: 1).")
    mode_scale: float = added_field(1.29, "weighting_scheme = mode: its scale (diffusers: 1.29).")
    # -- recipes ---------------------------------------------------------------------------------------------
    noise_offset: float = field(default=0.0, metadata={"help": (
        "Adds noise_offset x a per-channel constant (one N(0, 1) draw per sample and channel) to the noise, so the "
        "model learns to change an image's mean brightness (Guttenberg, crosslabs.org 'Diffusion with offset "
        "noise'); diffusers' train_text_to_image.py --noise_offset (default 0; 0.05-0.1 is usual). 0 = off.")})
    input_perturbation: float = field(default=0.0, metadata={"help": (
        "Noisy latents are made from noise + input_perturbation x N(0, 1) while the target stays the noise (Ning "
        "et al. 2023, 'Input Perturbation Reduces Exposure Bias in Diffusion Models'); diffusers' "
        "train_text_to_image.py --input_perturbation ('Recommended 0.1'). 0 = off.")})
    caption_dropout: float = field(default=0.0, metadata={"help": (
        "Share of samples trained with the empty caption, so the model also learns the unconditional prediction "
        "that classifier-free guidance subtracts (kohya-ss sd-scripts' caption_dropout_rate, SimpleTuner's "
        "caption_dropout_probability). With cached embeddings the latents bundle's empty-prompt embedding is "
        "used (rematerialize vae_latents if the bundle predates it). 0 = off.")})
    shuffle_caption: bool = field(default=False, metadata={"help": (
        "For tag-style captions ('a, b, c'): split on ',' and shuffle the tags after the first keep_tokens, per "
        "sample and step (kohya-ss sd-scripts' --shuffle_caption). The shuffled captions are encoded every step, "
        "so the frozen text encoder(s) are loaded and cost one text-encoder forward per step.")})
    keep_tokens: int = field(default=0, metadata={"help": (
        "With shuffle_caption: how many leading tags stay in place, e.g. 1 keeps the trigger word first "
        "(kohya-ss sd-scripts' --keep_tokens, counted in ','-separated tags as there).")})
    use_ema: bool = field(default=False, metadata={"help": (
        "Keep an exponential moving average of the trained weights (diffusers.training_utils.EMAModel, as "
        "train_text_to_image.py --use_ema), updated after each optimizer step and saved in checkpoints; the "
        "output holds the EMA weights. Costs one more copy of the trained weights in memory.")})
    ema_decay: float = field(default=0.9999, metadata={"help": (
        "EMAModel's decay (its default and train_text_to_image.py's); EMAModel ramps it up as (1 + n) / (10 + n) "
        "over the first optimizer steps n, so short runs average over fewer steps.")})
    optimizer: str = field(default="adamw", metadata={"help": (
        f"One of {OPTIMIZERS}. 'adamw': torch.optim.AdamW (fused on CUDA when the speed settings allow). "
        "'adamw_8bit': bitsandbytes' AdamW8bit (diffusers' scripts' --use_8bit_adam; CUDA only, needs "
        "bitsandbytes): 8-bit optimizer states, a quarter of AdamW's memory. 'prodigy': prodigyopt.Prodigy, "
        "which estimates the step size itself; set learning_rate = 1.0 (diffusers' "
        "advanced_diffusion_training scripts, --optimizer prodigy). 'adafactor': transformers' Adafactor with a "
        "fixed learning rate (no relative step or parameter scaling, as kohya-ss sd-scripts and SimpleTuner "
        "fine-tune Flux with it): factored second moments, a fraction of AdamW's state, for DreamBooth of a "
        "12 B-parameter transformer.")})
    adam_beta1: float = field(default=0.9, metadata={"help": (
        "beta1 of AdamW, AdamW8bit and Prodigy (torch's default and diffusers' scripts').")})
    adam_beta2: float = field(default=0.999, metadata={"help": (
        "beta2 of AdamW, AdamW8bit and Prodigy (torch's default and diffusers' scripts').")})
    adam_epsilon: float = field(default=1e-8, metadata={"help": (
        "eps of AdamW, AdamW8bit and Prodigy (torch's default and diffusers' scripts').")})
    prodigy_beta3: float | None = field(default=None, metadata={"help": (
        "Prodigy's step-size running-average coefficient; None = sqrt(adam_beta2) (prodigyopt's default, and "
        "train_dreambooth_lora_sd15_advanced.py's). Ignored unless optimizer = 'prodigy'.")})
    prodigy_decouple: bool = field(default=True, metadata={"help": (
        "Prodigy: AdamW-style decoupled weight decay (train_dreambooth_lora_sd15_advanced.py's default). Ignored "
        "unless optimizer = 'prodigy'.")})
    prodigy_use_bias_correction: bool = field(default=True, metadata={"help": (
        "Prodigy: Adam's bias correction (train_dreambooth_lora_sd15_advanced.py's default). Ignored unless "
        "optimizer = 'prodigy'.")})
    prodigy_safeguard_warmup: bool = field(default=True, metadata={"help": (
        "Prodigy: leave the LR out of the D estimate's denominator during warm-up "
        "(train_dreambooth_lora_sd15_advanced.py's default). Ignored unless optimizer = 'prodigy'.")})

    def __post_init__(self) -> None:
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**32):
            raise ValueError(f"seed must be an integer in 0..{2**32 - 1} (accelerate's set_seed seeds NumPy too, "
                             f"which takes 32 bits), got {self.seed}")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "steps_per_image"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ValueError(f"max_train_steps must be >= 1, got {self.max_train_steps}")
        if self.min_train_steps > self.max_scaled_steps:
            raise ValueError("min_train_steps must not exceed max_scaled_steps")
        for name in ("noise_offset", "input_perturbation"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)!r} is outside [0, 1): it scales extra noise "
                                 "(0 = off; diffusers' scripts suggest about 0.1)")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout = {self.caption_dropout!r} is outside [0, 1): it is the share of "
                             "samples trained with the empty caption (0 = off; 0.05-0.1 is usual)")
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens = {self.keep_tokens!r} must be >= 0 (leading tags kept in place)")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay = {self.ema_decay!r} is outside (0, 1) (EMAModel's default is 0.9999)")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer = {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.validation_steps < 0:
            raise ValueError(f"validation_steps = {self.validation_steps!r} must be >= 0 (validate every N optimizer "
                             "steps; 0 = off)")
        if self.weighting_scheme is not None and self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme = {self.weighting_scheme!r} is not one of {WEIGHTING_SCHEMES} "
                             "(or unset: the family's)")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std = {self.logit_std!r} must be > 0")
        if self.select_best not in SELECT_BEST:
            raise ValueError(f"select_best = {self.select_best!r} is not one of {SELECT_BEST}")
        if self.select_best != "none" and not self.validation_steps:
            raise ValueError(f"select_best = {self.select_best!r} chooses among the steps validated during training: "
                             "set validation_steps > 0 too (e.g. validation_steps = 100)")
        for name in ("adam_beta1", "adam_beta2") + (("prodigy_beta3",) if self.prodigy_beta3 is not None else ()):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)!r} is outside [0, 1)")

    def total_steps(self, num_images: int) -> int:
        """The step count: explicit, else scaled with the number of training images.

        ~100 steps per image is the common DreamBooth/LoRA rule of thumb (too few underfits, many more
        overfits the handful of photos); the bounds keep tiny and large datasets sensible.
        """
        if self.max_train_steps is not None:
            return self.max_train_steps
        return min(self.max_scaled_steps, max(self.min_train_steps, self.steps_per_image * num_images))


BATCH_FIELDS = ("train_batch_size", "gradient_accumulation_steps")


def batch_for_processes(cfg: TrainConfig, set_keys, num_processes: int) -> dict:
    """Overrides that let ``num_processes`` data-parallel processes split the default effective batch
    (``train_batch_size x gradient_accumulation_steps``, which each optimizer step averages over; 1 x 1 by default):
    where the concept's section sets neither of :data:`BATCH_FIELDS` (``set_keys``: the keys it sets) and the
    default does not divide by ``num_processes``, the accumulation steps grow to the least multiple that does
    (1 x 1 on 2 processes: 1 x 2, one micro-batch per process and step, as diffusers' scripts run by default).
    The chosen value is the job's config like any other (its identity, lineage.json). A batch the concept sets
    is kept as set: one that cannot be split is refused by :func:`training.step.per_process_batch`."""
    if num_processes <= 1 or set(BATCH_FIELDS) & set(set_keys):
        return {}
    effective = cfg.train_batch_size * cfg.gradient_accumulation_steps
    factor = num_processes // math.gcd(effective, num_processes)
    return {"gradient_accumulation_steps": cfg.gradient_accumulation_steps * factor} if factor > 1 else {}


def quick_steps(num_images: int) -> int:
    """Step count for the embedded random-weight model: enough to exercise every path, quick on a CPU."""
    return max(4, min(8, 2 * math.ceil(num_images / 2)))
