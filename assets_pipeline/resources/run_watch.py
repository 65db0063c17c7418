"""A trainer dies with the run that launched it, and nothing a failed run started becomes current.

When a run worker is killed (SIGKILL, a node lost), run monitoring marks the run failed and frees its `gpu` slot,
but a step process and the trainer it launched live on: the trainer used to train to the end with the slot given
to the next run, and its step then moved ``current.json`` to the output of a failed run (issue 28, point 1).
While a trainer runs, :func:`trainer_dies_with_run` polls the run's status in the instance; once the run has
ended it kills every process the step started (the trainer, and under ``accelerate launch`` each rank) and the
step fails, naming the run's status. :func:`ensure_run_active` is checked again once the trainer has finished,
before its results are reported and its output is made current.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

# The statuses of a run still under way: any other means it ended (failed, canceled, or finished elsewhere).
ACTIVE = {dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING,
          dg.DagsterRunStatus.STARTED}


class RunEnded(dg.Failure):
    """The run this step belongs to ended while the step ran."""


def run_status(context) -> dg.DagsterRunStatus | None:
    run = context.instance.get_run_by_id(context.run_id)
    return run.status if run is not None else None


def ensure_run_active(context) -> None:
    """Raise :class:`RunEnded` when the step's run is no longer under way (its output must not become current).
    A step with no run record (an asset invoked directly, outside a run) has nothing to check."""
    status = run_status(context)
    if status is not None and status not in ACTIVE:
        raise RunEnded(description=f"run {context.run_id} ended ({status.value}) while this step ran: its trainer's "
                                   "output is not made current")


def children(pid: int) -> list[int]:
    """The processes ``pid`` started that still run (Linux: /proc/<pid>/task/*/children)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the task ended meanwhile
            continue
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, parents before their children."""
    out, todo = [], [pid]
    while todo:
        found = children(todo.pop())
        out += found
        todo += found
    return out


def kill_trees(roots: list[int]) -> list[int]:
    """SIGKILL each of ``roots`` and every process below it, parents first (so none starts another meanwhile);
    returns those signalled."""
    killed = []
    for pid in [p for root in roots for p in (root, *descendants(root))]:
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed


@contextmanager
def trainer_dies_with_run(context, interval_s: float = 2.0) -> Iterator[None]:
    """Run the body (which launches and waits for a trainer) while a thread polls the run's status every
    ``interval_s``; when the run has ended, every process the body started (and each below it) is killed and the
    step fails with :class:`RunEnded`. Linux only (the process tree is read from /proc); elsewhere the body runs
    unwatched."""
    if not Path("/proc/self/task").is_dir() or run_status(context) is None:  # no /proc, or no run to watch
        yield
        return
    stop, ended = threading.Event(), {}
    from assets_pipeline.resources.spare_trainer import pids as spare

    # What this process ran already is not the trainer's, except a trainer started ahead that this step may take.
    before = set(children(os.getpid())) - spare()

    def watch() -> None:
        while not stop.wait(interval_s):
            status = run_status(context)
            if status is None or status in ACTIVE:
                continue
            ended["status"] = status
            ended["killed"] = kill_trees([p for p in children(os.getpid()) if p not in before])
            return

    thread = threading.Thread(target=watch, name="trainer-dies-with-run", daemon=True)
    thread.start()
    try:
        yield
    except Exception as e:
        stop.set()
        thread.join()
        if ended:
            raise _ended(context, ended) from e
        raise
    stop.set()
    thread.join()
    if ended:
        raise _ended(context, ended)


def _ended(context, ended: dict) -> RunEnded:
    return RunEnded(description=(
        f"run {context.run_id} ended ({ended['status'].value}) while its trainer ran: stopped the "
        f"trainer (processes {ended['killed']}); nothing it made is current"))
