"""The one training loop every method runs on (nanoGPT-style: reads top to bottom, no callbacks).

It reads cached latents and text embeddings, so no step runs the VAE encoder, and the text encoder runs only
for methods that train the text side. accelerate owns device placement, mixed precision, gradient
accumulation and (under ``accelerate launch``) data-parallel training; checkpoints are accelerate states.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from assets_pipeline.training.data import TrainingData, seeded_generator
from assets_pipeline.training.job import TrainJob
from assets_pipeline.training.methods import get_method
from assets_pipeline.training.methods.base import Method, Models, TrainContext, snr_weights
from assets_pipeline.training.models import load_training_models

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    method: Method
    cfg: object
    ctx: TrainContext
    models: Models
    losses: list[float]
    steps: int
    resumed_from: int
    is_main_process: bool = True


def train_context(job: TrainJob) -> TrainContext:
    rows = job.training_images
    return TrainContext(
        concept=job.concept, token=job.token, class_noun=job.class_noun,
        resolution=job.base_model["resolution"],
        num_instance_images=sum(r["role"] == "instance" for r in rows),
        num_class_images=sum(r["role"] == "class" for r in rows),
        num_control_images=sum(bool(r.get("control_path")) for r in rows if r["role"] == "instance"),
        extra={"control_paths": [r["control_path"] for r in rows if r.get("control_path")]},
    )


def checkpoint_root(job: TrainJob) -> Path:
    """Checkpoints of exactly this job (same method, config, base model and training rows)."""
    return Path(job.checkpoint_dir) / job.identity()[:16]


def _latest_checkpoint(root: Path) -> tuple[int, Path] | None:
    done = [(int(p.name.split("-")[1]), p) for p in root.glob("step-*") if (p / "losses.json").is_file()]
    return max(done) if done else None


def compute_loss(method: Method, models: Models, batch, cfg, generator, device, weight_dtype):
    """The step every method shares: noise, timesteps, add_noise, predict, loss (DDPM's objective, Ho et al.
    2020, as in diffusers' training scripts). Methods change only what they override (encode/predict/loss)."""
    import torch

    scheduler = models.noise_scheduler
    latents = batch.latents.to(device, weight_dtype)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    timesteps = timesteps.to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    v_pred = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(latents, noise, timesteps) if v_pred else noise
    batch.prompt_embeds = batch.prompt_embeds.to(device, weight_dtype)
    if batch.control is not None:
        batch.control = batch.control.to(device)
    embeds = method.encode(models, batch).to(weight_dtype)
    pred = method.predict(models, noisy, timesteps, embeds, batch)
    weights = snr_weights(scheduler, timesteps, cfg.snr_gamma) if cfg.snr_gamma else None
    return method.loss(pred, target, batch, cfg, weights)


def train(job: TrainJob, progress: Callable[[str], None] = log.info) -> TrainState:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    method = get_method(job.method)
    cfg = method.config_cls(**job.config)
    ctx = train_context(job)
    method.check_inputs(ctx, cfg)
    cpu = job.device == "cpu" or (job.device == "auto" and not torch.cuda.is_available())
    precision = job.mixed_precision
    if precision == "auto":
        precision = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(mixed_precision=precision, cpu=cpu,
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)

    set_seed(cfg.seed)  # adapter/ControlNet initialization; batches and noise have their own seeded generators
    models = load_training_models(job.base_model, method.needs_text_encoder(cfg))
    data = TrainingData.from_bundle(Path(job.latents_dir), job.training_images, lambda c: method.training_caption(c, ctx),
                        control=job.method == "controlnet", resolution=ctx.resolution)
    trainable = method.prepare(models, cfg, ctx)
    for name in ("unet", "text_encoder", "controlnet"):
        module = getattr(models, name)
        if module is None:
            continue
        # Frozen parts run in the low-precision dtype; trainable ones keep fp32 master weights (as diffusers).
        module.to(accelerator.device, dtype=torch.float32 if name in trainable else weight_dtype)
        if cfg.gradient_checkpointing and name in trainable and hasattr(module, "enable_gradient_checkpointing"):
            module.enable_gradient_checkpointing()
    trainable_modules = [getattr(models, n) for n in trainable]
    cast_training_params(trainable_modules, dtype=torch.float32)
    params = [p for m in trainable_modules for p in m.parameters() if p.requires_grad]

    steps = cfg.total_steps(ctx.num_instance_images)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer,
                                 num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=steps * accelerator.num_processes)
    *prepared, optimizer, lr_scheduler = accelerator.prepare(*trainable_modules, optimizer, lr_scheduler)
    for name, module in zip(trainable, prepared):
        setattr(models, name, module)

    ckpt_root = checkpoint_root(job)
    start, losses = 0, []
    if latest := _latest_checkpoint(ckpt_root):
        start, path = latest
        accelerator.load_state(str(path))
        losses = json.loads((path / "losses.json").read_text())
        progress(f"resumed from checkpoint at step {start} ({path})")

    roles = method.batch_roles(cfg)
    n_procs, accum = accelerator.num_processes, cfg.gradient_accumulation_steps
    progress(f"training {method.name} for {ctx.concept!r}: {steps} steps, {ctx.num_instance_images} images, "
             f"batch {cfg.train_batch_size}x{accum}x{n_procs}, precision {precision}, device {accelerator.device}")
    for step in range(start, steps):
        step_loss = 0.0
        for micro in range(accum):
            sample = ((step * accum + micro) * n_procs + accelerator.process_index) * cfg.train_batch_size
            batch = data.batch(roles, cfg.train_batch_size, sample, cfg.seed, models.scaling_factor, cfg.random_flip)
            g = seeded_generator("diffusion-noise", cfg.seed, sample)
            with accelerator.accumulate(*prepared), accelerator.autocast():
                loss = compute_loss(method, models, batch, cfg, g, accelerator.device, weight_dtype)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            method.after_step(models)
            step_loss += loss.detach().item() / accum  # .item() is a device sync: once per micro-batch, not per op
        losses.append(step_loss)
        progress(f"step {step + 1}/{steps} loss {step_loss:.5f} lr {lr_scheduler.get_last_lr()[0]:.2e}")
        if (step + 1) % cfg.checkpointing_steps == 0 and step + 1 < steps:
            _save_checkpoint(accelerator, ckpt_root, step + 1, losses, cfg.checkpoints_total_limit)

    accelerator.wait_for_everyone()
    for name in trainable:
        setattr(models, name, accelerator.unwrap_model(getattr(models, name)))
    return TrainState(method, cfg, ctx, models, losses, steps, start, accelerator.is_main_process)


def _save_checkpoint(accelerator, root: Path, step: int, losses: list[float], keep: int) -> None:
    """An accelerate state (models, optimizer, LR schedule, RNG) plus the loss history, renamed into place."""
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "losses.json").write_text(json.dumps(losses))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
            shutil.rmtree(old)
