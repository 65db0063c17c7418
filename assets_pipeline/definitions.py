"""The code location: merges assets, checks, jobs, sensors, schedules and resources. Imports nothing heavy."""

import dagster as dg

from assets_pipeline.assets.dataset import (
    captioned_images, clip_scored_images, control_images, filtered_images, raw_images,
)
from assets_pipeline.assets.checks import MODEL_CHECKS
from assets_pipeline.assets.latents import vae_latents
from assets_pipeline.assets.models import MODEL_ASSETS
from assets_pipeline.assets.priors import class_images
from assets_pipeline.assets.dataset_checks import DATASET_CHECKS
from assets_pipeline.automation import dataset_automation_sensor
from assets_pipeline.jobs import build_concept_job, ingest_concept_job, train_concept_job, train_models_job
from assets_pipeline.schedules import retrain_schedule
from assets_pipeline.resources import (
    AcceleratorResource, BaseModelResource, CaptionerResource, ClipScorerResource, PipelineStorage, TrainerLauncher,
)
from assets_pipeline.sensors import concept_folder_sensor

ASSETS = [raw_images, captioned_images, filtered_images, clip_scored_images, control_images, class_images,
          vae_latents, *MODEL_ASSETS]
CHECKS = [*DATASET_CHECKS, *MODEL_CHECKS]


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
    jobs=[ingest_concept_job, build_concept_job, train_concept_job, train_models_job],
    sensors=[concept_folder_sensor, dataset_automation_sensor],
    schedules=[retrain_schedule],
    resources=default_resources(),
)
