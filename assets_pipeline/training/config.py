"""Training configuration shared by every method, and the step count that scales with the dataset.

Method modules subclass :class:`TrainConfig` only to change defaults or add their own fields; the defaults
cite diffusers' example scripts (examples/dreambooth, examples/text_to_image, examples/textual_inversion,
examples/controlnet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MIN_IMAGES = 3


@dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
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

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "steps_per_image"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ValueError(f"max_train_steps must be >= 1, got {self.max_train_steps}")
        if self.min_train_steps > self.max_scaled_steps:
            raise ValueError("min_train_steps must not exceed max_scaled_steps")

    def total_steps(self, num_images: int) -> int:
        """The step count: explicit, else scaled with the number of training images.

        ~100 steps per image is the common DreamBooth/LoRA rule of thumb (too few underfits, many more
        overfits the handful of photos); the bounds keep tiny and large datasets sensible.
        """
        if self.max_train_steps is not None:
            return self.max_train_steps
        return min(self.max_scaled_steps, max(self.min_train_steps, self.steps_per_image * num_images))


def quick_steps(num_images: int) -> int:
    """Step count for the embedded random-weight model: enough to exercise every path, quick on a CPU."""
    return max(4, min(8, 2 * math.ceil(num_images / 2)))
