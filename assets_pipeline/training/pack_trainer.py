"""Several jobs in one trainer process: ``python -m assets_pipeline.training --pack JOB [JOB ...]`` (issue 26).

The jobs that can share a pack (:func:`~assets_pipeline.training.pack.packable`) train as packs of up to
``pack_size`` (:func:`~assets_pipeline.training.pack.train_pack`); every other job trains alone (``loop.train``),
after the packs, one after another, and the reason it was not packed is logged. Each concept's output is written
exactly as a solo trainer writes it (``output.write_output``), with one more fact in its lineage.json: ``pack``, the
concepts it trained with. Each concept's outcome (its output, or why it failed) is reported on its own, so one
concept that fails (a diverged loss, a damaged input, its job locked by another run) fails alone: a Dagster pack run
turns each outcome into that concept's own materialization or failure (assets/packs.py).
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import traceback
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from assets_pipeline.training.job import TrainJob

log = logging.getLogger(__name__)

Report = Callable[[dict[str, Any]], None]


def units(jobs: Sequence[TrainJob], pack_size: int, progress: Callable[[str], None]) -> list[list[TrainJob]]:
    """The order ``jobs`` train in: each packable group in packs of up to ``pack_size`` (0: no limit), in the
    order given, then each job that cannot be packed alone (its reason logged). Under ``accelerate launch`` (several
    processes) every job trains alone: a pack trains in one process."""
    from assets_pipeline.training.pack import packable

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return [[job] for job in jobs]
    # Two concepts with the same job (the same photos, captions and config: a copied folder) share a job lock and
    # a checkpoint folder, so they never train at the same time: each repeat trains after the packs.
    seen, repeats, distinct = set(), [], []
    for job in jobs:
        (repeats if job.identity() in seen else distinct).append(job)
        seen.add(job.identity())
    groups, refusals = packable(distinct)
    for r in refusals:
        progress(str(r))
    for job in repeats:
        progress(f"concept {job.concept!r} trains alone: its job is the same as another concept's in this run "
                 "(same photos, captions and config), which holds its lock while it trains")
    size = pack_size if pack_size > 0 else max(len(jobs), 1)
    return ([g[i:i + size] for g in groups for i in range(0, len(g), size)] + [[r.job] for r in refusals]
            + [[job] for job in repeats])


def outcome(job: TrainJob, **fields: Any) -> dict[str, Any]:
    """One concept's report: its concept, method and output folder, and either ``data_version`` and ``metadata``
    (the materialization a solo trainer reports) or ``error``."""
    return {"concept": job.concept, "method": job.method, "output_dir": job.output_dir, **fields}


def train_jobs(jobs: Sequence[TrainJob], pack_size: int, progress: Callable[[str], None], report: Report) -> int:
    """Train ``jobs`` in this process and report each one's outcome. Returns the exit status: 0 when every job
    wrote its output, 1 when any failed (each failure reported with its reason; the others' outputs are written)."""
    import torch

    from assets_pipeline.training.checkpoints import JobLocked, checkpoint_root, job_lock
    from assets_pipeline.training.loop import train
    from assets_pipeline.training.output import materialization_metadata, write_output
    from assets_pipeline.training.pack import train_pack

    failed = 0

    def fail(job: TrainJob, error: BaseException | str) -> None:
        nonlocal failed
        failed += 1
        why = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        progress(f"concept {job.concept!r} ({job.method}) failed: {why}")
        report(outcome(job, error=why))

    def write(job: TrainJob, state, pack: list[str]) -> None:
        """Its output, written as the solo trainer writes it, and its outcome reported; called as it leaves its
        pack (``train_pack``'s ``on_done``), while the others train on."""
        if pack:  # a fact of how it was trained, not of what it is: the job identity ignores it
            job = replace(job, lineage={**job.lineage, "pack": {"concepts": pack, "size": len(pack)}})
        try:
            device = "cuda" if job.device != "cpu" and torch.cuda.is_available() else "cpu"
            result = write_output(job, state, device)
        except Exception as e:  # noqa: BLE001 - its own output (validation, disk): it fails alone
            progress(traceback.format_exc())
            fail(job, e)
            return
        shutil.rmtree(checkpoint_root(job), ignore_errors=True)  # done: nothing left to resume
        progress(f"wrote {job.output_dir}: CLIP-T {result['clip_t']:.4f}, CLIP-I {result['clip_i']:.4f}, "
                 f"mean change vs base {result['mean_abs_change_vs_base']:.4f}")
        report(outcome(job, data_version=result["weights_version"],
                       metadata=materialization_metadata(job, state, result)))

    for unit in units(jobs, pack_size, progress):
        with ExitStack() as locks:  # each job's lock, held until its output is written (or it failed)
            locked = []
            for job in unit:
                try:
                    locks.enter_context(job_lock(job, progress, wait=False))
                    locked.append(job)
                except JobLocked as e:
                    fail(job, str(e))
            if not locked:
                continue
            pack = [j.concept for j in locked] if len(locked) > 1 else []
            written: set[int] = set()

            def on_done(i: int, state) -> None:
                written.add(i)
                write(locked[i], state, pack)

            try:
                results: list = train_pack(locked, progress, on_done) if pack else [train(locked[0], progress)]
            except Exception as e:  # noqa: BLE001 - the pack's own error (base model, device): each of its concepts not written fails
                progress(traceback.format_exc())
                results = [e] * len(locked)
            for i, (job, state) in enumerate(zip(locked, results)):
                if i in written:
                    continue
                if isinstance(state, BaseException):
                    fail(job, state)
                elif state.is_main_process:  # under accelerate launch, rank 0 writes and reports
                    write(job, state, pack)
            results = state = None
        gc.collect()  # the unit's models, before the next unit loads its own
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 1 if failed else 0


def load_jobs(paths: Sequence[Path]) -> list[TrainJob]:
    """The job files of a pack, each named in the error when it cannot be read."""
    jobs = []
    for p in paths:
        try:
            jobs.append(TrainJob.load(p))
        except Exception as e:
            raise ValueError(f"{p}: not a readable training job ({type(e).__name__}: {e})") from e
    concepts = [(j.concept, j.method) for j in jobs]
    if len(set(concepts)) != len(concepts):
        raise ValueError(f"a pack names a (concept, method) more than once: {concepts}")
    return jobs
