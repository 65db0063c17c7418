"""Many concepts, one GPU: the LoRAs (or textual-inversion tokens) of several concepts trained in one process over
one frozen base (issue 26).

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

Textual-inversion concepts on one base pack too (a pack is all LoRA or all textual inversion): one set of text
encoders whose input embedding tables get one new row per concept, each concept's captions tokenized by its own
tokenizer (solo's: the base's with its token added) and its token's id mapped to its row, so concepts may even share
a placeholder. Each row starts where solo's ``TextualInversionMethod.prepare`` starts it (prepare itself runs on a
copy of the encoders, after ``set_seed(cfg.seed)``). Solo steps the whole embedding with AdamW and restores every
other row after the step; AdamW acts per element, so a concept's row is stepped by an AdamW of its own over that row
alone (weight decay included), and the gradient it gets is clipped by solo's norm: that of the whole embedding's
gradient, whose non-zero rows are every row its captions used (the shared words' rows too, not its token's alone),
summed from the gradient of each of its text-encoder forwards' embedding outputs. Optimizers other than AdamW are
refused (8-bit AdamW, Adafactor and Prodigy are not per element).

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
    """What the concepts of one pack share: the method (a pack is all LoRA or all textual inversion), the frozen
    base (its weights' fingerprint), for LoRA the adapter shape (rank and target modules: one packed layer per
    module), and how the step runs (device, precision, gradient checkpointing)."""
    ref, cfg = job.base_model, job.config
    if job.method == "textual_inversion":  # the frozen base and text encoders; one new embedding row per concept
        return (job.method, ref.fingerprint, ref.family, ref.prediction_type, job.device, job.mixed_precision)
    return (job.method, ref.fingerprint, ref.family, ref.prediction_type, cfg.rank, tuple(sorted(_targets(job))),
            job.device, job.mixed_precision, cfg.gradient_checkpointing)


def refusal(job: TrainJob) -> str | None:
    """Why ``job`` cannot train in a pack, or None when it can."""
    from assets_pipeline.training.checkpoints import checkpoint_root, checkpoints

    cfg, where = job.config, f"concept {job.concept!r} trains alone:"
    if job.method not in ("lora", "textual_inversion"):
        return f"{where} method {job.method!r} (a pack trains LoRA adapters or textual-inversion tokens only)"
    section = f"[{job.method}]"
    settings = _ti_settings(cfg) if job.method == "textual_inversion" else (
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


def _ti_settings(cfg) -> tuple:
    """The textual-inversion settings a pack refuses: (key, refused, why)."""
    return (
        ("optimizer", cfg.optimizer != "adamw",
         "a packed token's row is stepped alone, which equals solo's step of the whole embedding only for AdamW "
         "(per element); 8-bit AdamW, Adafactor and Prodigy see the other rows too"),
        ("shuffle_caption", cfg.shuffle_caption, "a pack tokenizes each concept's captions once"),
        ("validation_steps", cfg.validation_steps != 0, "a pack does not validate during training (yet)"),
    )


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
    # textual inversion: its own method instance (its placeholder ids, as solo's prepare sets them), its rows in
    # the pack's embedding tables (one per text encoder) and the (encoder, token ids, embedding output) of each
    # text-encoder forward since its last optimizer step
    ti: Any = None
    pids: list = field(default_factory=list)
    tape: list = field(default_factory=list)
    result: Any = None  # its TrainState once it left the pack, handed to on_done then

    @property
    def training(self) -> bool:
        return self.error is None and self.done < self.steps

    def fail(self, error: BaseException, progress: Callable[[str], None]) -> None:
        self.error = error
        self.optimizer = self.scheduler = self.ema = None
        progress(f"pack: concept {self.job.concept!r} leaves the pack: {error}")

    def load(self, models: Models, method, device) -> None:
        """As solo starts: ``set_seed``, the pack's models with its own objective, and its training data (``prepare``,
        which may draw, follows: the caller's)."""
        from accelerate.utils import set_seed

        set_seed(self.cfg.seed)
        self.models = replace(models, objective=models.family.objective.configured(self.cfg))
        self.data = TrainingData.from_bundle(self.job.latents_dir, self.job.training_images,
                                             lambda text, ctx=self.ctx: method.training_caption(text, ctx),
                                             control=False).to(device)

    def plan_steps(self, method) -> None:
        """Its caption dropout checked, its step count and accumulation, and solo's schedule of rows per step."""
        self.data.check_caption_dropout(self.cfg.caption_dropout)
        self.steps = self.cfg.total_steps(self.ctx.num_instance_images)
        self.accum = self.cfg.gradient_accumulation_steps
        group = self.cfg.train_batch_size * self.accum
        self.samples, self.rows, self.index = self.data.schedule(method.batch_roles(self.cfg), 0, self.steps,
                                                                 self.cfg.train_batch_size, self.accum, 1, 0,
                                                                 self.cfg.seed, group)

    def optimize(self, params: list, speed) -> None:
        """Its trained parameters, with solo's optimizer, LR schedule (its own steps and warm-up) and EMA."""
        from diffusers.optimization import get_scheduler

        self.params = params
        self.optimizer = make_optimizer(self.cfg, params, speed.fused_optimizer and self.cfg.optimizer == "adamw")
        self.scheduler = get_scheduler(self.cfg.lr_scheduler, self.optimizer,
                                       num_warmup_steps=self.cfg.lr_warmup_steps, num_training_steps=self.steps)
        if self.cfg.use_ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(params, decay=self.cfg.ema_decay)

    def stepped(self, step: int, loss, started: float, progress: Callable[[str], None]) -> None:
        """After its optimizer step ``step``: its EMA, its loss kept, and at solo's log points the loss checked
        (a divergence is found at the step solo finds it: it fails alone) and logged; at its step count it
        leaves the pack."""
        import torch

        if self.ema is not None:
            self.ema.step(self.params)
        self.done = step
        self.pending.append(loss)
        if (step % self.job.performance.log_every == 0 or step == self.steps
                or step % self.cfg.checkpointing_steps == 0 or step == 1):
            new = torch.stack(self.pending).float().tolist()
            self.losses.extend(new)
            self.pending = []
            lr = self.scheduler.get_last_lr()[0]
            try:
                check_losses(new, step, self.steps, lr, self.job)
            except DivergedTraining as e:
                self.fail(e, progress)
                return
            progress(f"pack: {self.job.concept!r} step {step}/{self.steps} ({100 * step // self.steps}%) loss "
                     f"{self.losses[-1]:.5f} lr {lr:.2e}")
        if step == self.steps:
            self.train_s = time.perf_counter() - started
            self.optimizer = self.scheduler = None  # its states are not needed any more
            progress(f"pack: {self.job.concept!r} trained its {self.steps} steps and leaves the pack")


