"""Blocking checks on the quality subset: training waits for them (a failed ERROR check stops downstream)."""

import dagster as dg

from assets_pipeline.assets.common import read_upstream
from assets_pipeline.assets.dataset import clip_scored_images
from assets_pipeline.partitions.definitions import concepts_partitions
from assets_pipeline.resources import PipelineStorage


@dg.asset_check(asset=clip_scored_images, blocking=True, partitions_def=concepts_partitions)
def enough_training_images(context: dg.AssetCheckExecutionContext, storage: PipelineStorage) -> dg.AssetCheckResult:
    """At least 3 photos in the quality subset (ERROR, blocks training); fewer than 5 is a WARN."""
    from assets_pipeline.stages.readiness import MIN_IMAGES, RECOMMENDED_IMAGES, readiness

    r = readiness(read_upstream(storage, context.partition_key, "clip_scored_images", "scores.parquet"))
    if not r.enough:
        severity, description = dg.AssetCheckSeverity.ERROR, (
            f"{r.subset_size} photos in the quality subset; at least {MIN_IMAGES} are needed: training is blocked")
    else:
        severity, description = dg.AssetCheckSeverity.WARN, (
            None if r.recommended else
            f"{r.subset_size} photos: trainable, but {RECOMMENDED_IMAGES}-10 diverse, sharp photos are recommended")
    return dg.AssetCheckResult(passed=r.recommended, severity=severity, description=description,
                               metadata={"subset_size": r.subset_size})


@dg.asset_check(asset=clip_scored_images, blocking=True, partitions_def=concepts_partitions)
def subset_captioned(context: dg.AssetCheckExecutionContext, storage: PipelineStorage) -> dg.AssetCheckResult:
    """Every photo of the quality subset has a non-empty caption."""
    from assets_pipeline.stages.readiness import readiness

    r = readiness(read_upstream(storage, context.partition_key, "clip_scored_images", "scores.parquet"))
    return dg.AssetCheckResult(passed=not r.uncaptioned, metadata={"uncaptioned": len(r.uncaptioned),
                                                                   "examples": ", ".join(r.uncaptioned[:5])})


DATASET_CHECKS = [enough_training_images, subset_captioned]
