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

import copy
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from daemon_helpers import BIN, kill_group, start_daemon, wait_for

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

    config = copy.deepcopy(yaml.safe_load((REPO / "dagster_home" / "dagster.yaml").read_text()))
    config["run_monitoring"].update(poll_interval_seconds=1, free_slots_after_run_end_seconds=2)
    config["run_queue"] = {"dequeue_interval_seconds": 1}
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (tmp_path / "trainer.py").write_text(TRAINER)
    (tmp_path / "defs.py").write_text(CODE.format(work=str(tmp_path), executor=executor))
    (tmp_path / "workspace.yaml").write_text(yaml.safe_dump(
        {"load_from": [{"python_file": {"relative_path": "defs.py", "location_name": "defs",
                                         "working_directory": str(tmp_path)}}]}))
    env = {**os.environ, "DAGSTER_HOME": str(home),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "daemon.log"
    run_id = "cccccccc-0000-4000-8000-000000000003"
    with dg.DagsterInstance.from_config(str(home)) as instance:
        daemon = start_daemon(tmp_path / "workspace.yaml", env, log)
        try:
            import subprocess

            res = subprocess.run([str(BIN / "dagster"), "job", "launch", "-w", "workspace.yaml", "-j", "train",
                                  "--run-id", run_id], cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=120)
            assert res.returncode == 0, res.stdout + res.stderr
            wait_for("the trainer to start", lambda: (tmp_path / "trainer.pid").is_file()
                     and (tmp_path / "trainer.pid").read_text(), 120, log)
            trainer = int((tmp_path / "trainer.pid").read_text())
            step = int((tmp_path / "step.pid").read_text())
            os.kill(_run_worker(step), signal.SIGKILL)
            killed = time.monotonic()
            wait_for("the run to be marked failed",
                     lambda: instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE, 30, log)
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
