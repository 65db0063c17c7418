"""Run monitoring in the shipped instance config: a killed run worker's run fails and frees its `gpu` slot.

End to end with real processes: a `dagster-daemon run` against a temporary DAGSTER_HOME whose dagster.yaml
is the shipped one (only timing values shortened), a code location with two `pool="gpu"` assets, runs
submitted with `dagster job launch` through the instance's queued run coordinator. The first run's worker
is killed with SIGKILL while it holds the one `gpu` slot; the second run, queued behind that slot, must then
complete. The code server that launched the worker marks the run failed; without `run_monitoring` (and its
`free_slots_after_run_end_seconds`) nothing frees the slot, and the second run waits forever.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from daemon_helpers import BIN, daemon_home, kill_group, start_daemon, wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SHIPPED_YAML = REPO / "dagster_home" / "dagster.yaml"

CODE = '''
import os
import time
from pathlib import Path

import dagster as dg

PID_FILE = Path({pid_file!r})


@dg.asset(pool="gpu")
def hold_gpu() -> None:
    PID_FILE.write_text(str(os.getpid()))  # in-process executor: this process is the run worker
    time.sleep(600)


@dg.asset(pool="gpu")
def quick_gpu() -> int:
    return 1


defs = dg.Definitions(
    assets=[hold_gpu, quick_gpu],
    jobs=[
        dg.define_asset_job("hold_job", [hold_gpu], executor_def=dg.in_process_executor),
        dg.define_asset_job("quick_job", [quick_gpu], executor_def=dg.in_process_executor),
    ],
)
'''


def _test_instance_config() -> dict:
    """The shipped dagster.yaml, with only its timing values shortened so the test takes seconds."""
    shipped = yaml.safe_load(SHIPPED_YAML.read_text())
    monitoring = shipped.get("run_monitoring") or {}
    assert monitoring.get("enabled") is True, f"{SHIPPED_YAML}: run_monitoring is not enabled"
    assert monitoring.get("free_slots_after_run_end_seconds", 0) > 0, (
        f"{SHIPPED_YAML}: run_monitoring.free_slots_after_run_end_seconds is not set: a dead run keeps its slots")
    assert monitoring.get("max_resume_run_attempts", 0) == 0, "the default run launcher cannot resume runs"
    assert shipped["concurrency"]["pools"]["default_limit"] == 1

    config = copy.deepcopy(shipped)
    # Timing only (shipped: poll every 30 s, free slots 60 s after the run ended; the queue's default 5 s).
    config["run_monitoring"].update(poll_interval_seconds=1, free_slots_after_run_end_seconds=2)
    config["run_queue"] = {"dequeue_interval_seconds": 1}
    # The killed run would be retried (run_retries, tests/test_orphaned_trainer.py): this test is about its slot.
    config["run_retries"] = {"enabled": False}
    return config


def test_killed_run_worker_fails_the_run_and_frees_its_gpu_slot(tmp_path):
    import dagster as dg

    config = _test_instance_config()
    pid_file = tmp_path / "run_worker.pid"
    workspace, env = daemon_home(tmp_path, config, CODE.format(pid_file=str(pid_file)), location="gpu_defs")
    home = Path(env["DAGSTER_HOME"])
    daemon_log = tmp_path / "daemon.log"

    def launch(job: str, run_id: str) -> None:
        """Submit through the instance's run coordinator (queued); the daemon launches it."""
        res = subprocess.run([str(BIN / "dagster"), "job", "launch", "-w", "workspace.yaml", "-j", job,
                              "--run-id", run_id], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"dagster job launch {job} failed:\n{res.stdout}\n{res.stderr}"

    with dg.DagsterInstance.from_config(str(home)) as instance:  # creates the storage before the daemon starts
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 2

        def status(run_id):
            run = instance.get_run_by_id(run_id)
            return run.status if run else None

        def gpu_slot_holders():
            return instance.event_log_storage.get_concurrency_info("gpu").active_run_ids

        daemon = start_daemon(workspace, env, daemon_log)
        try:
            hold_id, quick_id = "aaaaaaaa-0000-4000-8000-000000000001", "bbbbbbbb-0000-4000-8000-000000000002"
            launch("hold_job", hold_id)
            wait_for("the hold run to start and take the gpu slot",
                      lambda: pid_file.exists() and hold_id in gpu_slot_holders(), 90, daemon_log)
            assert status(hold_id) == dg.DagsterRunStatus.STARTED
            worker_pid = int(pid_file.read_text())

            launch("quick_job", quick_id)
            time.sleep(3)  # three dequeue intervals: the quick run is launched or queued, and blocked on the slot
            assert status(quick_id) in (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING,
                                        dg.DagsterRunStatus.STARTED), status(quick_id)
            assert gpu_slot_holders() == {hold_id}

            os.kill(worker_pid, signal.SIGKILL)
            killed_at = time.monotonic()

            wait_for("the killed run to be marked FAILURE",
                      lambda: status(hold_id) == dg.DagsterRunStatus.FAILURE, 30, daemon_log)
            failed_after = time.monotonic() - killed_at
            wait_for("the killed run's gpu slot to be freed",
                      lambda: hold_id not in gpu_slot_holders(), 30, daemon_log)
            freed_after = time.monotonic() - killed_at
            wait_for("the waiting gpu run to succeed",
                      lambda: status(quick_id) == dg.DagsterRunStatus.SUCCESS, 60, daemon_log)
            print(f"run failed {failed_after:.1f} s and its slot was freed {freed_after:.1f} s after the kill; "
                  f"next gpu run succeeded {time.monotonic() - killed_at:.1f} s after the kill")

            assert gpu_slot_holders() == set()
            successes = [e for e in instance.all_logs(quick_id) if e.dagster_event
                         and e.dagster_event.event_type == dg.DagsterEventType.STEP_SUCCESS]
            assert [e.step_key for e in successes] == ["quick_gpu"]
        finally:
            kill_group(daemon)  # run workers are in the daemon's process group too