def _announce(live: list, what: str, models: Models, device, precision: str, progress) -> None:
    progress(f"pack: training {len(live)} {what} over one {models.family.name} base on {device} "
             f"(precision {precision}): " + ", ".join(
                 f"{c.job.concept!r} {c.steps} steps, batch {c.cfg.train_batch_size}x{c.accum}, lr "
                 f"{c.cfg.learning_rate:g}" for c in live))


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
    """A solo-shaped Models for ``concept``: a denoiser that shares the frozen base's weights (the pack's, without
    its packed layers) and carries the concept's trained adapter as a plain PEFT adapter named ``default``,
    added as ``LoraMethod.prepare`` adds it (fp32 weights, as training leaves them): what ``method.save`` reads."""
    import torch
    from diffusers.training_utils import cast_training_params
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from assets_pipeline.training.packing import remove_packed_lora

    base = models.denoiser
    shared = {id(t): t for t in (*base.parameters(), *base.buffers())}
    denoiser = copy.deepcopy(base, memo=shared)  # new modules, the same weight tensors
    remove_packed_lora(denoiser)  # made while the pack trains on: the copy's layers are the base's again
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


def train_pack(jobs: Sequence[TrainJob], progress: Callable[[str], None] = log.info,
               on_done: Callable[[int, TrainState], None] | None = None) -> list:
    """Train ``jobs`` (one group of :func:`packable`) as one pack in this process. Returns one entry per job, in
    order: its :class:`TrainState` (for ``output.write_output``, as ``loop.train``'s), or the exception that
    ended it alone (a :class:`DivergedTraining`, or an error in its own inputs); the others trained on. Errors
    of the pack itself (the base model, the device) raise. How the step runs (channels_last, fused AdamW, TF32)
    follows the first job's ``performance``; each concept logs and checks its losses at its own solo log points.

    ``on_done(index, state)``: called for each concept that trained when it leaves the pack, at its last step, so
    its output can be written then while the others train on (a pack writes no checkpoints: what is written is
    what a later crash of the pack does not lose). Torch's random state is restored after each call."""
    import torch
    from peft.utils import get_peft_model_state_dict

    from assets_pipeline.training.packing import (
        adapter_parameters,
        inject_packed_lora,
        load_adapter_state,
        remove_packed_lora,
        rows,
    )
    from assets_pipeline.training.runtime.backends import configure_backends
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
    first = jobs[0]
    method = get_method(first.method)
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
    if first.method == "textual_inversion":
        return _train_textual_inversion(concepts, method, device, precision, weight_dtype, speed, progress, jobs,
                                        on_done)

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
            c.load(models, method, device)  # solo: set_seed, load the base (no draws), the data, then prepare
            trainable = method.prepare(c.models, c.cfg, c.ctx)
            if trainable != [denoiser.component]:
                raise RuntimeError(f"a packed LoRA trains {denoiser.component!r} alone, this one {trainable}")
            c.initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(models.denoiser).items()}
            c.plan_steps(method)
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
            c.optimize(adapter_parameters(models.denoiser, c.slot), speed)
    _announce(live, "LoRA adapters", models, device, precision, progress)

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
            c.stepped(step, step_loss[c], started, progress)
        for c in live:  # those that left the pack at this step: their results now (after every one's step timing)
            if c in step_loss and c.error is None and not c.training:
                _finish(c, jobs, on_done, progress, lambda c: _lora_result(c, models, method, live, speed, precision,
                                                                           device))

    # -- each concept's adapter as solo's result (each one's made as it left the pack) ---------------------------
    if live:
        remove_packed_lora(models.denoiser)
    return [c.error if c.error is not None else c.result for c in concepts]


