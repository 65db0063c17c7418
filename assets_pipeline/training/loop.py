"""The one training loop every method runs on (nanoGPT-style: reads top to bottom, no callbacks).

It reads cached latents and text embeddings, so no step runs the VAE encoder, and the text encoder runs only
for methods that train the text side. accelerate owns device placement, mixed precision, gradient
accumulation and (under ``accelerate launch``) data-parallel training; checkpoints are accelerate states
(``checkpoints.py``). The step itself is ``step.compute_loss``; everything that only makes it faster or measures
it is behind ``runtime.Runtime``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from assets_pipeline.training.checkpoints import checkpoint_root, resume, save_checkpoint
from assets_pipeline.training.data import TrainingData, seeded_generator
from assets_pipeline.training.job import TrainJob
from assets_pipeline.training.methods import get_method
from assets_pipeline.training.methods.base import Method, Models, TrainContext
from assets_pipeline.training.optimizers import check_optimizer, make_optimizer
from assets_pipeline.training.plan import train_context
from assets_pipeline.training.quantization import (check_quantization, loading_kwargs, quantize_loaded,
                                                   quantized_bytes)
from assets_pipeline.training.runtime import Runtime
from assets_pipeline.training.step import compute_loss, per_process_batch, place_networks
from assets_pipeline.training.validation import StepValidation, validation_due

log = logging.getLogger(__name__)


class DivergedTraining(RuntimeError):
    """Training produced a non-finite loss or non-finite weights: it stops, and nothing it made is saved."""


def _remedy(job: TrainJob) -> str:
    lr = job.config.learning_rate
    return (f"Nothing from this run was saved or made current. Lower [{job.method}] learning_rate in "
            f"{job.concept}/concept.toml (it is {lr:g}; try {lr / 10:g}), keep max_grad_norm set (it is "
            f"{job.config.max_grad_norm}), or train in bf16/fp32 instead of fp16")


def check_losses(values: list[float], done: int, steps: int, lr: float, job: TrainJob) -> None:
    """Stop at the first non-finite loss among the steps logged up to ``done``, naming the step, loss and
    learning rate: a diverged run never reaches a checkpoint or an output."""
    import math

    bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
    if bad is not None:
        step = done - len(values) + bad + 1
        raise DivergedTraining(f"{job.method} training of concept {job.concept!r} diverged: step {step}/{steps} "
                               f"has loss {values[bad]} (learning rate {lr:.3g}). " + _remedy(job))


def check_weights(params: list, steps: int, job: TrainJob) -> None:
    """Refuse trained weights with a non-finite value (a loss can stay finite while a weight overflows)."""
    import torch

    with torch.no_grad():
        bad = sum(int((~torch.isfinite(p)).sum()) for p in params)
    if bad:
        total = sum(p.numel() for p in params)
        raise DivergedTraining(f"{job.method} training of concept {job.concept!r} ended after {steps} steps with "
                               f"{bad} of {total} trained values non-finite. " + _remedy(job))


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
    num_processes: int = 1  # data-parallel processes that trained (recorded in lineage.json)
    stats: dict = field(default_factory=dict)  # images/s, warm-up, peak memory and the speed settings used
    # validation_steps: where the validations during training are and the step select_best chose (main process)
    validation: dict | None = None


def run_precision(job: TrainJob, cpu: bool) -> str:
    """The job's mixed precision on this machine: ``'auto'`` is bf16 on a GPU that supports it, else ``'no'``."""
    import torch

    precision = job.mixed_precision
    if precision == "auto":
        precision = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
    return precision


