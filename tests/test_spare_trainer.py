"""The trainer started ahead of its job (resources/spare_trainer.py; issue 28, point 16): it dies with the process
that started it, also once it took a job; it is discarded where it is not exactly the process the step would
start, or when no training took it; handed a job, it runs the trainer's own entry point with the arguments given.

A whole build that hands its training to one is tests/test_training.py::
test_a_build_hands_its_first_training_to_a_trainer_started_ahead_and_a_rebuild_starts_none.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from assets_pipeline.resources import spare_trainer

REPO = Path(__file__).resolve().parents[1]
CACHE = "/nonexistent/artifacts/cache"  # a spare only names it in its environment


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a spare trainer still running (not a zombie, not a later process given the same pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return spare_trainer.WAIT_FOR_JOB.encode() in cmdline and state != "Z"


def _wait_started(pid: int, timeout_s: float = 30) -> None:
    """Until ``pid`` runs the spare's command line (right after the fork it still shows its parent's)."""
    start = time.monotonic()
    while not _alive(pid):
        assert time.monotonic() - start < timeout_s, f"spare trainer {pid} not running after {timeout_s} s"
        time.sleep(0.05)


def _wait_gone(pid: int, timeout_s: float) -> float:
    start = time.monotonic()
    while _alive(pid):
        assert time.monotonic() - start < timeout_s, f"spare trainer {pid} still runs after {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture
def spare():
    """Allowed in the test's own body (pytest changes PYTEST_CURRENT_TEST between a test's phases, and a spare
    started with another environment than the trainer's is never used); discarded after it."""
    yield spare_trainer
    spare_trainer.discard()


def test_none_is_started_unless_a_training_step_allowed_it_and_an_unused_one_is_killed_with_the_run(spare):
    assert not spare_trainer.allowed() and spare_trainer.expect_training(CACHE) is False
    spare_trainer.allow()
    assert spare_trainer.expect_training(CACHE) is True
    [pid] = spare_trainer.pids()
    _wait_started(pid)
    assert spare_trainer.expect_training(CACHE) is False, "one spare at a time"
    spare_trainer.discard()  # the run's resources torn down: the spare no training took ends
    assert spare_trainer.pids() == set() and not _alive(pid)


@pytest.mark.parametrize("why", ["another command", "another environment", "an environment variable removed",
                                 "another artifact root"])
def test_a_spare_is_discarded_where_it_is_not_the_process_the_step_would_start(spare, tmp_path, why):
    spare_trainer.allow()
    assert spare_trainer.expect_training(CACHE)
    [pid] = spare_trainer.pids()
    _wait_started(pid)
    command = [*spare_trainer.TRAINER, "--job", "job.json"]
    env = spare_trainer.trainer_env({"DAGSTER_PIPES_CONTEXT": "x"}, CACHE)
    if why == "another command":
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", *command[1:]]
    elif why == "another environment":
        env["CUDA_VISIBLE_DEVICES"] = "1"
    elif why == "an environment variable removed":
        env.pop("PATH")
    else:  # the compilers' caches would be another artifact root's
        env = spare_trainer.trainer_env({"DAGSTER_PIPES_CONTEXT": "x"}, "/elsewhere/cache")
    assert spare_trainer.take(command, env, str(tmp_path)) is None
    _wait_gone(pid, 5)


def test_a_spare_handed_a_job_runs_the_trainers_entry_point_with_its_arguments(spare, tmp_path):
    spare_trainer.allow()
    assert spare_trainer.expect_training(CACHE)
    process, ahead = spare_trainer.take([*spare_trainer.TRAINER, "--no-such-option"],
                                        spare_trainer.trainer_env(cache_dir=CACHE), str(tmp_path))
    assert ahead >= 0 and spare_trainer.pids() == set()  # taken: no longer the run's to discard
    # argparse's usage error (2): not the quiet end of a spare with no job (0), nor a failed import (1)
    assert process.wait(timeout=120) == 2


HOLDER = '''
import sys, time
from assets_pipeline.resources import spare_trainer as s
s.allow()
assert s.expect_training(sys.argv[2])
process, _ = s.take([*s.TRAINER, "--job", sys.argv[1]], s.trainer_env(cache_dir=sys.argv[2]), sys.argv[2])
print(process.pid, flush=True)
time.sleep(600)
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_a_spare_that_took_its_job_dies_with_the_process_that_started_it(tmp_path):
    """Issue 28, point 1, for a trainer started ahead: the process that started it (the run worker, which runs the
    steps in process) is killed with SIGKILL while the trainer works; the trainer must not live on. The job file
    is a FIFO no one writes, so the trainer blocks reading it, as long as a training: only the parent-death
    signal it armed at its start, before any job, can end it."""
    job = tmp_path / "job.json"
    os.mkfifo(job)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(job), str(tmp_path)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        pid = int(holder.stdout.readline())
        assert _alive(pid)
        time.sleep(1.0)
        assert _alive(pid), "the trainer ended by itself: it should be blocked reading its job"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    _wait_gone(pid, 5)


def test_trainers_get_the_environment_their_run_started_with_and_the_compilers_caches_in_the_artifact_root(
        spare, monkeypatch, tmp_path):
    """What the dataset steps' imports set in the run worker reaches no trainer (importing diffusers sets
    TORCHINDUCTOR_CACHE_DIR to /tmp); a spare starts with the compilers' caches in the artifact root, before it
    imports the libraries that would fix them elsewhere."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    spare_trainer.allow()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_someone")  # as importing torch._dynamo does
    monkeypatch.setenv("LD_LIBRARY_PATH", "/somewhere/cv2/lib64")  # as importing OpenCV does
    env = spare_trainer.trainer_env(cache_dir=tmp_path / "cache")
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
    assert env["TRITON_CACHE_DIR"] == str(tmp_path / "cache" / "triton")
    assert env.get("LD_LIBRARY_PATH") == spare_trainer._run_env.get("LD_LIBRARY_PATH") != "/somewhere/cv2/lib64"
    assert spare_trainer.expect_training(tmp_path / "cache")
    [pid] = spare_trainer.pids()
    _wait_started(pid)
    started_with = dict(v.split("=", 1) for v in
                        Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in v)
    assert started_with["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # set by the user for the run: kept
    spare_trainer.allow()
    assert spare_trainer.trainer_env(cache_dir=tmp_path / "cache")["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
