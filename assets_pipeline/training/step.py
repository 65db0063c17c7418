"""The step every method shares, and how its networks and batch are laid out.

``compute_loss`` is the one forward pass: noise, timesteps, the noisy input, the prediction and the per-row loss,
as diffusers' training scripts compute them. What the denoiser is trained to predict is the base model's family's
(``ModelFamily.objective``); methods change only what they override (encode, predict, loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from assets_pipeline.training.methods.base import Batch, Method, Models
from assets_pipeline.training.quantization import is_quantized


def per_sample_mse(pred, target):
    return ((pred.float() - target.float()) ** 2).mean(dim=list(range(1, pred.ndim)))


@dataclass
class PartInputs:
    """One part of a micro-batch made ready for the denoiser: its batch, its noise draw (noisy input, timesteps,
    target) and its conditioning, in the precision the step runs in."""

    batch: Batch
    noised: Any  # the objective's Noised
    embeds: Any


def objective_of(models: Models):
    """What the denoiser is trained to predict: the job's configured objective, else the family's."""
    return models.objective if models.objective is not None else models.family.objective


def part_inputs(method: Method, models: Models, batch: Batch, cfg, generator, weight_dtype,
                channels_last=False) -> PartInputs:
    """Everything of one part's step up to the prediction: the noise (with ``cfg.noise_offset`` and
    ``cfg.input_perturbation`` drawn in diffusers' train_text_to_image.py order, only when set), the timesteps and
    noisy input (the objective's, drawn from ``generator`` after the noise) and the method's conditioning."""
    import torch

    latents = batch.latents.to(weight_dtype)
    if channels_last:
        latents = latents.contiguous(memory_format=torch.channels_last)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if cfg.noise_offset:  # a per-(sample, channel) constant: lets the model shift an image's mean brightness
        noise = noise + cfg.noise_offset * torch.randn(
            (*latents.shape[:2], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
    noise_in = noise  # what the latents are noised with; the target stays ``noise``
    if cfg.input_perturbation:
        noise_in = noise + cfg.input_perturbation * torch.randn(
            noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
    noised = objective_of(models).noisy_input(models.noise_scheduler, latents, noise, noise_in, generator)
    batch.prompt_embeds = batch.prompt_embeds.to(weight_dtype)
    embeds = method.encode(models, batch).to(weight_dtype)
    return PartInputs(batch, noised, embeds)


def part_losses(models: Models, pred, inputs: PartInputs, cfg):
    """Each row's loss [B] of one part from the denoiser's prediction ``pred``: the objective's MSE to its target,
    Min-SNR- (``cfg.snr_gamma``) or flow-matching-weighted where the objective weights it."""
    objective = objective_of(models)
    row_losses = per_sample_mse(objective.prediction(pred, inputs.noised), inputs.noised.target)
    if (weights := objective.loss_weights(models.noise_scheduler, inputs.noised, cfg.snr_gamma)) is not None:
        row_losses = row_losses * weights
    return row_losses


def compute_loss(method: Method, models: Models, parts: list, cfg, generator, weight_dtype, channels_last=False):
    """The step's loss. ``parts``: the micro-batch, one :class:`Batch` per latent shape (aspect-ratio bucket;
    usually one), each a forward of its own; their per-row losses are concatenated for ``method.loss``. The batch
    is on the device and the noise is drawn there from ``generator``: no host round trip. ``cfg.noise_offset`` and
    ``cfg.input_perturbation`` are diffusers' train_text_to_image.py recipes, drawn in that script's order and
    only when set, so without them the draws are exactly those of the plain step. The stages, :func:`part_inputs`,
    ``method.predict`` and :func:`part_losses`, are the pack trainer's too (training/pack.py), which runs the
    predictions of several concepts' parts in one forward."""
    import torch

    losses, is_class = [], []
    for batch in parts:
        inputs = part_inputs(method, models, batch, cfg, generator, weight_dtype, channels_last)
        pred = method.predict(models, inputs.noised.noisy, inputs.noised.timesteps, inputs.embeds, batch)
        losses.append(part_losses(models, pred, inputs, cfg))
        is_class.append(batch.is_class)
    return method.loss(torch.cat(losses), torch.cat(is_class), cfg)


def place_networks(models: Models, trainable: list[str], device, weight_dtype, cfg, channels_last: bool) -> None:
    """Frozen weights in the low-precision dtype, trained ones as fp32 master weights (diffusers' scripts and
    ``cast_training_params``): a LoRA leaves the U-Net's own weights in bf16, DreamBooth trains them in fp32."""
    import torch
    from diffusers.training_utils import cast_training_params

    for name, module in models.networks().items():
        if name not in trainable:  # frozen means no weight gradients at all (textual inversion's U-Net too)
            module.requires_grad_(False)
        fully_trained = name in trainable and all(p.requires_grad for p in module.parameters())
        if is_quantized(module):  # loaded in its dtype (training/quantization.py), which cannot change now
            module.to(device)
        else:
            module.to(device, dtype=torch.float32 if fully_trained else weight_dtype)
        if name in trainable:
            cast_training_params(module, dtype=torch.float32)
            if cfg.gradient_checkpointing and hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()
        if channels_last and name in (models.family.denoiser.component, "controlnet"):
            module.to(memory_format=torch.channels_last)


def per_process_batch(train_batch_size: int, accumulation: int, num_processes: int) -> tuple[int, int]:
    """(micro-batch, accumulation steps) for each of ``num_processes`` data-parallel processes, keeping the
    configured effective batch ``train_batch_size x accumulation`` per optimizer step: the config says what is
    learned, the number of GPUs only how fast (unlike diffusers' scripts, where the batch is per process).

    The accumulation steps are split first: each process then runs exactly the micro-batches (rows and noise)
    that one process would, so N processes learn what one does up to float rounding. Otherwise the micro-batch
    is split (the same rows per step, other noise draws)."""
    effective = train_batch_size * accumulation
    if effective % num_processes:
        raise ValueError(
            f"the effective batch (train_batch_size {train_batch_size} x gradient_accumulation_steps "
            f"{accumulation} = {effective}) cannot be split over {num_processes} processes: make it a multiple "
            f"of {num_processes} (e.g. gradient_accumulation_steps = {accumulation * num_processes}) or train "
            "with fewer processes")
    if accumulation % num_processes == 0:
        return train_batch_size, accumulation // num_processes
    micro = math.gcd(train_batch_size, effective // num_processes)
    return micro, effective // num_processes // micro
