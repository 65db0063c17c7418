"""The one training loop every method runs on (nanoGPT-style: reads top to bottom, no callbacks).

It reads cached latents and text embeddings, so no step runs the VAE encoder, and the text encoder runs only
for methods that train the text side. accelerate owns device placement, mixed precision, gradient
accumulation and (under ``accelerate launch``) data-parallel training; checkpoints are accelerate states.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from assets_pipeline.hashing import digest
from assets_pipeline.training.data import TrainingData, seeded_generator
from assets_pipeline.training.job import TrainJob
from assets_pipeline.training.methods import get_method
from assets_pipeline.training.methods.base import Method, Models, TrainContext, per_sample_mse, snr_weights
from assets_pipeline.training.models import load_training_models
from assets_pipeline.training.optimizers import check_optimizer, make_optimizer, state_bytes
from assets_pipeline.training.validation import StepValidation, validation_due

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
    num_processes: int = 1  # data-parallel processes that trained (recorded in lineage.json)
    stats: dict = field(default_factory=dict)  # images/s, warm-up, peak memory and the speed settings used
    # validation_steps: where the validations during training are and the step select_best chose (main process)
    validation: dict | None = None


def train_context(job: TrainJob) -> TrainContext:
    rows = job.training_images
    return TrainContext(
        concept=job.concept, token=job.token, class_noun=job.class_noun,
        resolution=job.base_model["resolution"], family=job.base_model.get("family", "sd1"),
        num_instance_images=sum(r["role"] == "instance" for r in rows),
        num_class_images=sum(r["role"] == "class" for r in rows),
        num_control_images=sum(bool(r.get("control_path")) for r in rows if r["role"] == "instance"),
        extra={"control_paths": [r["control_path"] for r in rows if r.get("control_path")],
               # the other concepts trained in: their tokens and class nouns give validation prompts of their own
               "datasets": [{k: d[k] for k in ("concept", "token", "class_noun")} for d in job.datasets]},
    )


TRACKER_RUN = "tensorboard"  # the trackers' run folder, under the checkpoint folder and then in the output
PROFILE_DIR = "profile"  # performance.profile_steps' trace, likewise


def checkpoint_root(job: TrainJob) -> Path:
    """Checkpoints of exactly this job (same method, config, base model and training rows)."""
    return Path(job.checkpoint_dir) / job.identity()[:16]


def remove_stale_trainer_temporaries(job: TrainJob) -> list[Path]:
    """Temporaries of trainers that did not finish (cleanup.py). Call holding :func:`job_lock`: no other trainer
    writes this job's checkpoints then, so a half-saved one (``.step-N.tmp/``) is removed whatever its age. The
    caches a trainer shares with other jobs (micro-batch probes, compiled kernels) keep the grace period."""
    from assets_pipeline.cleanup import remove_stale_cache_temporaries, remove_stale_temporaries

    removed = remove_stale_temporaries(checkpoint_root(job), older_than_s=0)
    if job.cache_dir:
        for kind in ("micro_batch", "compile"):
            removed += remove_stale_cache_temporaries(Path(job.cache_dir) / kind)
    return removed


@contextmanager
def job_lock(job: TrainJob, progress: Callable[[str], None] = log.info) -> Iterator[None]:
    """One trainer at a time per job identity: they share a checkpoint folder, and a second one writing into it
    would corrupt the first's states. A second trainer waits, then resumes or retrains. An OS file lock
    (flock), so a killed trainer releases it at once, and whoever takes it next removes what that one left
    half-written (:func:`remove_stale_trainer_temporaries`). Under ``accelerate launch`` only rank 0 takes it and
    writes its launch into the file; the other ranks wait until they read their own launch there, not at their
    first collective (which would time out, after 30 minutes, while another trainer holds the lock)."""
    import fcntl
    import os
    import time

    path = Path(job.checkpoint_dir) / f"{job.identity()[:16]}.lock"
    # A launch: its rendezvous address (a free port per launch on this machine) and torchrun run id.
    launch = ":".join(os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"))
    if os.environ.get("RANK", "0") != "0":
        while not (path.is_file() and path.read_text() == launch):
            time.sleep(0.5)
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"another trainer holds {path} (the same job: method, config, base model, training rows); "
                     "waiting for it to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.truncate(0)
        f.write(launch)
        f.flush()
        try:
            for stale in remove_stale_trainer_temporaries(job):
                progress(f"removed stale temporary {stale}: left half-written by a trainer that did not finish")
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _latest_checkpoint(root: Path) -> tuple[int, Path] | None:
    done = [(int(p.name.split("-")[1]), p) for p in root.glob("step-*") if (p / "losses.json").is_file()]
    return max(done) if done else None


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


def compute_loss(method: Method, models: Models, parts: list, cfg, generator, weight_dtype, channels_last=False):
    """The step every method shares: noise, timesteps, add_noise, predict, loss (DDPM's objective, Ho et al.
    2020, as in diffusers' training scripts). Methods change only what they override (encode/predict/loss).
    ``parts``: the micro-batch, one :class:`Batch` per latent shape (aspect-ratio bucket; usually one), each a
    forward of its own; their per-row losses are concatenated for ``method.loss``. The batch is on the device and
    the noise is drawn there from ``generator``: no host round trip. ``cfg.noise_offset`` and
    ``cfg.input_perturbation`` are diffusers' train_text_to_image.py recipes, drawn in that script's order and
    only when set, so without them the draws are exactly those of the plain step."""
    import torch

    scheduler = models.noise_scheduler
    v_pred = scheduler.config.prediction_type == "v_prediction"
    losses, is_class = [], []
    for batch in parts:
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
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                                  device=latents.device)
        noisy = scheduler.add_noise(latents, noise_in, timesteps)
        target = scheduler.get_velocity(latents, noise, timesteps) if v_pred else noise
        batch.prompt_embeds = batch.prompt_embeds.to(weight_dtype)
        embeds = method.encode(models, batch).to(weight_dtype)
        pred = method.predict(models, noisy, timesteps, embeds, batch)
        row_losses = per_sample_mse(pred, target)
        if cfg.snr_gamma:
            row_losses = row_losses * snr_weights(scheduler, timesteps, cfg.snr_gamma)
        losses.append(row_losses)
        is_class.append(batch.is_class)
    return method.loss(torch.cat(losses), torch.cat(is_class), cfg)


def _place(models: Models, trainable: list[str], device, weight_dtype, cfg, channels_last: bool) -> None:
    """Frozen weights in the low-precision dtype, trained ones as fp32 master weights (diffusers' scripts and
    ``cast_training_params``): a LoRA leaves the U-Net's own weights in bf16, DreamBooth trains them in fp32."""
    import torch
    from diffusers.training_utils import cast_training_params

    for name in ("unet", "text_encoder", "text_encoder_2", "controlnet"):
        module = getattr(models, name)
        if module is None:
            continue
        if name not in trainable:  # frozen means no weight gradients at all (textual inversion's U-Net too)
            module.requires_grad_(False)
        fully_trained = name in trainable and all(p.requires_grad for p in module.parameters())
        module.to(device, dtype=torch.float32 if fully_trained else weight_dtype)
        if name in trainable:
            cast_training_params(module, dtype=torch.float32)
            if cfg.gradient_checkpointing and hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()
        if channels_last and name in ("unet", "controlnet"):
            module.to(memory_format=torch.channels_last)


def train(job: TrainJob, progress: Callable[[str], None] = log.info) -> TrainState:
    import time

    import torch
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from assets_pipeline.training import performance as perf_mod

    method = get_method(job.method)
    cfg = method.config_cls(**job.config)
    perf = perf_mod.Performance.from_dict(job.performance)
    ctx = train_context(job)
    method.check_inputs(ctx, cfg)
    cpu = job.device == "cpu" or (job.device == "auto" and not torch.cuda.is_available())
    check_optimizer(cfg, cuda=not cpu, section=job.method)  # before any model is loaded
    precision = job.mixed_precision
    if precision == "auto":
        precision = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
    ckpt_root = checkpoint_root(job)
    # Trackers log into the checkpoint folder while training (resume appends to the same run); write_output
    # copies the logs into the output folder.
    # split_batches: the configured batch is the total the processes split (per_process_batch), so the prepared
    # LR scheduler steps once per optimizer step, not once per process (diffusers' scripts scale it by N instead):
    # its state, and so a checkpoint, does not depend on the number of processes.
    accelerator = Accelerator(mixed_precision=precision, cpu=cpu, log_with=job.log_with or None,
                              project_dir=str(ckpt_root) if job.log_with else None,
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    n_procs, rank = accelerator.num_processes, accelerator.process_index
    # The configured effective batch is kept whatever the number of processes (per_process_batch).
    micro, accum = per_process_batch(cfg.train_batch_size, cfg.gradient_accumulation_steps, n_procs)
    accelerator.gradient_accumulation_steps = accum
    if not accelerator.is_main_process:  # one copy of the progress, not one per process
        progress = log.debug
    device = accelerator.device
    cuda = device.type == "cuda"
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)

    set_seed(cfg.seed)  # adapter/ControlNet initialization; batches and noise have their own seeded generators
    text = method.runs_text_encoder(cfg)
    models = load_training_models(job.base_model, text)
    data = TrainingData.from_bundle(Path(job.latents_dir), job.training_images, lambda c: method.training_caption(c, ctx),
                                    control=job.method == "controlnet",
                                    datasets={d["concept"]: Path(d["latents_dir"]) for d in job.datasets}).to(device)
    trainable = method.prepare(models, cfg, ctx)
    if text:
        data.tokenize(models.tokenizer, models.tokenizer_2)  # after prepare: textual inversion adds its token there
    data.check_caption_dropout(cfg.caption_dropout)
    steps = cfg.total_steps(ctx.num_instance_images)
    roles = method.batch_roles(cfg)
    trained = {n: getattr(models, n) for n in trainable}
    sig = perf_mod.device_signature()
    plan = perf_mod.resolve(perf, cuda, steps, accum, processes=n_procs, shapes=len(data.shapes))
    perf_mod.configure_backends(cuda, plan.cudnn_benchmark)
    _place(models, trainable, device, weight_dtype, cfg, plan.channels_last)
    params = [p for m in trained.values() for p in m.parameters() if p.requires_grad]
    # The networks every step runs forward and backward through, trained or frozen (textual inversion's
    # gradients flow through the frozen U-Net): these are compiled, and their structure keys the kernels.
    running = {n: getattr(models, n) for n in ("unet", "controlnet", "text_encoder", "text_encoder_2")
               if getattr(models, n) is not None}
    network = perf_mod.shape_fingerprint(running)
    # Under mixed precision (autocast) PEFT's input casts are lossless round trips: skipped unless asked for.
    casts = plan.adapter_input_casts or weight_dtype == torch.float32
    restore_casts = None if casts else perf_mod.skip_adapter_input_casts(running.values())
    probe = None
    if plan.probe_micro_batch:
        share = micro * accum  # this process's part of the effective batch
        micro, probe = _choose_micro_batch(job, method, models, data, cfg, share, roles, params, weight_dtype,
                                           digest(sig, network, casts), perf.memory_fraction, plan.channels_last,
                                           progress)
        if n_procs > 1:  # every process must run as many micro-batches (gradient syncs) per step: the smallest fits all
            micro = int(accelerator.gather(torch.tensor([micro], device=device)).min())
        accum = share // micro
        accelerator.gradient_accumulation_steps = accum

    def compile_cache(mode: str) -> perf_mod.CompileCache:
        # What the compiled graphs depend on: the network's structure, the batch, precision and the device.
        return perf_mod.CompileCache(job.cache_dir or None, digest(
            "compiled-train-step", sig, network, job.method, precision, micro, len(roles),
            data.shapes, mode, plan.channels_last, cfg.gradient_checkpointing, casts))

    plan = perf_mod.resolve(perf, cuda, steps, accum, lambda mode: compile_cache(mode).warm, n_procs,
                            len(data.shapes))
    cache = compile_cache(plan.compile)
    if plan.precompiled_regions and (missing := perf_mod.PrecompiledRegions.unsupported()):
        raise ValueError(f"performance.precompiled_regions = 'on' needs {missing}; set it to 'off'")
    # Graphs persisted with their guards carry the code they were traced from: the library versions key them too.
    precompiled = perf_mod.PrecompiledRegions(
        cache.path and cache.path.with_name(f"{digest(cache.key, perf_mod.PrecompiledRegions.key_parts())}.aot"),
        plan.backend) if plan.precompiled_regions else None

    def save_compiled(kernels: bool) -> int:
        """Persist what this process compiled: its kernels when ``kernels``, and any new precompiled graphs
        (none: nothing is written). Returns the bytes written."""
        saved = cache.save() if kernels else 0
        return saved + (precompiled.save() if precompiled is not None else 0)

    cache_state, cache_io_s = "off", 0.0  # cache_io_s: reading the persisted kernels and graphs, and writing new ones
    if plan.compile != "none":
        t_load = time.perf_counter()
        cache_state = "warm" if cache.load() else "cold"
        if precompiled is not None:
            precompiled.load()
        cache_io_s = time.perf_counter() - t_load
        for module in running.values():
            perf_mod.compile_module(module, plan.compile, plan.backend)
            if precompiled is not None:
                precompiled.install(module)

    fused = plan.fused_optimizer and cfg.optimizer == "adamw"
    optimizer = make_optimizer(cfg, params, fused)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=steps)
    *prepared, optimizer, lr_scheduler = accelerator.prepare(*trained.values(), optimizer, lr_scheduler)
    unwrapped = replace(models)  # for the methods' after_step hooks: a DDP wrapper hides the module's methods
    for name, module in zip(trainable, prepared):
        setattr(models, name, module)
    ema = None
    if cfg.use_ema:  # saved and restored with every checkpoint (accelerate's custom objects), so resume is exact
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=cfg.ema_decay)
        accelerator.register_for_checkpointing(ema)

    start, losses, path = 0, [], None
    # Every process reads the same checkpoint (rank 0 removed half-written ones under the job lock, before the
    # collectives in prepare() that the other ranks waited on); each restores its own RNG state file.
    if latest := _latest_checkpoint(ckpt_root):
        start, path = latest
        accelerator.load_state(str(path))
        if ema is not None:
            ema.to(device)  # accelerate loads custom objects onto the CPU
        losses = json.loads((path / "losses.json").read_text())
        progress(f"resumed from checkpoint at step {start} ({path})")
    validation = None
    if cfg.validation_steps and accelerator.is_main_process:  # the other processes wait at each validation
        validation = StepValidation(job, method, cfg, ctx, ckpt_root, device, progress)
        validation.restore(path)  # the strips (and best step) of the steps before the checkpoint

    attention = perf_mod.flash_attention_status({"unet": models.unet}, weight_dtype)
    progress(f"training {method.name} for {ctx.concept!r}: {steps} steps, {ctx.num_instance_images} images, "
             f"batch {micro}x{accum}x{n_procs}, precision {precision}, device {device}, compile {plan.compile} "
             f"(cache {cache_state}), channels_last {plan.channels_last}, optimizer {cfg.optimizer} (fused {fused}), "
             f"EMA {cfg.use_ema}, attention: {attention}")
    # Every remaining micro-batch's rows, decided up front on the host and moved to the device once. A step
    # covers samples step x effective .. +effective of each role; process `rank` takes every n_procs-th
    # micro-batch of them, so with the accumulation split the processes together run one process's micro-batches.
    # A step's samples of a role come from one aspect-ratio bucket (the group is the configured effective batch,
    # whatever the micro-batch, the probe or the number of processes). Each bucket is its own shape: compiled
    # modules (dynamic=False) compile once per bucket, on its first step.
    samples = [((step * accum + m) * n_procs + rank) * micro for step in range(start, steps) for m in range(accum)]
    group = cfg.train_batch_size * cfg.gradient_accumulation_steps
    rows = [data.indices(roles, micro, s, cfg.seed, group) for s in samples]
    index = torch.tensor(rows, device=device) if rows else None
    pending: list = []  # per-step losses still on the device; read every log_every steps (one sync)
    if job.log_with:
        accelerator.init_trackers(TRACKER_RUN, config={k: v for k, v in asdict(cfg).items()
                                                       if isinstance(v, (int, float, str, bool))})
    # profile_steps: the last steps run under torch.profiler (rank 0 records them); the steady rate ends before them.
    profiler = profile_from = profile = None
    if perf.profile_steps and steps - start >= perf.profile_steps + 2:  # after the first step and a timed one
        profile_from = steps - perf.profile_steps
        if accelerator.is_main_process:
            profiler = perf_mod.StepProfiler(ckpt_root / PROFILE_DIR, perf.profile_steps, cuda)
    elif perf.profile_steps:
        progress(f"not profiling: profile_steps = {perf.profile_steps} needs {perf.profile_steps + 2} steps to go "
                 f"(the first, one timed, then the profiled ones), this run has {steps - start}")
    compiled_before = perf_mod.compile_counters() if plan.compile != "none" else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    warmup_s, t_steady, validation_s = None, None, 0.0
    t_steady_end = steady_validation_s = None
    for step in range(start, steps):
        if step == profile_from:
            if cuda:
                torch.cuda.synchronize()
            t_steady_end, steady_validation_s = time.perf_counter(), validation_s
            if profiler is not None:
                profiler.start()
        step_loss = torch.zeros((), device=device)
        for m in range(accum):
            k = (step - start) * accum + m
            g = seeded_generator("step", cfg.seed, samples[k], device=device)
            # Shuffled captions are strings: shuffled on the host, with the step's seed (data.shuffle_tags).
            ids = data.shuffled_ids(rows[k], cfg.keep_tokens, seeded_generator("shuffle", cfg.seed, samples[k])) \
                if cfg.shuffle_caption else None
            parts = data.draw(rows[k], g, models.scaling_factor, cfg.random_flip, index=index[k],
                              caption_dropout=cfg.caption_dropout, token_ids=ids)
            with accelerator.accumulate(*prepared), accelerator.autocast():
                loss = compute_loss(method, models, parts, cfg, g, weight_dtype, plan.channels_last)
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
        if profiler is not None and done == steps:  # before the last log, validation and checkpoint
            profile = profiler.stop()
            progress(f"profiled the last {profile['steps']} steps: {profile['step_ms']} ms a step"
                     + (f", GPU busy {profile['device_busy']:.0%}" if profile["device_busy"] is not None else "")
                     + f" ({ckpt_root / PROFILE_DIR}: trace.json.gz, ops.txt)")
        if warmup_s is None:  # the first step pays compilation (and cuDNN's trials, if on): time it on its own
            float(step_loss)
            first_step_s = time.perf_counter() - t0
            if cache_state == "cold" or (precompiled is not None and precompiled.compiled):
                t_save = time.perf_counter()
                saved = save_compiled(kernels=cache_state == "cold")
                save_s = time.perf_counter() - t_save
                cache_io_s += save_s
                progress(f"compiled in {first_step_s:.1f} s; saved {saved / 2**20:.1f} MiB of kernels to "
                         f"{cache.path.parent if cache.path else 'nowhere (no cache_dir)'} in {save_s:.1f} s")
            # What compilation costs this run once: the first step plus reading and writing (what was new) the
            # persisted kernels. The steady rate starts after it, so it never includes the save.
            warmup_s = first_step_s + cache_io_s
            t_steady = time.perf_counter()
        if done % plan.log_every == 0 or done == steps or done % cfg.checkpointing_steps == 0 or done == start + 1:
            # The step's loss is the mean over every process's micro-batches (one all-reduce per log, every
            # process reaches it at the same step); rank 0's alone would be half the batch's loss.
            new = accelerator.reduce(torch.stack(pending).float(), reduction="mean").tolist()
            losses.extend(new)
            pending = []
            lr = lr_scheduler.get_last_lr()[0]
            progress(f"step {done}/{steps} ({100 * done // steps}%) loss {losses[-1]:.5f} lr {lr:.2e}"
                     + _eta(done, start, steps, t_steady, time.perf_counter()))
            if job.log_with:
                for i, value in enumerate(new):
                    accelerator.log({"train/loss": value}, step=done - len(new) + i + 1)
                accelerator.log({"train/lr": lr}, step=done)
        if validation_due(cfg, done, steps):
            # Before the step's checkpoint, which keeps the validations up to it. Timed apart from training.
            t_validation = time.perf_counter()
            if validation is not None:
                validation(unwrapped, done, ema, params)
            accelerator.wait_for_everyone()
            validation_s += time.perf_counter() - t_validation
        if done % cfg.checkpointing_steps == 0 and done < steps:
            _save_checkpoint(accelerator, ckpt_root, done, losses, cfg.checkpoints_total_limit, validation)
    t_end = time.perf_counter()
    train_s = t_end - t0
    # The other buckets' shapes compiled after the first step's save: save again, so the next run is warm for all.
    if saved := save_compiled(kernels=cache_state == "cold" and len(data.shapes) > 1):
        progress(f"saved {saved / 2**20:.1f} MiB of kernels for {len(data.shapes)} bucket shapes to "
                 f"{cache.path.parent}")
    # The steady rate: the steps after the first, up to the profiled ones, validations left out.
    if t_steady_end is None:
        t_steady_end, steady_validation_s = t_end, validation_s
    steady = t_steady_end - t_steady - steady_validation_s if t_steady else 0.0
    steady_steps = (profile_from or steps) - start - 1
    images_per_step = micro * len(roles) * accum * n_procs
    stats = {
        "images_per_s": round(images_per_step * steady_steps / steady, 2) if steady_steps > 0 and steady else None,
        "warmup_s": round(warmup_s, 2) if warmup_s is not None else None, "train_s": round(train_s, 2),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "micro_batch": micro, "gradient_accumulation": accum, "compile": plan.compile, "compile_cache": cache_state,
        "compile_cache_io_s": round(cache_io_s, 2),
        "channels_last": plan.channels_last, "fused_optimizer": fused, "adapter_input_casts": casts,
        "cudnn_benchmark": plan.cudnn_benchmark,
        "optimizer": cfg.optimizer,
        "attention": attention,
        "precision": precision, "device": sig.get("gpu", "cpu"), "num_processes": n_procs,
    }
    if probe is not None:
        stats["micro_batch_probe"] = probe
    if profile is not None:
        stats["profile"] = profile
    if compiled_before is not None:  # where the compile time went, and whether a warm cache covered every graph
        stats["compile_stats"] = perf_mod.compile_delta(compiled_before, perf_mod.compile_counters())
    if precompiled is not None:  # graphs loaded and compiled ahead of time; block classes that fell back, and why
        stats["precompiled_regions"] = precompiled.stats()
    if cfg.validation_steps:
        stats["validation_s"] = round(validation_s, 2)

    if job.log_with:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    for name in trainable:
        setattr(models, name, accelerator.unwrap_model(getattr(models, name)))
    if ema is not None:  # the output is the average: copied into the trained weights the method then saves
        ema.copy_to(params)
    if restore_casts is not None:  # the trained modules forward outside autocast as PEFT made them
        restore_casts()
    return TrainState(method, cfg, ctx, models, losses, steps, start, accelerator.is_main_process, n_procs, stats,
                      validation.summary() if validation is not None else None)


