"""Issue 28, point 8: a `dagster asset materialize` killed with kill -9 while its step holds the `gpu` slot leaves
its run STARTED, holding the slot (nothing marks an in-process run failed), and every later GPU step waits with
only Dagster's DEBUG "Step blocked by limit for pool gpu". With real processes on a temporary instance whose
dagster.yaml is the shipped one: the pool sensor says at INFO, in the waiting run's own log, which run holds the
slot, since when and how to free it; `assets-pipeline slots` lists the same; `assets-pipeline slots free` refuses
a STARTED run without --force, and with it marks the run failed and frees the slot, and the waiting step runs."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import dagster as dg
import pytest

from daemon_helpers import BIN, kill_group, start, wait_for

REPO = Path(__file__).resolve().parents[1]
HOLD, WAIT = "aaaaaaaa-0000-4000-8000-000000000001", "bbbbbbbb-0000-4000-8000-000000000002"

CODE = '''
import os
import time
from pathlib import Path

import dagster as dg


@dg.asset(pool="gpu")
def hold_gpu() -> None:
    Path({pid_file!r}).write_text(str(os.getpid()))
    time.sleep(600)


@dg.asset(pool="gpu")
def quick_gpu() -> int:
    return 1


defs = dg.Definitions(assets=[hold_gpu, quick_gpu], executor=dg.in_process_executor)
'''


def _materialize(tmp_path: Path, env: dict, asset: str) -> subprocess.Popen:
    return start([str(BIN / "dagster"), "asset", "materialize", "-f", "gpu_defs.py", "--select", asset], tmp_path,
                 env, tmp_path / f"{asset}.log")


@pytest.fixture
def instance(tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster_home" / "dagster.yaml").read_text())  # gpu: one slot
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        # What a run's executor does before its first claim: the pool's slots at the configured default limit.
        assert instance.event_log_storage.initialize_concurrency_limit_to_default("gpu")
        yield instance


def _run(instance, run_id: str, status: dg.DagsterRunStatus, job: str = "train_concept") -> None:
    instance.add_run(dg.DagsterRun(job_name=job, run_id=run_id, status=status, tags={"dagster/partition": "kitty"}))


def _told(instance, run_id: str) -> list:
    return [e for e in instance.all_logs(run_id)
            if e.is_dagster_event and "has waited" in (e.dagster_event.message or "")]


def test_the_sensor_tells_a_waiting_run_who_holds_the_slot_once_per_holder(instance, monkeypatch, capsys):
    """On a real (SQLite) instance with the shipped config, slots claimed as a run's steps claim them."""
    from assets_pipeline import pools
    from assets_pipeline.cli import main

    monkeypatch.setattr(pools, "REPORT_AFTER_S", 0)
    storage = instance.event_log_storage
    _run(instance, HOLD, dg.DagsterRunStatus.FAILURE)
    _run(instance, WAIT, dg.DagsterRunStatus.STARTED, job="__ASSET_JOB")
    assert storage.claim_concurrency_slot("gpu", HOLD, "vae_latents").is_claimed
    assert not storage.claim_concurrency_slot("gpu", WAIT, "lora_adapter").is_claimed

    state = pools.pool_state(instance, "gpu")
    [held] = state.holders
    assert (held.run_id, held.step_key, held.status, held.partition, held.ended) == (
        HOLD, "vae_latents", "FAILURE", "kitty", True)
    assert [(w.run_id, w.step_key) for w in state.waiting] == [(WAIT, "lora_adapter")]
    result = pools.pool_slot_sensor(dg.build_sensor_context(instance=instance))
    [event] = _told(instance, WAIT)
    text = event.dagster_event.message
    assert event.level == logging.INFO and event.step_key == "lora_adapter"
    assert f"Held by run {HOLD} (job train_concept, partition kitty, status FAILURE), step 'vae_latents', since " \
           f"{held.since:%Y-%m-%d %H:%M:%S} UTC" in text
    # The shipped monitoring frees it 60 s after the run ended, checked every 30 s.
    assert "run monitoring frees it about 90 s after the run ended" in text
    assert f"free it now with `assets-pipeline slots free {HOLD}`" in text and "--force" not in text
    assert event.dagster_event.engine_event_data.metadata["held_by_run_0"].value == HOLD
    pools.pool_slot_sensor(dg.build_sensor_context(instance=instance, cursor=result.cursor))
    assert len(_told(instance, WAIT)) == 1  # told once for these holders

    assert main(["slots", "free", HOLD[:8]]) == 0  # an ended run needs no --force
    assert f"freed  pool gpu: the slot of run {HOLD}, step 'vae_latents'" in capsys.readouterr().out
    # The slot went to the waiting step: its next claim (the executor retries every few seconds) gets it.
    assert storage.claim_concurrency_slot("gpu", WAIT, "lora_adapter").is_claimed
    state = pools.pool_state(instance, "gpu")
    assert [(h.run_id, h.step_key) for h in state.holders] == [(WAIT, "lora_adapter")] and not state.waiting
    assert instance.get_run_by_id(HOLD).status == dg.DagsterRunStatus.FAILURE  # left as it was