def _finish(c: _Concept, jobs: Sequence[TrainJob], on_done, progress, result: Callable[[_Concept], Any]) -> None:
    """A concept leaves the pack: its result made (``result(c)``: a check of its weights that fails makes it fail
    alone) and handed to ``on_done``. The random states (torch's, Python's, NumPy's) are as they were after, for the
    others' steps: making a result seeds (textual inversion's ``prepare``) and initialises adapters."""
    import random

    import numpy as np
    import torch

    py, npy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
            try:
                c.result = result(c)
            except DivergedTraining as e:
                c.fail(e, progress)
                return
            if on_done is not None:
                on_done(jobs.index(c.job), c.result)
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def _lora_result(c: _Concept, models: Models, method, live: list, speed, precision: str, device) -> TrainState:
    """Its adapter as solo's result: the EMA's average where it keeps one, its weights checked, then a solo-shaped
    :class:`TrainState` (:func:`_solo_models`) whose denoiser shares the pack's frozen weights."""
    from assets_pipeline.training.packing import adapter_state
    from assets_pipeline.training.runtime.compilation import device_signature

    if c.ema is not None:  # the output is the average, as solo's
        c.ema.copy_to(c.params)
    check_weights(c.params, c.steps, c.job)
    state = {k: v.detach().clone() for k, v in adapter_state(models.denoiser, c.slot).items()}
    solo = _solo_models(models, method, c, state)
    return TrainState(method, c.cfg, c.ctx, solo, c.losses, c.steps, 0, True, 1,
                      _stats(c, live, method, speed, precision, device, device_signature().get("gpu", "cpu")), None)


