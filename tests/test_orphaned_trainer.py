"""Issue 28, point 1, as found: `dagster-daemon run`, a run submitted with `dagster job launch`, its run worker
killed with SIGKILL while the trainer runs. The run is failed (run monitoring) and its `gpu` slot freed; the
trainer must die with it and nothing that run started may become current.

The code location's asset does what a model asset does around its trainer (assets/models.py): it launches it
through the project's TrainerLauncher (Pipes, trainer_dies_with_run), then ensure_run_active, then writes its
"current" pointer. The trainer is a stand-in that arms the real trainer's parent-death signal
(training/__main__._die_with_launcher), reports its pid, and writes its output after a minute unless killed.
Both executors: with the multiprocess one the step process outlives the killed worker (the run's status poll
stops the trainer); in process the step dies with the worker (the parent-death signal stops it).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from daemon_helpers import daemon_home, kill_group, launch, launched, start_daemon, wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

TRAINER = '''
import os, sys, time
from pathlib import Path
from assets_pipeline.training.__main__ import _die_with_launcher
_die_with_launcher()
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    work = Path(sys.argv[1])
    (work / "trainer.pid").write_text(str(os.getpid()))
    time.sleep(60)
    (work / "output").write_text("trained")
    pipes.report_asset_materialization(metadata={"trained": True})
'''

CODE = '''
import os
import sys
from pathlib import Path

import dagster as dg

from assets_pipeline.resources import TrainerLauncher
from assets_pipeline.resources.run_watch import ensure_run_active

WORK = Path({work!r})


class StandIn(TrainerLauncher):
    def command(self, job_path):
        return [sys.executable, str(WORK / "trainer.py"), str(WORK)]


@dg.asset(pool="gpu")
def model(context: dg.AssetExecutionContext):
    (WORK / "step.pid").write_text(str(os.getpid()))
    invocation = StandIn(device="cpu").launch(context, WORK / "job.json")
    ensure_run_active(context)
    yield from invocation.get_results()
    (WORK / "current").write_text(context.run_id)


defs = dg.Definitions(assets=[model], jobs=[
    dg.define_asset_job("train", [model], executor_def={executor}),
])
'''


def _shipped_config() -> dict:
    """The shipped dagster.yaml with only its timing values shortened, so a dead run is failed within seconds."""
    config = yaml.safe_load((REPO / "dagster_home" / "dagster.yaml").read_text())
    config["run_monitoring"].update(poll_interval_seconds=1, free_slots_after_run_end_seconds=2)
    config["run_queue"] = {"dequeue_interval_seconds": 1}
    return config


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _run_worker(step_pid: int) -> int:
    """The run worker: the process the code server (`dagster api grpc`) started for the run, at or above the step
    (the step's own process in process; under the multiprocess executor, the step's fork server's parent)."""
    pid = step_pid
    while pid > 1:
        if b"api\0grpc" in Path(f"/proc/{_parent(pid)}/cmdline").read_bytes():
            return pid
        pid = _parent(pid)
    raise AssertionError(f"no run worker above process {step_pid}")


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("executor", ["dg.multiprocess_executor", "dg.in_process_executor"])
def test_a_killed_run_worker_takes_its_trainer_with_it_and_makes_nothing_current(tmp_path, executor):
    import dagster as dg

    config = _shipped_config()
    config["run_retries"] = {"enabled": False}  # the retry of a dead run: the test below
    (tmp_path / "trainer.py").write_text(TRAINER)
    workspace, env = daemon_home(tmp_path, config, CODE.format(work=str(tmp_path), executor=executor))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    log = tmp_path / "daemon.log"
    run_id = "cccccccc-0000-4000-8000-000000000003"
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        daemon = start_daemon(workspace, env, log)
        try:
            launched(launch(workspace, env, "train", run_id))
            wait_for("the trainer to start", lambda: (tmp_path / "trainer.pid").is_file()
                     and (tmp_path / "trainer.pid").read_text(), 120, log)
            trainer = int((tmp_path / "trainer.pid").read_text())
            step = int((tmp_path / "step.pid").read_text())
            os.kill(_run_worker(step), signal.SIGKILL)
            killed = time.monotonic()
            wait_for("the run to be marked failed",
                     lambda: instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE, 60, log)
            wait_for("the trainer to die", lambda: not _alive(trainer), 30, log)
            print(f"{executor}: trainer gone {time.monotonic() - killed:.1f} s after the kill", file=sys.stderr)
            time.sleep(3)  # what a surviving step would do next: nothing
            assert not (tmp_path / "output").exists() and not (tmp_path / "current").exists()
            assert not _alive(step) or executor == "dg.multiprocess_executor"
            materialized = [e for e in instance.all_logs(run_id) if e.dagster_event
                            and e.dagster_event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION]
            assert materialized == []
        finally:
            kill_group(daemon)


RETRY_CODE = '''
import os
import time
from pathlib import Path

import dagster as dg

WORK = Path({work!r})


def _count(name):
    path = WORK / name
    path.write_text(str(int(path.read_text()) + 1 if path.exists() else 1))
    return int(path.read_text())


@dg.asset
def photos():
    _count("photos")


@dg.asset(deps=[photos])
def latents():
    if _count("latents") == 1:  # the first time, the run worker is killed here (what an OOM kill does)
        (WORK / "worker.pid").write_text(str(os.getpid()))
        time.sleep(600)


@dg.asset(deps=[latents])
def model():
    _count("model")


@dg.asset
def failing():
    raise RuntimeError("a step that fails is not a crash: no retry for this")


defs = dg.Definitions(assets=[photos, latents, model, failing], jobs=[
    dg.define_asset_job("build", [photos, latents, model], executor_def=dg.in_process_executor),
    dg.define_asset_job("fails", [failing], executor_def=dg.in_process_executor),
])
'''


def test_a_run_whose_worker_died_is_retried_once_from_its_failure(tmp_path):
    """The default executor runs steps in the run worker: one that dies (here: SIGKILL while a step runs) fails
    the run; the shipped instance retries it once, from its failure (the steps done are not run again). A run
    whose step failed (an exception) is not retried."""
    import dagster as dg

    config = _shipped_config()
    assert config["run_retries"] == {"enabled": True, "max_retries": 1, "retry_on_asset_or_op_failure": False}
    workspace, env = daemon_home(tmp_path, config, RETRY_CODE.format(work=str(tmp_path)))
    log = tmp_path / "daemon.log"
    build, fails = "dddddddd-0000-4000-8000-000000000004", "eeeeeeee-0000-4000-8000-000000000005"
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        daemon = start_daemon(workspace, env, log)
        try:
            # The daemon's retry consumer starts reading run failures at the event log's end on its first tick: a
            # run that failed before that tick is never retried (a race of a freshly started daemon, seen under a
            # loaded suite: the dead run failed, no retry within 300 s). Launch once it has read the log once.
            from dagster._daemon.auto_run_reexecution.event_log_consumer import _create_cursor_key

            key = _create_cursor_key(dg.DagsterEventType.RUN_FAILURE)
            wait_for("the daemon's run-retry consumer to start", lambda: instance.daemon_cursor_storage
                     .get_cursor_values({key}).get(key), 120, log)
            launched(launch(workspace, env, "build", build), launch(workspace, env, "fails", fails))
            wait_for("the build run to reach latents", lambda: (tmp_path / "worker.pid").is_file()
                     and (tmp_path / "worker.pid").read_text(), 120, log)
            os.kill(int((tmp_path / "worker.pid").read_text()), signal.SIGKILL)  # in process: the run worker

            def retry_of(run_id):
                return next((r for r in instance.get_runs() if r.tags.get("dagster/parent_run_id") == run_id), None)

            def retried():
                r = retry_of(build)
                return r is not None and r.status == dg.DagsterRunStatus.SUCCESS and r

            # Generous: under a loaded machine (the suite's other worker training) the daemon's code server, the
            # monitoring that fails the dead run and the retry's launch each take their time.
            try:
                retry = wait_for("the retry to succeed", retried, 300, log)
            except BaseException:
                print(f"build: {instance.get_run_by_id(build).status}; retry: "
                      f"{(r := retry_of(build)) and (r.run_id, r.status)}; "
                      f"runs: {[(r.run_id[:8], r.job_name, r.status.value) for r in instance.get_runs()]}",
                      file=sys.stderr)
                raise
            assert instance.get_run_by_id(build).status == dg.DagsterRunStatus.FAILURE
            assert retry.tags.get("dagster/retry_number") == "1"
            counts = {n: int((tmp_path / n).read_text()) for n in ("photos", "latents", "model")}
            assert counts == {"photos": 1, "latents": 2, "model": 1}  # from its failure: photos not run again
            wait_for("the failing run to fail", lambda: instance.get_run_by_id(fails).status
                     == dg.DagsterRunStatus.FAILURE, 120, log)
            time.sleep(5)  # five daemon ticks: no retry of a run whose step failed
            assert retry_of(fails) is None
        finally:
            kill_group(daemon)