def test_slots_free_refuses_what_it_cannot_free(instance, capsys):
    from assets_pipeline.cli import main

    _run(instance, HOLD, dg.DagsterRunStatus.STARTED)
    instance.event_log_storage.claim_concurrency_slot("gpu", HOLD, "vae_latents")
    assert main(["slots", "free", "cccccccc"]) == 2
    assert "no run cccccccc is known to this instance and holds no pool slot" in capsys.readouterr().err
    assert main(["slots", "free", HOLD]) == 2
    err = capsys.readouterr().err
    assert f"run {HOLD} is STARTED: if its process is gone" in err and "rerun with --force" in err
    assert instance.event_log_storage.get_concurrency_info("gpu").active_run_ids == {HOLD}


@pytest.mark.slow
def test_a_killed_materialize_holding_the_gpu_slot_is_named_to_the_waiting_run_and_freed(tmp_path, monkeypatch,
                                                                                         capsys):
    from assets_pipeline import pools
    from assets_pipeline.cli import main
    from assets_pipeline.pools import pool_slot_sensor

    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster_home" / "dagster.yaml").read_text())  # gpu: one slot
    pid_file = tmp_path / "hold.pid"
    (tmp_path / "gpu_defs.py").write_text(CODE.format(pid_file=str(pid_file)))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    logs = [tmp_path / "hold_gpu.log", tmp_path / "quick_gpu.log"]
    monkeypatch.setattr(pools, "REPORT_AFTER_S", 0)  # report a waiting step at once (the daemon: after 10 s)

    with dg.DagsterInstance.from_config(str(home)) as instance:
        def state():
            return pools.pool_state(instance, "gpu")

        holder = _materialize(tmp_path, env, "hold_gpu")
        waiter = None
        try:
            wait_for("hold_gpu to take the gpu slot", lambda: pid_file.exists() and state().holders, 90, logs)
            os.killpg(holder.pid, signal.SIGKILL)  # the whole `dagster asset materialize`, at once
            holder.wait(timeout=30)
            [held] = state().holders
            hold_run = instance.get_run_by_id(held.run_id)
            assert hold_run.status == dg.DagsterRunStatus.STARTED and held.step_key == "hold_gpu"
            assert held.since is not None  # when the slot was assigned

            waiter = _materialize(tmp_path, env, "quick_gpu")
            [waiting] = wait_for("quick_gpu to wait for the slot", lambda: state().waiting, 90, logs)
            assert waiting.step_key == "quick_gpu"

            # The sensor, as the daemon evaluates it: an INFO line in the waiting run's log.
            result = pool_slot_sensor(dg.build_sensor_context(instance=instance))
            told = _told(instance, waiting.run_id)
            assert len(told) == 1 and told[0].level == logging.INFO and told[0].step_key == "quick_gpu"
            text = told[0].dagster_event.message
            assert f"Held by run {held.run_id} (job __ASSET_JOB, status STARTED), step 'hold_gpu', since " \
                   f"{held.since:%Y-%m-%d %H:%M:%S} UTC" in text
            assert f"`assets-pipeline slots free {held.run_id} --force`" in text and "kill -9" in text
            assert "pool 'gpu' (limit 1, 1 taken)" in text
            # Once per set of holders: the next tick (with its cursor) says nothing new.
            again = pool_slot_sensor(dg.build_sensor_context(instance=instance, cursor=result.cursor))
            assert again.skip_reason and len(_told(instance, waiting.run_id)) == 1

            assert main(["slots"]) == 0
            listed = capsys.readouterr().out
            assert "pool gpu: limit 1, 1 slot(s) taken, 1 step(s) waiting" in listed
            assert f"held by run {held.run_id} (job __ASSET_JOB, status STARTED), step 'hold_gpu', since" in listed
            assert f"assets-pipeline slots free {held.run_id} --force" in listed
            assert f"waiting: run {waiting.run_id}, step 'quick_gpu'" in listed

            # A STARTED run is not freed on a guess; with --force it is marked failed and its slot freed.
            assert main(["slots", "free", held.run_id[:8]]) == 2
            refused = capsys.readouterr().err
            assert f"run {held.run_id} is STARTED" in refused and "--force" in refused
            assert state().holders and instance.get_run_by_id(held.run_id).status == dg.DagsterRunStatus.STARTED
            assert main(["slots", "free", held.run_id[:8], "--force"]) == 0
            assert f"freed  pool gpu: the slot of run {held.run_id}, step 'hold_gpu'" in capsys.readouterr().out
            assert instance.get_run_by_id(held.run_id).status == dg.DagsterRunStatus.FAILURE

            assert waiter.wait(timeout=120) == 0, logs[1].read_text()[-6000:]
            assert instance.get_run_by_id(waiting.run_id).status == dg.DagsterRunStatus.SUCCESS
            assert not state().holders and not state().waiting
            assert main(["slots", "free", held.run_id]) == 2  # nothing left to free
            assert "holds no pool slot" in capsys.readouterr().err
        finally:
            kill_group(*(p for p in (holder, waiter) if p is not None))
