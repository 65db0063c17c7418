"""The optimizer a training config names (``TrainConfig.optimizer``): AdamW, bitsandbytes' 8-bit AdamW, or Prodigy.

All three take the same betas, eps and weight decay, as diffusers'
examples/advanced_diffusion_training/train_dreambooth_lora_sd15_advanced.py builds them (AdamW or AdamW8bit with
--use_8bit_adam, or prodigyopt.Prodigy with its beta3, decouple, bias-correction and safeguard-warmup settings).
"""

from __future__ import annotations

import importlib.util
import logging

from assets_pipeline.training.config import TrainConfig
from assets_pipeline.training.methods.base import TrainingInputError

log = logging.getLogger(__name__)


def check_optimizer(cfg: TrainConfig, cuda: bool, section: str) -> None:
    """Refuse, before any model is loaded, an optimizer this trainer cannot run; ``section``: the concept.toml
    section the config came from (the method's name)."""
    if cfg.optimizer != "adamw_8bit":
        return
    where = f'[{section}] optimizer = "adamw_8bit"'
    if not cuda:
        raise TrainingInputError(
            f"{where} needs a CUDA GPU: bitsandbytes' 8-bit AdamW keeps and updates its quantized states with CUDA "
            'kernels, and this trainer runs on the CPU. Set optimizer = "adamw" in that section, or train on a '
            "machine with an NVIDIA GPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TrainingInputError(
            f"{where} needs the bitsandbytes package, which is not installed in this environment: "
            'pip install bitsandbytes, or set optimizer = "adamw" in that section')


def make_optimizer(cfg: TrainConfig, params: list, fused: bool):
    """The configured optimizer over ``params``; ``fused``: torch's fused AdamW kernel (AdamW on CUDA only)."""
    import torch

    common = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                  weight_decay=cfg.adam_weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **common, **({"fused": True} if fused else {}))
    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **common)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate, as the Flux fine-tuning recipes use it (relative_step would ignore ours).
        return Adafactor(params, lr=cfg.learning_rate, scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=cfg.adam_weight_decay)
    from prodigyopt import Prodigy

    if cfg.learning_rate <= 0.1:  # the advanced script's warning: Prodigy's lr multiplies its own estimate
        log.warning("learning_rate = %s is too low for Prodigy: it estimates the step size itself, and "
                    "learning_rate scales that estimate; set learning_rate = 1.0 (diffusers' advanced training "
                    "scripts)", cfg.learning_rate)
    return Prodigy(params, **common, beta3=cfg.prodigy_beta3, decouple=cfg.prodigy_decouple,
                   use_bias_correction=cfg.prodigy_use_bias_correction,
                   safeguard_warmup=cfg.prodigy_safeguard_warmup)


def state_bytes(cfg: TrainConfig, params: list) -> int:
    """Bytes of optimizer state the first step allocates (what the micro-batch probe leaves room for): AdamW's two
    fp32 moments per parameter, AdamW8bit's two 8-bit ones, Prodigy's four fp32 tensors (exp_avg, exp_avg_sq, s
    and the initial weights p0), Adafactor's factored second moment (a row and a column per matrix; a vector's
    full)."""
    if cfg.optimizer == "adafactor":  # transformers' Adafactor: exp_avg_sq_row (shape[:-1]), _col (shape[:-2] + [-1])
        return sum(4 * (p.numel() // p.shape[-1] + p.numel() // p.shape[-2] if p.ndim >= 2 else p.numel())
                   for p in params)
    per_value = {"adamw": 2 * 4, "adamw_8bit": 2 * 1, "prodigy": 4 * 4}[cfg.optimizer]
    return sum(per_value * p.numel() for p in params)
