"""The project's step executor: each step in its own process, forked from a server that imported the heavy
libraries once (assets_pipeline/preload.py), and the ingest job in the run worker itself."""

from __future__ import annotations

import pytest

import os
import sys

import dagster as dg

from assets_pipeline.definitions import EXECUTORS, defs


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


def test_jobs_use_the_forkserver_executor_and_ingest_runs_in_process():
    assert defs.resolve_job_def("train_concept").executor_def.name == "forkserver_executor"
    assert defs.resolve_job_def("build_concept").executor_def.name == "forkserver_executor"
    assert defs.resolve_job_def("ingest_concept").executor_def is dg.in_process_executor
    assert defs.resolve_implicit_global_asset_job_def().executor_def.name == "forkserver_executor"
