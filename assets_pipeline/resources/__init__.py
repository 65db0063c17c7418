"""Dagster resources: the two roots, the base model, the accelerator, the captioner and the CLIP scorer."""

from assets_pipeline.resources.models import (
    TrainerLauncher,
    AcceleratorResource,
    BaseModelResource,
    CaptionerResource,
    ClipScorerResource,
)
from assets_pipeline.resources.storage import PipelineStorage

__all__ = [
    "AcceleratorResource", "BaseModelResource", "CaptionerResource", "ClipScorerResource", "PipelineStorage",
    "TrainerLauncher",
]
