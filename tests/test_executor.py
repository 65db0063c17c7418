"""The project's step executors: in the run worker by default (a trainer that crashes fails its own step only),
or (ASSETS_PIPELINE_EXECUTOR=forkserver) each step in its own process, forked from a server that imported the
heavy libraries once (assets_pipeline/preload.py)."""

from __future__ import annotations

import pytest

import os
import sys

import dagster as dg

from assets_pipeline.definitions import EXECUTORS, defs
from assets_pipeline.resources import TrainerLauncher


@dg.op
def where_am_i() -> dict:
    # Read before anything here imports them: only the fork server's preload can have.
    return {"pid": os.getpid(), "preloaded": sorted(m for m in ("torch", "diffusers", "open_clip", "pandas")
                                                     if m in sys.modules)}


@dg.op
def where_am_i_too(first: dict) -> list[dict]:
    return [first, {"pid": os.getpid(), "ppid": os.getppid()}]


@dg.job(executor_def=EXECUTORS["forkserver"])
def two_steps():
    where_am_i_too(where_am_i())


@pytest.mark.slow
def test_steps_are_forked_from_a_preloaded_server(tmp_path):
    from dagster._core.definitions.reconstruct import ReconstructableJob

    # The step processes rebuild the job from this file (a test module is not importable by name there).
    job = ReconstructableJob.for_file(__file__, "two_steps")
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        with dg.execute_job(job, instance=instance) as result:
            assert result.success
            first, second = result.output_for_node("where_am_i_too")
    assert first["preloaded"] == ["diffusers", "open_clip", "pandas", "torch"]
    assert first["pid"] != second["pid"] != os.getpid()  # a process per step, neither the test's


def test_jobs_run_in_process_by_default_and_the_environment_picks_the_forkserver(monkeypatch):
    from assets_pipeline.definitions import EXECUTOR_ENV, step_executor

    for job in ("train_concept", "build_concept", "ingest_concept"):
        assert defs.resolve_job_def(job).executor_def is dg.in_process_executor
    assert defs.resolve_implicit_global_asset_job_def().executor_def is dg.in_process_executor
    monkeypatch.setenv(EXECUTOR_ENV, "forkserver")
    assert step_executor().name == "forkserver_executor"
    monkeypatch.setenv(EXECUTOR_ENV, "threads")
    with pytest.raises(ValueError, match="ASSETS_PIPELINE_EXECUTOR = 'threads'; expected one of"):
        step_executor()


CRASHING_TRAINER = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"


def test_a_trainer_that_crashes_fails_its_step_and_the_other_steps_of_the_run_go_on(tmp_path):
    """Issue 28, point 16: in process by default, so a crash must stay where the crash-prone work is: the trainer,
    a process of its own launched through the project's TrainerLauncher (Pipes). It dies of SIGSEGV; its step
    fails; the run worker (this process) lives, and the run's other steps, before and after, succeed."""
    class Crashing(TrainerLauncher):
        def command(self, job_path):
            return [sys.executable, "-c", CRASHING_TRAINER]

    @dg.asset
    def photos() -> int:
        return 1

    @dg.asset(deps=[photos])
    def model(context, trainer: TrainerLauncher):
        yield from trainer.launch(context, tmp_path / "job.json").get_results()

    @dg.asset(deps=[photos])
    def other_concepts_latents() -> int:
        return 2

    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        res = dg.materialize([photos, model, other_concepts_latents], instance=instance, raise_on_error=False,
                             resources={"trainer": Crashing(device="cpu")})
    failed = [e for e in res.all_events if e.event_type_value == "STEP_FAILURE"]
    assert [e.step_key for e in failed] == ["model"]
    assert "process failed with code -11" in str(failed[0].event_specific_data.error)  # SIGSEGV
    done = {e.materialization.asset_key.to_user_string() for e in res.get_asset_materialization_events()}
    assert done == {"photos", "other_concepts_latents"}