def _stats(c: _Concept, live: list, method, speed, precision: str, device, sig) -> dict:
    """A packed concept's training_speed record (solo's keys, and whom it was packed with)."""
    import torch

    images = c.cfg.train_batch_size * len(method.batch_roles(c.cfg)) * c.accum * c.steps
    return {"packed": True, "pack_size": len(live), "packed_with": [o.job.concept for o in live if o is not c],
            "train_s": round(c.train_s, 2), "images_per_s": round(images / c.train_s, 3) if c.train_s else None,
            "micro_batch": c.cfg.train_batch_size, "gradient_accumulation": c.accum, "compile": "none",
            "channels_last": speed.channels_last, "optimizer": c.cfg.optimizer, "precision": precision,
            "device": sig, "num_processes": 1,
            "fused_optimizer": speed.fused_optimizer and c.cfg.optimizer == "adamw",
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None}


# -- textual inversion --------------------------------------------------------------------------------------------

def _ti_solo_models(models: Models, originals: list, c: _Concept):
    """(method, models) as solo's ``TextualInversionMethod.prepare`` leaves them for concept ``c``: a method
    instance of its own (its placeholder ids), tokenizers copied with its token added, text encoders sharing the
    base's weights but each with its own input embedding, the base's (``originals``) resized and with its new row
    initialised by ``prepare`` itself. The pack's text encoders must hold ``originals`` when it is called."""
    from assets_pipeline.training.methods.textual_inversion import TextualInversionMethod

    encoders = []
    for te, original in zip(models.text_encoders, originals):
        if te.get_input_embeddings() is not original:
            raise RuntimeError("the pack's text encoders do not hold their own input embeddings")
        shared = {id(t): t for t in (*te.parameters(), *te.buffers()) if t is not original.weight}
        encoders.append(copy.deepcopy(te, memo=shared))  # new modules, the same weights but the embedding's
    solo = replace(models, text_encoders=tuple(encoders), tokenizers=tuple(copy.deepcopy(t) for t in models.tokenizers),
                   objective=c.models.objective)
    method = TextualInversionMethod()
    method.prepare(solo, c.cfg, c.ctx)
    return method, solo


def _clip_rows(c: _Concept, dims: list[int], padding: list) -> None:
    """Its rows' gradients as solo's clipped embedding gradients: from the gradient of each of its text-encoder
    forwards' embedding outputs since its last step, summed per token id (what the embedding's backward does),
    the norm over every row its captions used (solo's whole embedding's gradient norm: only those rows have one)
    and its own row's gradient, scaled as ``clip_grad_norm_`` scales it."""
    import torch

    norms = []
    for e, (param, pid) in enumerate(zip(c.params, c.pids)):
        records = [(ids, out) for k, ids, out in c.tape if k == e]
        ids = torch.cat([i.reshape(-1) for i, _ in records])
        grads = torch.cat([o.grad.reshape(-1, dims[e]) if o.grad is not None else torch.zeros_like(o).reshape(
            -1, dims[e]) for _, o in records])
        if padding[e] is not None:  # the padding row gets no gradient (nn.Embedding's padding_idx)
            grads = grads * (ids != padding[e])[:, None]
        unique, inverse = torch.unique(ids, return_inverse=True)
        rows = torch.zeros(len(unique), dims[e], device=grads.device, dtype=grads.dtype).index_add_(0, inverse, grads)
        norms.append(torch.linalg.vector_norm(rows))
        param.grad = (rows * (unique == pid)[:, None]).sum(0, keepdim=True).to(param.dtype)
    c.tape = []
    total = torch.linalg.vector_norm(torch.stack(norms))
    coefficient = torch.clamp(c.cfg.max_grad_norm / (total + 1e-6), max=1.0)  # torch's clip_grad_norm_
    for param in c.params:
        param.grad.mul_(coefficient)


