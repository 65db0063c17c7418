"""A trainer dies with its run (issue 28, point 1: after kill -9 of a run worker the run was marked failed and its
`gpu` slot given away, but the trainer trained on and its step made the output of the failed run current).
resources/run_watch.py with real processes: a "trainer" that starts a child of its own, both killed once the run's
status says it ended; a run still under way is left alone; the check before an output is made current."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest

from assets_pipeline.resources.run_watch import RunEnded, ensure_run_active, trainer_dies_with_run

TRAINER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(float(sys.argv[2]))
"""


class Instance:
    def __init__(self, status=dg.DagsterRunStatus.STARTED):
        self.status = status

    def get_run_by_id(self, run_id):
        return SimpleNamespace(status=self.status) if self.status is not None else None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in state  # a killed process not yet reaped is a zombie: it runs nothing


def _wait_for(path: Path) -> int:
    deadline = time.time() + 30
    while not (path.is_file() and path.read_text()):
        assert time.time() < deadline
        time.sleep(0.05)
    return int(path.read_text())


def test_the_trainer_and_what_it_started_die_when_the_run_ends(tmp_path):
    instance = Instance()
    context = SimpleNamespace(instance=instance, run_id="r1")
    pid_file = tmp_path / "child.pid"
    earlier = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # not the trainer's
    with pytest.raises(RunEnded, match=r"run r1 ended \(FAILURE\) while its trainer ran: stopped the trainer"):
        with trainer_dies_with_run(context, interval_s=0.1):
            proc = subprocess.Popen([sys.executable, "-c", TRAINER, str(pid_file), "120"])
            child = _wait_for(pid_file)
            instance.status = dg.DagsterRunStatus.FAILURE  # what run monitoring writes for a killed worker
            proc.wait(timeout=20)
    assert proc.returncode == -9
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
    assert earlier.poll() is None  # what the step ran before its trainer is left alone
    earlier.kill()
    earlier.wait()


def test_a_run_under_way_leaves_its_trainer_alone(tmp_path):
    context = SimpleNamespace(instance=Instance(), run_id="r2")
    with trainer_dies_with_run(context, interval_s=0.05):
        proc = subprocess.run([sys.executable, "-c", TRAINER, str(tmp_path / "c.pid"), "0.5"], timeout=60)
    assert proc.returncode == 0


def test_an_asset_invoked_outside_a_run_is_not_watched(tmp_path):
    """No run record (the asset called directly): the trainer runs to its end and nothing is refused."""
    context = SimpleNamespace(instance=Instance(status=None), run_id="none")
    with trainer_dies_with_run(context, interval_s=0.05):
        proc = subprocess.run([sys.executable, "-c", TRAINER, str(tmp_path / "c.pid"), "0.3"], timeout=60)
    assert proc.returncode == 0
    ensure_run_active(context)


def test_an_ended_run_makes_nothing_current():
    instance = Instance()
    context = SimpleNamespace(instance=instance, run_id="r3")
    ensure_run_active(context)
    for status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED, dg.DagsterRunStatus.CANCELING):
        instance.status = status
        with pytest.raises(RunEnded, match=rf"run r3 ended \({status.value}\).*not made current"):
            ensure_run_active(context)


STEP = """
import os, subprocess, sys, time
env = {**os.environ, "DAGSTER_PIPES_CONTEXT": "x"}  # as PipesSubprocessClient starts a trainer
trainer = subprocess.Popen([sys.executable, "-c",
    "from assets_pipeline.training.__main__ import _die_with_launcher; _die_with_launcher(); "
    "import time; open(%r, 'w').write('armed'); time.sleep(120)" % sys.argv[1]], env=env)
open(sys.argv[2], "w").write(str(trainer.pid))
time.sleep(120)
"""


def test_a_trainer_dies_with_the_step_process_that_launched_it(tmp_path):
    """The step process killed outright (SIGKILL): its trainer gets the parent-death signal it armed."""
    armed, pid_file = tmp_path / "armed", tmp_path / "trainer.pid"
    step = subprocess.Popen([sys.executable, "-c", STEP, str(armed), str(pid_file)],
                            cwd=Path(__file__).resolve().parents[1])
    trainer = _wait_for(pid_file)
    deadline = time.time() + 60
    while not armed.is_file():
        assert time.time() < deadline and step.poll() is None
        time.sleep(0.05)
    step.kill()
    step.wait()
    deadline = time.time() + 10
    while _alive(trainer) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(trainer)