def _eta(done: int, start: int, steps: int, t_steady: float | None, now: float) -> str:
    """", ETA 3m12s" from the steady rate (steps after the first, which pays compilation), or "" before one."""
    if t_steady is None or done - start <= 1 or done >= steps:
        return ""
    left = (now - t_steady) / (done - start - 1) * (steps - done)
    return f", ETA {int(left // 60)}m{int(left % 60):02d}s"


def _choose_micro_batch(job: TrainJob, method: Method, models: Models, data: TrainingData, cfg, effective: int,
                        roles, params, weight_dtype, model_key: str, fraction: float, channels_last: bool, progress):
    """The largest micro-batch dividing ``effective`` (the configured effective batch, train_batch_size x
    accumulation, or one process's share of it) that fits the card, probed once with eager forward+backward
    steps and cached per card, model and method."""
    import torch

    from assets_pipeline.store import write_json_atomic
    from assets_pipeline.training.performance import divisors_descending, probe_micro_batch

    key = digest("micro-batch", model_key, job.method, str(weight_dtype), cfg.gradient_checkpointing, len(roles),
                 data.shapes, effective, fraction, channels_last, cfg.optimizer, cfg.use_ema)
    path = Path(job.cache_dir) / "micro_batch" / f"{key}.json" if job.cache_dir else None
    if path is not None and path.is_file():
        answer = json.loads(path.read_text())
        progress(f"micro-batch {answer['micro_batch']} of effective batch {effective} (cached probe, {path})")
        return answer["micro_batch"], answer

    def try_batch(b: int) -> None:
        g = seeded_generator("micro-batch-probe", device=data.device)
        # The largest bucket of each role: every other bucket's micro-batch needs less memory.
        parts = data.draw(data.largest_indices(roles, b), g, models.scaling_factor, cfg.random_flip)
        try:
            with torch.autocast(data.device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
                loss = compute_loss(method, models, parts, cfg, g, weight_dtype, channels_last)
            loss.backward()
        finally:
            for p in params:
                p.grad = None

    # The optimizer's states are allocated at its first step, after the probe (and EMA's copy of the trained
    # weights after it too, when enabled).
    optimizer_bytes = state_bytes(cfg, params) + (sum(4 * p.numel() for p in params) if cfg.use_ema else 0)
    micro, info = probe_micro_batch(try_batch, divisors_descending(effective), optimizer_bytes, fraction)
    answer = {"micro_batch": micro, "effective_batch": effective, **info}
    if path is not None:
        write_json_atomic(path, answer)
    progress(f"micro-batch {micro} of effective batch {effective} fits (probe: {info})")
    return micro, answer


def _save_checkpoint(accelerator, root: Path, step: int, losses: list[float], keep: int,
                     validation: StepValidation | None = None) -> None:
    """An accelerate state (models, optimizer, LR schedule, RNG, and the EMA with use_ema) plus the loss history
    and, with validation_steps, the validations so far, renamed into place."""
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    accelerator.save_state(str(tmp))  # the main process writes the weights, every process its RNG state
    accelerator.wait_for_everyone()  # so all of them are in tmp before it is renamed: a step-N folder is whole
    if accelerator.is_main_process:
        (tmp / "losses.json").write_text(json.dumps(losses))
        if validation is not None:
            validation.save_into(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
            shutil.rmtree(old)