def _train_textual_inversion(concepts: list[_Concept], method, device, precision: str, weight_dtype, speed,
                             progress: Callable[[str], None], jobs: Sequence[TrainJob] = (), on_done=None) -> list:
    """``train_pack`` for textual-inversion jobs: one frozen base and one set of text encoders, whose input
    embedding tables get one new row per concept (per encoder); each concept's captions are tokenized with its own
    token as solo's are (its tokenizer: the base's with its token added), that token's id then mapped to its row
    in the pack's table. Each step runs each concept's text-encoder forward on its own rows (its own conditioning),
    the denoiser over every concept's rows at once (one forward per batch shape), per-concept losses and one
    backward. The optimizer of each concept steps its own rows only: solo's AdamW steps the whole embedding and
    ``after_step`` restores every other row, so its row's update is AdamW on that row (per element, weight decay
    included), with the gradient clipped by the norm solo clips by, that of every row its captions used
    (:func:`_clip_rows`). No concept's row is in another's optimizer, and its row in the table is written only
    from its own parameter."""
    import torch
    from accelerate.utils import set_seed

    from assets_pipeline.training.runtime.compilation import device_signature

    first = concepts[0].job
    before = torch.random.get_rng_state()
    models = Models.load(first.base_model, True, None)
    if not torch.equal(before, torch.random.get_rng_state()):
        log.warning("loading base model %r drew from torch's random generator: solo training seeds before loading",
                    first.base_model.source)
    originals = [te.get_input_embeddings() for te in models.text_encoders]
    names = list(models.family.text_encoder_names)
    initial: dict[_Concept, list] = {}
    solo_ids: dict[_Concept, list] = {}
    for c in concepts:
        if c.error is not None:
            continue
        try:
            c.load(models, method, device)  # solo: set_seed, load the base, the data, then prepare (its resize draws)
            c.ti, solo = _ti_solo_models(models, originals, c)
            c.data.tokenize(solo.tokenizers)  # solo's token ids: its token at solo's id
            solo_ids[c] = [c.ti.placeholder_ids[n] for n in names]
            initial[c] = [solo.network(n).get_input_embeddings().weight[pid].detach().clone()
                          for n, pid in zip(names, solo_ids[c])]
            del solo
            c.plan_steps(method)
        except Exception as e:  # noqa: BLE001 - its own data or settings: it fails alone
            c.fail(e, progress)
    live = [c for c in concepts if c.error is None]

    # -- one table per encoder: the base's rows, then each concept's row ----------------------------------------
    tables, padding, dims = [], [], []
    recording: list = [None]  # the concept whose text-encoder forward runs

    def hook(e):
        def record(module, args, output):
            ids = args[0] if args else None
            out = output.detach().requires_grad_()  # its gradient, per position, is summed per row by _clip_rows
            recording[0].tape.append((e, ids, out))
            return out
        return record

    hooks = []
    for e, (te, original) in enumerate(zip(models.text_encoders, originals)):
        base = original.num_embeddings
        weight = original.weight.detach()
        rows = [initial[c][e].to(weight) for c in live]
        table = torch.nn.Embedding(base + len(live), weight.shape[1], padding_idx=original.padding_idx,
                                   device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            table.weight.copy_(torch.cat([weight, *(r[None] for r in rows)]))
        table.requires_grad_(False)
        te.set_input_embeddings(table)
        tables.append(table)
        padding.append(original.padding_idx)
        dims.append(weight.shape[1])
        for slot, c in enumerate(live):
            c.slot = slot
            c.pids.append(base + slot)
    for c in live:  # its token's id in solo's tokenizer -> its row in the pack's table
        remap = [(old, new) for old, new in zip(solo_ids[c], c.pids)]
        c.data.token_ids = tuple(torch.where(t == old, new, t) for t, (old, new) in zip(c.data.token_ids, remap))
        c.data.empty_ids = tuple(torch.where(t == old, new, t) for t, (old, new) in zip(c.data.empty_ids, remap))
    place_networks(models, [], device, weight_dtype, first.config, speed.channels_last)  # all frozen
    for table in tables:  # solo's embedding: cast with its encoder, then to fp32 master weights (trained)
        table.to(dtype=torch.float32)
    for c in live:
        c.optimize([torch.nn.Parameter(t.weight[pid].detach().clone()[None]) for t, pid in zip(tables, c.pids)],
                   speed)
    for e, table in enumerate(tables):
        hooks.append(table.register_forward_hook(hook(e)))
    _announce(live, "textual-inversion tokens", models, device, precision, progress)
    sig = device_signature().get("gpu", "cpu")

    def result(c: _Concept) -> TrainState:
        """Its token as solo's result (the pack's text encoders holding the base's own tables): the EMA's average
        where it keeps one, its weights checked, then solo's models with its row."""
        if c.ema is not None:
            c.ema.copy_to(c.params)
        check_weights(c.params, c.steps, c.job)
        set_seed(c.cfg.seed)
        ti, solo = _ti_solo_models(models, originals, c)
        for n, param in zip(names, c.params):
            emb = solo.network(n).get_input_embeddings()
            emb.to(device, weight_dtype)  # as place_networks leaves solo's: cast, then fp32 master weights
            emb.to(dtype=torch.float32)
            with torch.no_grad():
                emb.weight[ti.placeholder_ids[n]] = param[0].detach().to(emb.weight.dtype)
        return TrainState(ti, c.cfg, c.ctx, solo, c.losses, c.steps, 0, True, 1,
                          _stats(c, live, method, speed, precision, device, sig), None)

    # -- the step loop ------------------------------------------------------------------------------------------
    autocast = (lambda: torch.autocast(device.type, dtype=weight_dtype)) if precision == "bf16" else nullcontext
    started, step = time.perf_counter(), 0
    try:
        while training := [c for c in live if c.training]:
            step_loss = {c: torch.zeros((), device=device) for c in training}
            for m in range(max(c.accum for c in training)):
                members = [c for c in training if m < c.accum]
                inputs = []
                for c in members:
                    k = step * c.accum + m
                    g = seeded_generator("step", c.cfg.seed, c.samples[k], device=device)
                    parts = c.data.draw(c.rows[k], g, models.scaling_factor, c.cfg.random_flip, index=c.index[k],
                                        caption_dropout=c.cfg.caption_dropout, shift_factor=models.shift_factor)
                    recording[0] = c
                    with autocast():
                        inputs += [(c, part_inputs(method, c.models, b, c.cfg, g, weight_dtype, speed.channels_last))
                                   for b in parts]
                    recording[0] = None
                shapes: dict[tuple, list[int]] = {}
                for i, (_, x) in enumerate(inputs):
                    shapes.setdefault(_signature(x), []).append(i)
                row_losses: list = [None] * len(inputs)
                with autocast():
                    for members_of_shape in shapes.values():
                        group = [inputs[i] for i in members_of_shape]
                        sizes = [len(x.noised.noisy) for _, x in group]
                        pred = method.predict(models, torch.cat([x.noised.noisy for _, x in group]),
                                              torch.cat([x.noised.timesteps for _, x in group]),
                                              torch.cat([x.embeds for _, x in group]),
                                              _cat_batches([x.batch for _, x in group]))
                        if precision != "no" and pred.dtype != torch.float32:
                            pred = pred.float()
                        for i, (c, x), p in zip(members_of_shape, group, torch.split(pred, sizes)):
                            row_losses[i] = part_losses(c.models, p, x, c.cfg)
                    total = 0
                    for c in members:
                        mine = [i for i, (owner, _) in enumerate(inputs) if owner is c]
                        loss = method.loss(torch.cat([row_losses[i] for i in mine]),
                                           torch.cat([inputs[i][1].batch.is_class for i in mine]), c.cfg)
                        total = total + loss / c.accum
                        step_loss[c] += loss.detach() / c.accum
                total.backward()
            step += 1
            for c in training:
                _clip_rows(c, dims, padding)
                c.optimizer.step()
                c.scheduler.step()
                c.optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():  # its row in the table: the next forward reads it
                    for table, pid, param in zip(tables, c.pids, c.params):
                        table.weight[pid] = param[0].to(table.weight.dtype)
                c.stepped(step, step_loss[c], started, progress)
            for c in training:  # those that left the pack at this step: their results now, made on the base's own
                if c.error is None and not c.training:  # tables, then the pack's again
                    for te, original in zip(models.text_encoders, originals):
                        te.set_input_embeddings(original)
                    try:
                        _finish(c, jobs, on_done, progress, result)
                    finally:
                        for te, table in zip(models.text_encoders, tables):
                            te.set_input_embeddings(table)
    finally:
        for h in hooks:
            h.remove()
        for te, original in zip(models.text_encoders, originals):  # the base's own tables back
            te.set_input_embeddings(original)
            original.to(device)

    # -- each concept's token as solo's result (each one's made as it left the pack) -----------------------------
    return [c.error if c.error is not None else c.result for c in concepts]
