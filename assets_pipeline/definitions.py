"""The code location: merges assets, checks, jobs, sensors, schedules and resources. Imports nothing heavy."""

import os

import dagster as dg

from assets_pipeline.assets.dataset import (
    captioned_images, clip_scored_images, concept_folders, control_images, filtered_images, raw_images,
)
from assets_pipeline.assets.batch import build_concepts_job
from assets_pipeline.assets.checks import MODEL_CHECKS
from assets_pipeline.assets.latents import vae_latents
from assets_pipeline.assets.models import MODEL_ASSETS
from assets_pipeline.assets.packs import train_packs_job
from assets_pipeline.assets.priors import class_images
from assets_pipeline.assets.dataset_checks import DATASET_CHECKS
from assets_pipeline.automation import dataset_automation_sensor
from assets_pipeline.jobs import build_concept_job, ingest_concept_job, train_concept_job, train_models_job
from assets_pipeline.pools import pool_slot_sensor
from assets_pipeline.schedules import retrain_schedule
from assets_pipeline.resources import (
    AcceleratorResource, BaseModelResource, CaptionerResource, ClipScorerResource, PipelineStorage, TrainerLauncher,
)
from assets_pipeline.sensors import concept_folder_sensor

ASSETS = [concept_folders, raw_images, captioned_images, filtered_images, clip_scored_images, control_images,
          class_images, vae_latents, *MODEL_ASSETS]
CHECKS = [*DATASET_CHECKS, *MODEL_CHECKS]


# How runs launched from the UI, the CLI, sensors and schedules execute their steps ($ASSETS_PIPELINE_EXECUTOR):
# - "in_process" (default): every step in the run worker, one after another: each library imported once, at first
#   use, and no process per step (issue 28, point 16: within 1.5x of diffusers' own script on the overhead
#   benchmark, a no-op rebuild under 10 s). The work that can crash a process is already outside it: each trainer
#   is a process of its own (a trainer that crashes fails its step; the run's other steps go on), and a step's GPU
#   memory is returned to the driver when it ends (assets/common.release_gpu_memory). A run worker that does die
#   (OOM-killed, say) fails its run, and the instance retries such a run once from its failure
#   (dagster_home/dagster.yaml: run_retries), the steps already done kept.
# - "forkserver": one process per step (a crash, or the memory a step held, ends with its process), each forked
#   from a server that imported the heavy libraries once per run (assets_pipeline/preload.py), not a fresh
#   interpreter importing them again per step (Dagster's default, "spawn"); ~1 s per step and the preload's ~12 s
#   per run more. `dagster._utils.test` is what a step process imports to rebuild the job from its code pointer
#   (Dagster's storage layer, SQLAlchemy: ~1 s per step otherwise); a private path, so it is its own entry:
#   multiprocessing skips a preload module that fails to import, and a Dagster that moved it only loses that second.
# `dagster.materialize` and `execute_in_process` (the demo, tests) always run in-process.
EXECUTOR_ENV = "ASSETS_PIPELINE_EXECUTOR"
EXECUTORS = {
    "forkserver": dg.multiprocess_executor.configured(
        {"start_method": {"forkserver": {"preload_modules": ["assets_pipeline.preload", "dagster._utils.test"]}}},
        name="forkserver_executor"),
    "in_process": dg.in_process_executor,
}
DEFAULT_EXECUTOR = "in_process"


def step_executor() -> dg.ExecutorDefinition:
    name = os.environ.get(EXECUTOR_ENV, DEFAULT_EXECUTOR)
    if name not in EXECUTORS:
        raise ValueError(f"${EXECUTOR_ENV} = {name!r}; expected one of {sorted(EXECUTORS)}")
    return EXECUTORS[name]


def default_resources() -> dict:
    return {
        "storage": PipelineStorage(),
        "base_model": BaseModelResource(),
        "accelerator": AcceleratorResource(),
        "captioner": CaptionerResource(),
        "clip_scorer": ClipScorerResource(),
        "trainer": TrainerLauncher(),
    }


defs = dg.Definitions(
    assets=ASSETS,
    asset_checks=CHECKS,
    jobs=[ingest_concept_job, build_concept_job, build_concepts_job, train_concept_job, train_models_job,
          train_packs_job],
    sensors=[concept_folder_sensor, dataset_automation_sensor, pool_slot_sensor],
    schedules=[retrain_schedule],
    resources=default_resources(),
    executor=step_executor(),
)