def make_accelerator(job: TrainJob, cpu: bool, ckpt_root):
    """(accelerator, precision) for the job: ``mixed_precision = 'auto'`` is bf16 on a GPU that supports it."""
    from accelerate import Accelerator, DataLoaderConfiguration

    precision = run_precision(job, cpu)
    # Trackers log into the checkpoint folder while training (resume appends to the same run); write_output
    # copies the logs into the output folder.
    # split_batches: the configured batch is the total the processes split (per_process_batch), so the prepared
    # LR scheduler steps once per optimizer step, not once per process (diffusers' scripts scale it by N instead):
    # its state, and so a checkpoint, does not depend on the number of processes.
    accelerator = Accelerator(mixed_precision=precision, cpu=cpu, log_with=job.log_with or None,
                              project_dir=str(ckpt_root) if job.log_with else None,
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    return accelerator, precision


def train(job: TrainJob, progress: Callable[[str], None] = log.info) -> TrainState:
    import torch
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    # -- setup: the method, its config and the concept, checked before any model is loaded ---------------------
    method, cfg, ctx = get_method(job.method), job.config, train_context(job)
    method.check_inputs(ctx, cfg)
    cpu = job.device == "cpu" or (job.device == "auto" and not torch.cuda.is_available())
    check_optimizer(cfg, cuda=not cpu, section=job.method)
    quantize = getattr(cfg, "base_quantization", None)  # LoRA's frozen base quantized (training/quantization.py)
    check_quantization(quantize, cuda=not cpu, section=job.method)
    ckpt_root = checkpoint_root(job)
    accelerator, precision = make_accelerator(job, cpu, ckpt_root)
    n_procs, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    micro, accum = per_process_batch(cfg.train_batch_size, cfg.gradient_accumulation_steps, n_procs)
    if not accelerator.is_main_process:  # one copy of the progress, not one per process
        progress = log.debug
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    runtime = Runtime(job.performance, cuda=device.type == "cuda", accumulation=accum, processes=n_procs,
                      precision=precision, weight_dtype=weight_dtype, cache_dir=job.cache_dir, progress=progress)

    # -- prepare: models, data, what trains, placement, speed, optimizer -----------------------------------------
    set_seed(cfg.seed)  # adapter/ControlNet initialization; batches and noise have their own seeded generators
    text = method.runs_text_encoder(cfg)
    models = Models.load(job.base_model, text, loading_kwargs(quantize, weight_dtype))
    if quantize:
        models.denoiser = quantize_loaded(models.denoiser, quantize, weight_dtype, device)
    models.objective = models.family.objective.configured(cfg)  # checked with the inputs above
    data = TrainingData.from_bundle(job.latents_dir, job.training_images, lambda c: method.training_caption(c, ctx),
                                    control=job.method == "controlnet",
                                    datasets={d.concept: d.latents_dir for d in job.datasets}).to(device)
    method.prepare_data(models, data, job)
    trainable = method.prepare(models, cfg, ctx)
    if text:
        data.tokenize(models.tokenizers)  # after prepare: textual inversion adds its token there
    data.check_caption_dropout(cfg.caption_dropout)
    steps, roles = cfg.total_steps(ctx.num_instance_images), method.batch_roles(cfg)
    place_networks(models, trainable, device, weight_dtype, cfg, runtime.channels_last)
    params = [p for name in trainable for p in models.network(name).parameters() if p.requires_grad]
    micro, accum = runtime.prepare(job, method, models, data, cfg, roles, params, steps, micro, accum, accelerator)
    accelerator.gradient_accumulation_steps = accum
    optimizer = make_optimizer(cfg, params, runtime.fused_optimizer(cfg))
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=steps)
    *prepared, optimizer, lr_scheduler = accelerator.prepare(*map(models.network, trainable), optimizer, lr_scheduler)
    unwrapped = replace(models)  # for the methods' after_step hooks: a DDP wrapper hides the module's methods
    for name, module in zip(trainable, prepared):
        models.set_network(name, module)
    ema = None
    if cfg.use_ema:  # saved and restored with every checkpoint (accelerate's custom objects), so resume is exact
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=cfg.ema_decay)
        accelerator.register_for_checkpointing(ema)

    # -- resume -------------------------------------------------------------------------------------------------
    start, losses, checkpoint = resume(accelerator, ckpt_root, ema, progress)
    validation = None
    if cfg.validation_steps and accelerator.is_main_process:  # the other processes wait at each validation
        validation = StepValidation(job, method, cfg, ctx, ckpt_root, device, progress)
        validation.restore(checkpoint)  # the strips (and best step) of the steps before the checkpoint
    progress(f"training {method.name} for {ctx.concept!r}: {steps} steps, {ctx.num_instance_images} images, "
             f"batch {micro}x{accum}x{n_procs}, precision {precision}, device {device}, {runtime.describe()}, "
             f"optimizer {cfg.optimizer} (fused {runtime.fused_optimizer(cfg)}), EMA {cfg.use_ema}, "
             f"attention: {runtime.attention}")
    samples, rows, index = data.schedule(roles, start, steps, micro, accum, n_procs, rank, cfg.seed,
                                         cfg.train_batch_size * cfg.gradient_accumulation_steps)
    pending: list = []  # per-step losses still on the device; read every log_every steps (one sync)
    if job.log_with:
        accelerator.init_trackers("tensorboard", config={k: v for k, v in asdict(cfg).items()
                                                          if isinstance(v, (int, float, str, bool))})

    # -- the step loop ------------------------------------------------------------------------------------------
    timer = runtime.timer(start, steps, ckpt_root, accelerator.is_main_process)
    for step in range(start, steps):
        timer.before(step)
        step_loss = torch.zeros((), device=device)
        for m in range(accum):
            k = (step - start) * accum + m
            g = seeded_generator("step", cfg.seed, samples[k], device=device)
            # Shuffled captions are strings: shuffled on the host, with the step's seed (data.shuffle_tags).
            ids = data.shuffled_ids(rows[k], cfg.keep_tokens, seeded_generator("shuffle", cfg.seed, samples[k])) \
                if cfg.shuffle_caption else None
            parts = data.draw(rows[k], g, models.scaling_factor, cfg.random_flip, index=index[k],
                              caption_dropout=cfg.caption_dropout, token_ids=ids, shift_factor=models.shift_factor)
            with accelerator.accumulate(*prepared), accelerator.autocast():
                loss = compute_loss(method, models, parts, cfg, g, weight_dtype, runtime.channels_last)
                accelerator.backward(loss)
                synced = accelerator.sync_gradients  # this micro-batch ends an optimizer step
                if synced:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            method.after_step(unwrapped)
            if ema is not None and synced:  # after after_step: the average sees the weights the method keeps
                ema.step(params)
            step_loss += loss.detach() / accum
        pending.append(step_loss)
        done = step + 1
        timer.after(done, step_loss, runtime.first_step_done)
        if done % runtime.log_every == 0 or done == steps or done % cfg.checkpointing_steps == 0 or done == start + 1:
            # The step's loss is the mean over every process's micro-batches (one all-reduce per log, every
            # process reaches it at the same step); rank 0's alone would be half the batch's loss.
            new = accelerator.reduce(torch.stack(pending).float(), reduction="mean").tolist()
            losses.extend(new)
            pending = []
            lr = lr_scheduler.get_last_lr()[0]
            check_losses(new, done, steps, lr, job)  # before this step's checkpoint: none holds diverged weights
            progress(f"step {done}/{steps} ({100 * done // steps}%) loss {losses[-1]:.5f} lr {lr:.2e}"
                     + timer.eta(done))
            if job.log_with:
                for i, value in enumerate(new):
                    accelerator.log({"train/loss": value}, step=done - len(new) + i + 1)
                accelerator.log({"train/lr": lr}, step=done)
        if validation_due(cfg, done, steps):  # before the step's checkpoint, which keeps the validations up to it
            with timer.paused():
                if validation is not None:
                    validation(unwrapped, done, ema, params)
                accelerator.wait_for_everyone()
        if done % cfg.checkpointing_steps == 0 and done < steps:
            save_checkpoint(accelerator, ckpt_root, done, losses, cfg.checkpoints_total_limit, validation)
    timer.stop()

    # -- unwrap: the trained modules as the method saves them -----------------------------------------------------
    stats = runtime.finish(timer, images_per_step=micro * len(roles) * accum * n_procs, micro=micro,
                           accumulation=accum, cfg=cfg)
    # The frozen or trained denoiser's weights as stored (a quantized base: its packed weights and scales).
    stats["denoiser_gib"] = round(quantized_bytes(models.denoiser) / 2**30, 4)
    if job.log_with:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    for name in trainable:
        models.set_network(name, accelerator.unwrap_model(models.network(name)))
    if ema is not None:  # the output is the average: copied into the trained weights the method then saves
        ema.copy_to(params)
    check_weights(params, steps, job)
    return TrainState(method, cfg, ctx, models, losses, steps, start, accelerator.is_main_process, n_procs, stats,
                      validation.summary() if validation is not None else None)
