"""A job's checkpoints and the lock that keeps two trainers of one job apart.

Checkpoints are accelerate states (models, optimizer, LR schedule, RNG, and the EMA with use_ema) plus the loss
history, under ``<checkpoint_dir>/<job identity[:16]>/step-N/``: a job resumes only from its own identity's. A
checkpoint is written as ``.step-N.tmp/`` and renamed into place once every process has saved its part, so a
``step-N/`` folder is whole when written; ``files.json`` lists each of its files' sizes, and resuming checks them
(and every safetensors file's header against its length), so a checkpoint damaged since (truncated by a full disk
or a copy) is skipped with a warning for the one before it, or a fresh start.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from assets_pipeline.training.job import TrainJob

log = logging.getLogger(__name__)
TRACKER_RUN = "tensorboard"  # the trackers' run folder, under the checkpoint folder and then in the output


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


def lock_path(job: TrainJob) -> Path:
    return Path(job.checkpoint_dir) / f"{job.identity()[:16]}.lock"


class JobLocked(RuntimeError):
    """Another trainer holds the job's lock, and the caller (``job_lock(wait=False)``) does not wait for it."""


def lock_holder(job: TrainJob) -> str | None:
    """Which run's trainer holds ``job``'s lock (:func:`job_lock`; the run id it wrote there), or None when the
    lock is free. A probe: it takes the lock and gives it back at once (a trainer starting at that instant waits
    for it a moment)."""
    import fcntl

    path = lock_path(job)
    try:
        f = open(path)
    except FileNotFoundError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lines = path.read_text().splitlines()
            return lines[1] if len(lines) > 1 and lines[1] else "an unknown run"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


@contextmanager
def job_lock(job: TrainJob, progress: Callable[[str], None] = log.info, wait: bool = True) -> Iterator[None]:
    """One trainer at a time per job identity: they share a checkpoint folder, and a second one writing into it
    would corrupt the first's states. A second trainer waits, then resumes or retrains. An OS file lock
    (flock), so a killed trainer releases it at once, and whoever takes it next removes what that one left
    half-written (:func:`remove_stale_trainer_temporaries`). Under ``accelerate launch`` only rank 0 takes it and
    writes its launch (and its run id, for :func:`lock_holder`) into the file; the other ranks wait until they
    read their own launch there, not at their first collective (which would time out, after 30 minutes, while
    another trainer holds the lock). A model asset asks :func:`lock_holder` before it launches a trainer, so a
    second run of the same job waits without a GPU slot (assets/models.py)."""
    import fcntl
    import os
    import time

    path = lock_path(job)
    # A launch: its rendezvous address (a free port per launch on this machine) and torchrun run id.
    launch = ":".join(os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"))
    if os.environ.get("RANK", "0") != "0":
        while not (path.is_file() and path.read_text().split("\n")[0] == launch):
            time.sleep(0.5)
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:  # a pack's concept: the pack does not wait for it (its holder's run makes it current)
                lines = path.read_text().splitlines()
                holder = lines[1] if len(lines) > 1 and lines[1] else "(unknown)"
                raise JobLocked(f"concept {job.concept!r}: run {holder} is training this same job ({path}); that "
                                "run makes its output current") from None
            progress(f"another trainer holds {path} (the same job: method, config, base model, training rows); "
                     "waiting for it to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.truncate(0)
        f.write(f"{launch}\n{job.lineage.get('run_id', '')}\n")
        f.flush()
        try:
            for stale in remove_stale_trainer_temporaries(job):
                progress(f"removed stale temporary {stale}: left half-written by a trainer that did not finish")
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


FILES = "files.json"  # a checkpoint's files and their sizes, written last


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """The job's complete checkpoints, newest first."""
    done = [(int(p.name.split("-")[1]), p) for p in root.glob("step-*") if (p / "losses.json").is_file()]
    return sorted(done, reverse=True)


def latest_checkpoint(root: Path) -> tuple[int, Path] | None:
    found = checkpoints(root)
    return found[0] if found else None


def _sizes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != FILES}


def safetensors_damage(path: Path) -> str | None:
    """Why a safetensors file cannot be whole (its header unreadable, or its tensors' extent not its length), or
    None: the format's own framing, checked without reading the tensors."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 + n:
                return f"{size} bytes, shorter than its {n}-byte header"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"unreadable header: {e}"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{size} bytes where its header describes {8 + n + end}"
    return None


def checkpoint_damage(path: Path) -> str | None:
    """Why the checkpoint ``path`` cannot be resumed from, or None: a file listed in its ``files.json`` missing
    or of another size, a safetensors file not matching its header, an unreadable loss history."""
    listed = path / FILES
    if listed.is_file():  # checkpoints from before files.json get the header checks only
        try:
            expected = json.loads(listed.read_text())
        except (OSError, ValueError) as e:
            return f"{FILES} unreadable: {e}"
        actual = _sizes(path)
        for rel, size in expected.items():
            if rel not in actual:
                return f"{rel} is missing"
            if actual[rel] != size:
                return f"{rel} has {actual[rel]} bytes, {size} were written"
    for f in sorted(path.rglob("*.safetensors")):
        if why := safetensors_damage(f):
            return f"{f.relative_to(path)}: {why}"
    try:
        json.loads((path / "losses.json").read_text())
    except (OSError, ValueError) as e:
        return f"losses.json unreadable: {e}"
    return None


def save_checkpoint(accelerator, root: Path, step: int, losses: list[float], keep: int, validation=None) -> None:
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
        (tmp / FILES).write_text(json.dumps(_sizes(tmp)))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
            shutil.rmtree(old)


def resume(accelerator, root: Path, ema=None,
           progress: Callable[[str], None] = log.info) -> tuple[int, list, Path | None]:
    """(first step to train, the losses so far, the checkpoint) from the job's latest checkpoint, or a fresh start.
    Every process reads the same checkpoint (rank 0 removed half-written ones under the job lock, before the
    collectives in prepare() that the other ranks waited on); each restores its own RNG state file."""
    for start, path in checkpoints(root):
        if why := checkpoint_damage(path):
            log.warning("skipping damaged checkpoint %s: %s", path, why)
            progress(f"WARNING: skipping damaged checkpoint {path} ({why}); resuming from an earlier one, or from "
                     "the start")
            continue
        return _load(accelerator, start, path, ema, progress)
    return 0, [], None


def _load(accelerator, start: int, path: Path, ema, progress) -> tuple[int, list, Path]:
    accelerator.load_state(str(path))
    if ema is not None:
        ema.to(accelerator.device)  # accelerate loads custom objects onto the CPU
    losses = json.loads((path / "losses.json").read_text())
    progress(f"resumed from checkpoint at step {start} ({path})")
    return start, losses, path
