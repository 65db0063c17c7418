"""Many concepts, one GPU: the LoRAs of several concepts trained in one process over one frozen base (issue 26).

Concepts whose LoRAs share a base model and an adapter shape (rank, target modules) train as one *pack*: the base
model is loaded once, each concept's adapter sits beside the others' in the packed layers of training/packing.py,
and every optimizer step runs one denoiser forward and one backward over a batch holding rows of every concept
still training, each row through its own concept's adapter. Each concept is trained exactly as it would be alone
(``loop.train``), up to float rounding:

- its adapter starts from solo's initial weights: ``set_seed(cfg.seed)`` and ``LoraMethod.prepare`` (PEFT's
  ``add_adapter``) on the base, read back and removed again, then copied into its place in the pack;
- its rows, flips, latent samples, noise and timesteps are solo's: its own ``TrainingData`` and schedule, and each
  micro-batch's draws from its own ``seeded_generator("step", seed, sample)``, in solo's order
  (``step.part_inputs``);
- its loss is its own (``method.loss`` over its own rows: their mean), so the sum over concepts that the one
  backward differentiates gives each adapter the gradient of its own loss: rows of other concepts never reach it;
- its gradient norm is clipped with its own ``max_grad_norm`` over its own parameters, and its own optimizer, LR
  schedule (its steps and warm-up) and EMA step, only on the steps it trains: a concept that reaches its step
  count leaves the pack (its adapter then gets zero gradients, never a step), and the others go on.

Its recipe may differ from the others' wherever it can: learning rate and schedule, optimizer, steps, seed, batch
and gradient accumulation, caption dropout, noise offset, input perturbation, snr_gamma, random flips, EMA, LoRA
alpha, repeats. What a pack shares, and what it refuses, :func:`packable` says. A concept that diverges (a
non-finite loss at one of solo's log points, or non-finite weights at its end) fails alone: it leaves the pack with
its :class:`~assets_pipeline.training.loop.DivergedTraining`, the others go on.

Each concept's result is a solo-shaped :class:`~assets_pipeline.training.loop.TrainState` whose denoiser holds
its adapter as a plain PEFT adapter, so ``output.write_output`` writes exactly the files, lineage and validation a
solo training writes. The denoisers of the results share the frozen base's weights (one copy in memory).

What a pack does not do (yet): checkpoints and resume (a pack's concepts start at step 0 and write no
checkpoint), validation during training, trackers, compilation and the micro-batch probe (the configured
micro-batch runs eagerly), several processes, fp16 (its loss scaler would be shared by every concept).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

from assets_pipeline.training.data import TrainingData, seeded_generator
from assets_pipeline.training.job import TrainJob
from assets_pipeline.training.loop import (
    DivergedTraining,
    TrainState,
    check_losses,
    check_weights,
    run_precision,
)
from assets_pipeline.training.methods import get_method
from assets_pipeline.training.methods.base import Batch, Models
from assets_pipeline.training.optimizers import check_optimizer, make_optimizer
from assets_pipeline.training.plan import train_context
from assets_pipeline.training.step import part_inputs, part_losses, place_networks

log = logging.getLogger(__name__)


# -- which jobs can share a pack ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Refusal:
    """A job that cannot train in a pack, and why (one line for the run log, naming the concept and the key)."""

    job: TrainJob
    reason: str

    def __str__(self) -> str:
        return self.reason


def _targets(job: TrainJob) -> tuple[str, ...]:
    """The denoiser modules the job's LoRA adapts (its ``target_modules``, else the family's)."""
    return tuple(job.config.target_modules or job.base_model.model_family.denoiser.lora_targets)


def pack_key(job: TrainJob) -> tuple:
    """What the concepts of one pack share: the frozen base (its weights' fingerprint), the adapter shape (rank and
    target modules: one packed layer per module) and how the step runs (device, precision, gradient
    checkpointing)."""
    ref, cfg = job.base_model, job.config
    return (ref.fingerprint, ref.family, ref.prediction_type, cfg.rank, tuple(sorted(_targets(job))), job.device,
            job.mixed_precision, cfg.gradient_checkpointing)


def refusal(job: TrainJob) -> str | None:
    """Why ``job`` cannot train in a pack, or None when it can."""
    from assets_pipeline.training.checkpoints import checkpoint_root, checkpoints

    cfg, where = job.config, f"concept {job.concept!r} trains alone:"
    if job.method != "lora":
        return f"{where} method {job.method!r} (a pack trains LoRA adapters only)"
    section = f"[{job.method}]"
    settings = (
        ("variant", cfg.variant != "lora", "a pack trains plain LoRA; DoRA, LoHa and LoKr have no packed layer"),
        ("conv_rank", cfg.conv_rank != 0, "a pack adapts linear layers only, not the ResNets' convolutions (LoCon)"),
        ("dropout", cfg.dropout != 0, "the packed layer has no LoRA dropout"),
        ("train_text_encoder", cfg.train_text_encoder, "a pack trains the denoiser's adapters only"),
        ("base_quantization", cfg.base_quantization is not None,
         "a pack's packed layers wrap plain linears, not quantized ones"),
        ("datasets", bool(cfg.datasets), "a LoRA of several concepts' photos trains alone for now"),
        ("shuffle_caption", cfg.shuffle_caption,
         "shuffled captions run the text encoder every step, which a pack does not load"),
        ("validation_steps", cfg.validation_steps != 0, "a pack does not validate during training (yet)"),
    )
    for key, refused, why in settings:
        if refused:
            return f"{where} {section} {key} = {getattr(cfg, key)!r}: {why}"
    if job.mixed_precision == "fp16":
        return (f"{where} mixed_precision = 'fp16': fp16 needs a gradient scaler, which one backward over several "
                "concepts would share; train in bf16 or fp32")
    if job.log_with:
        return f"{where} log_with = {job.log_with!r}: a pack writes no tracker logs"
    if job.checkpoint_dir and (done := checkpoints(checkpoint_root(job))):
        return (f"{where} it has a checkpoint at step {done[-1][0]} of an interrupted training, which resumes "
                "alone (a pack neither resumes nor writes checkpoints)")
    return None


def packable(jobs: Sequence[TrainJob]) -> tuple[list[list[TrainJob]], list[Refusal]]:
    """(groups, refusals): ``jobs`` that can train in a pack, grouped by what a pack shares (:func:`pack_key`),
    each group in the order of ``jobs``; and each job that cannot, with why. A group of one can train as a pack
    of one, but gains nothing over training alone."""
    groups: dict[tuple, list[TrainJob]] = {}
    refused = []
    for job in jobs:
        if (reason := refusal(job)) is not None:
            refused.append(Refusal(job, reason))
        else:
            groups.setdefault(pack_key(job), []).append(job)
    return list(groups.values()), refused


# -- training -----------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class _Concept:
    """One concept of a pack while it trains."""

    job: TrainJob
    cfg: Any
    ctx: Any
    models: Models | None = None  # the pack's models with this concept's objective (the denoiser is shared)
    data: TrainingData | None = None
    initial: dict | None = None  # its adapter's initial weights, PEFT's keys (solo's)
    slot: int = -1  # its adapter in the pack
    steps: int = 0
    accum: int = 1
    samples: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    index: Any = None
    params: list = field(default_factory=list)
    optimizer: Any = None
    scheduler: Any = None
    ema: Any = None
    losses: list[float] = field(default_factory=list)
    pending: list = field(default_factory=list)
    error: BaseException | None = None
    done: int = 0  # optimizer steps trained
    train_s: float = 0.0

    @property
    def training(self) -> bool:
        return self.error is None and self.done < self.steps

    def fail(self, error: BaseException, progress: Callable[[str], None]) -> None:
        self.error = error
        self.optimizer = self.scheduler = self.ema = None
        progress(f"pack: concept {self.job.concept!r} leaves the pack: {error}")


def _signature(x) -> tuple:
    """What the denoiser inputs of parts must share to run in one forward: every tensor's shape past the batch
    dimension, and its dtype."""
    def sig(t):
        if t is None:
            return None
        if isinstance(t, (tuple, list)):
            return tuple(sig(v) for v in t)
        return tuple(t.shape[1:]), t.dtype

    batch = x.batch
    return (sig(x.noised.noisy), sig(x.noised.timesteps), sig(x.embeds),
            *(sig(getattr(batch, f)) for f in Batch.__dataclass_fields__ if f not in ("latents", "prompt_embeds")))


def _cat_batches(batches: list[Batch]) -> Batch:
    """One Batch of the rows of ``batches`` (of one signature), in order."""
    import torch

    def cat(values):
        if values[0] is None:
            return None
        if isinstance(values[0], (tuple, list)):
            return tuple(torch.cat(v) for v in zip(*values))
        return torch.cat(values)

    return Batch(**{f: cat([getattr(b, f) for b in batches]) for f in Batch.__dataclass_fields__})


def _backward(total, forwards: list, checkpointing: bool, model) -> None:
    """Backward of ``total`` (every concept's loss). Without gradient checkpointing the row index of each forward
    is in its graph already. With it, checkpointed blocks recompute their forward during the backward and read
    the model's row index then: one forward's backward runs inside its ``rows`` context; several forwards' run one
    after the other, each inside its own, with the gradient ``total`` gives each of its per-row losses (the same
    numbers the one backward would send them)."""
    import torch

    from assets_pipeline.training.packing import rows

    if not checkpointing:
        total.backward()
        return
    if len(forwards) == 1:
        with rows(model, forwards[0][0]):
            total.backward()
        return
    outputs = [r for _, losses in forwards for r in losses]
    grads = torch.autograd.grad(total, outputs, retain_graph=True)
    k = 0
    for index, losses in forwards:
        with rows(model, index):
            torch.autograd.backward(losses, grads[k : k + len(losses)])
        k += len(losses)


def _solo_models(models: Models, method, concept: _Concept, state: dict) -> Models:
    """A solo-shaped Models for ``concept``: a denoiser that shares the frozen base's weights (the pack's, its
    packed layers removed) and carries the concept's trained adapter as a plain PEFT adapter named ``default``,
    added as ``LoraMethod.prepare`` adds it (fp32 weights, as training leaves them): what ``method.save`` reads."""
    import torch
    from diffusers.training_utils import cast_training_params
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    base = models.denoiser
    shared = {id(t): t for t in (*base.parameters(), *base.buffers())}
    denoiser = copy.deepcopy(base, memo=shared)  # new modules, the same weight tensors
    solo = replace(models, denoiser=denoiser, objective=concept.models.objective)
    method.prepare(solo, concept.cfg, concept.ctx)
    cast_training_params(denoiser, dtype=torch.float32)
    result = set_peft_model_state_dict(denoiser, state)
    if result.unexpected_keys:
        raise RuntimeError(f"concept {concept.job.concept!r}: its packed adapter has tensors PEFT's adapter does not: "
                           f"{result.unexpected_keys[:3]}")
    loaded = get_peft_model_state_dict(denoiser)
    if loaded.keys() != state.keys() or any(not torch.equal(loaded[k], state[k].to(loaded[k])) for k in state):
        raise RuntimeError(f"concept {concept.job.concept!r}: its adapter did not load back into a PEFT adapter as "
                           "trained")
    return solo


def train_pack(jobs: Sequence[TrainJob], progress: Callable[[str], None] = log.info) -> list:
    """Train ``jobs`` (one group of :func:`packable`) as one pack in this process. Returns one entry per job, in
    order: its :class:`TrainState` (for ``output.write_output``, as ``loop.train``'s), or the exception that
    ended it alone (a :class:`DivergedTraining`, or an error in its own inputs); the others trained on. Errors
    of the pack itself (the base model, the device) raise. How the step runs (channels_last, fused AdamW, TF32)
    follows the first job's ``performance``; each concept logs and checks its losses at its own solo log points."""
    import torch
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from peft.utils import get_peft_model_state_dict

    from assets_pipeline.training.packing import (
        adapter_parameters,
        adapter_state,
        inject_packed_lora,
        load_adapter_state,
        remove_packed_lora,
        rows,
    )
    from assets_pipeline.training.runtime.backends import configure_backends
    from assets_pipeline.training.runtime.compilation import device_signature
    from assets_pipeline.training.runtime.settings import plan

    jobs = list(jobs)
    if not jobs:
        return []
    groups, refused = packable(jobs)
    if refused or len(groups) != 1:
        why = [str(r) for r in refused] or [("they differ in base model, rank, target modules, device, precision or "
                                             "gradient_checkpointing (packable groups them)")]
        raise ValueError(f"these {len(jobs)} jobs cannot train as one pack: " + "; ".join(why))
    if (world := int(os.environ.get("WORLD_SIZE", "1"))) > 1:
        raise ValueError(f"a pack trains in one process; this one is one of {world} (accelerate launch)")
    method, first = get_method("lora"), jobs[0]
    cpu = first.device == "cpu" or (first.device == "auto" and not torch.cuda.is_available())
    device = torch.device("cpu" if cpu else "cuda")
    precision = run_precision(first, cpu)
    weight_dtype = {"bf16": torch.bfloat16}.get(precision, torch.float32)
    speed = plan(first.performance, cuda=not cpu, accumulation=1)  # how the step runs: as solo's would
    configure_backends(not cpu, speed.cudnn_benchmark)  # TF32 on CUDA, as solo's Runtime sets it
    checkpointing = first.config.gradient_checkpointing
    concepts = [_Concept(job, job.config, train_context(job)) for job in jobs]
    for c in concepts:
        try:
            method.check_inputs(c.ctx, c.cfg)
            check_optimizer(c.cfg, cuda=not cpu, section=c.job.method)
        except Exception as e:  # noqa: BLE001 - its own inputs: it fails alone
            c.fail(e, progress)

    # -- the frozen base, once; each concept's adapter initialised as solo's ---------------------------------
    before = torch.random.get_rng_state()
    models = Models.load(first.base_model, False, None)
    if not torch.equal(before, torch.random.get_rng_state()):
        log.warning("loading base model %r drew from torch's random generator: solo training seeds before loading, "
                    "so the concepts' initial adapters may differ from solo's", first.base_model.source)
    denoiser = models.family.denoiser
    for c in concepts:
        if c.error is not None:
            continue
        try:
            set_seed(c.cfg.seed)  # solo: set_seed, load the base (no draws), the data, then prepare
            c.models = replace(models, objective=models.family.objective.configured(c.cfg))
            c.data = TrainingData.from_bundle(c.job.latents_dir, c.job.training_images,
                                              lambda text, ctx=c.ctx: method.training_caption(text, ctx),
                                              control=False).to(device)
            trainable = method.prepare(c.models, c.cfg, c.ctx)
            if trainable != [denoiser.component]:
                raise RuntimeError(f"a packed LoRA trains {denoiser.component!r} alone, this one {trainable}")
            c.initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(models.denoiser).items()}
            c.data.check_caption_dropout(c.cfg.caption_dropout)
            c.steps, c.accum = c.cfg.total_steps(c.ctx.num_instance_images), c.cfg.gradient_accumulation_steps
            group = c.cfg.train_batch_size * c.accum
            c.samples, c.rows, c.index = c.data.schedule(method.batch_roles(c.cfg), 0, c.steps, c.cfg.train_batch_size,
                                                         c.accum, 1, 0, c.cfg.seed, group)
        except Exception as e:  # noqa: BLE001 - its own data or settings: it fails alone
            c.fail(e, progress)
        finally:
            if getattr(models.denoiser, "peft_config", None):
                models.denoiser.unload_lora()  # the plain base again, for the next concept and the pack
    live = [c for c in concepts if c.error is None]
    if live:
        targets = _targets(first)
        inject_packed_lora(models.denoiser, targets, len(live), first.config.rank,
                           [c.cfg.alpha or c.cfg.rank for c in live])
        for slot, c in enumerate(live):
            c.slot = slot
            load_adapter_state(models.denoiser, slot, c.initial)
            c.initial = None
        place_networks(models, [denoiser.component], device, weight_dtype, first.config, speed.channels_last)
        for c in live:
            c.params = adapter_parameters(models.denoiser, c.slot)
            c.optimizer = make_optimizer(c.cfg, c.params, speed.fused_optimizer and c.cfg.optimizer == "adamw")
            c.scheduler = get_scheduler(c.cfg.lr_scheduler, c.optimizer, num_warmup_steps=c.cfg.lr_warmup_steps,
                                        num_training_steps=c.steps)
            if c.cfg.use_ema:
                from diffusers.training_utils import EMAModel

                c.ema = EMAModel(c.params, decay=c.cfg.ema_decay)
    progress(f"pack: training {len(live)} LoRA adapters over one {models.family.name} base on {device} "
             f"(precision {precision}): " + ", ".join(
                 f"{c.job.concept!r} {c.steps} steps, batch {c.cfg.train_batch_size}x{c.accum}, lr "
                 f"{c.cfg.learning_rate:g}" for c in live))

    # -- the step loop: one forward per batch shape and one backward over every concept still training -------
    autocast = (lambda: torch.autocast(device.type, dtype=weight_dtype)) if precision == "bf16" else nullcontext
    started, step = time.perf_counter(), 0
    while training := [c for c in live if c.training]:
        step_loss = {c: torch.zeros((), device=device) for c in training}
        for m in range(max(c.accum for c in training)):
            members = [c for c in training if m < c.accum]
            inputs = []  # (concept, the part's inputs), concepts in pack order, each one's parts in order
            for c in members:
                k = step * c.accum + m
                g = seeded_generator("step", c.cfg.seed, c.samples[k], device=device)
                parts = c.data.draw(c.rows[k], g, models.scaling_factor, c.cfg.random_flip, index=c.index[k],
                                    caption_dropout=c.cfg.caption_dropout, shift_factor=models.shift_factor)
                with autocast():
                    inputs += [(c, part_inputs(method, c.models, b, c.cfg, g, weight_dtype, speed.channels_last))
                               for b in parts]
            shapes: dict[tuple, list[int]] = {}
            for i, (_, x) in enumerate(inputs):
                shapes.setdefault(_signature(x), []).append(i)
            row_losses: list = [None] * len(inputs)
            forwards = []  # (row index, per-row losses of each of its parts)
            with autocast():
                for members_of_shape in shapes.values():
                    group = [inputs[i] for i in members_of_shape]
                    sizes = [len(x.noised.noisy) for _, x in group]
                    index = torch.tensor([c.slot for (c, _), n in zip(group, sizes) for _ in range(n)])
                    with rows(models.denoiser, index):
                        pred = method.predict(models, torch.cat([x.noised.noisy for _, x in group]),
                                              torch.cat([x.noised.timesteps for _, x in group]),
                                              torch.cat([x.embeds for _, x in group]),
                                              _cat_batches([x.batch for _, x in group]))
                    if precision != "no" and pred.dtype != torch.float32:
                        pred = pred.float()  # as accelerate's prepared model returns it under mixed precision
                    for i, (c, x), p in zip(members_of_shape, group, torch.split(pred, sizes)):
                        row_losses[i] = part_losses(c.models, p, x, c.cfg)
                    forwards.append((index, [row_losses[i] for i in members_of_shape]))
                total = 0
                for c in members:
                    mine = [i for i, (owner, _) in enumerate(inputs) if owner is c]
                    loss = method.loss(torch.cat([row_losses[i] for i in mine]),
                                       torch.cat([inputs[i][1].batch.is_class for i in mine]), c.cfg)
                    total = total + loss / c.accum  # accelerate's backward divides by the accumulation too
                    step_loss[c] += loss.detach() / c.accum
                _backward(total, forwards, checkpointing, models.denoiser)
        step += 1
        for c in live:
            if c not in step_loss:  # left the pack: its adapter got zero gradients, which it never steps on
                for p in c.params:
                    p.grad = None
                continue
            torch.nn.utils.clip_grad_norm_(c.params, c.cfg.max_grad_norm)  # what accelerate's clip_grad_norm_ runs
            c.optimizer.step()
            c.scheduler.step()
            c.optimizer.zero_grad(set_to_none=True)
            if c.ema is not None:
                c.ema.step(c.params)
            c.done = step
            c.pending.append(step_loss[c])
            if (step % c.job.performance.log_every == 0 or step == c.steps or step % c.cfg.checkpointing_steps == 0
                    or step == 1):  # solo's log points: a divergence is found at the step solo finds it
                new = torch.stack(c.pending).float().tolist()
                c.losses.extend(new)
                c.pending = []
                lr = c.scheduler.get_last_lr()[0]
                try:
                    check_losses(new, step, c.steps, lr, c.job)
                except DivergedTraining as e:
                    c.fail(e, progress)
                    continue
                progress(f"pack: {c.job.concept!r} step {step}/{c.steps} ({100 * step // c.steps}%) loss "
                         f"{c.losses[-1]:.5f} lr {lr:.2e}")
            if step == c.steps:
                c.train_s = time.perf_counter() - started
                c.optimizer = c.scheduler = None  # its states are not needed any more
                progress(f"pack: {c.job.concept!r} trained its {c.steps} steps and leaves the pack")

    # -- each concept's adapter as solo's result -------------------------------------------------------------
    states: dict[int, dict] = {}
    for c in live:
        if c.error is not None:
            continue
        try:
            if c.ema is not None:  # the output is the average, as solo's
                c.ema.copy_to(c.params)
            check_weights(c.params, c.steps, c.job)
        except DivergedTraining as e:
            c.fail(e, progress)
            continue
        states[c.slot] = {k: v.detach().clone() for k, v in adapter_state(models.denoiser, c.slot).items()}
    if live:
        remove_packed_lora(models.denoiser)
    out: list = []
    sig = device_signature().get("gpu", "cpu")
    for c in concepts:
        if c.error is not None:
            out.append(c.error)
            continue
        solo = _solo_models(models, method, c, states[c.slot])
        images = c.cfg.train_batch_size * len(method.batch_roles(c.cfg)) * c.accum * c.steps
        stats = {"packed": True, "pack_size": len(live), "packed_with": [o.job.concept for o in live if o is not c],
                 "train_s": round(c.train_s, 2), "images_per_s": round(images / c.train_s, 3) if c.train_s else None,
                 "micro_batch": c.cfg.train_batch_size, "gradient_accumulation": c.accum, "compile": "none",
                 "channels_last": speed.channels_last, "optimizer": c.cfg.optimizer, "precision": precision,
                 "device": sig, "num_processes": 1,
                 "fused_optimizer": speed.fused_optimizer and c.cfg.optimizer == "adamw",
                 "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None}
        out.append(TrainState(method, c.cfg, c.ctx, solo, c.losses, c.steps, 0, True, 1, stats, None))
    return out
