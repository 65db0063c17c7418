"""Blocking checks on the quality subset: training waits for them (a failed ERROR check stops downstream)."""

import dagster as dg

from assets_pipeline.assets.common import dataset_check, read_upstream
from assets_pipeline.assets.dataset import clip_scored_images, control_images
from assets_pipeline.partitions.definitions import concepts_partitions
from assets_pipeline.resources import PipelineStorage


@dataset_check(asset=clip_scored_images, blocking=True, partitions_def=concepts_partitions)
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


@dataset_check(asset=clip_scored_images, blocking=True, partitions_def=concepts_partitions)
def subset_captioned(context: dg.AssetCheckExecutionContext, storage: PipelineStorage) -> dg.AssetCheckResult:
    """Every photo of the quality subset has a non-empty caption."""
    from assets_pipeline.stages.readiness import readiness

    r = readiness(read_upstream(storage, context.partition_key, "clip_scored_images", "scores.parquet"))
    return dg.AssetCheckResult(passed=not r.uncaptioned, metadata={"uncaptioned": len(r.uncaptioned),
                                                                   "examples": ", ".join(r.uncaptioned[:5])})


@dataset_check(asset=control_images, blocking=True, partitions_def=concepts_partitions)
def control_pairs_valid(context: dg.AssetCheckExecutionContext, storage: PipelineStorage) -> dg.AssetCheckResult:
    """With the concept's own conditioning images (`control/<photo name>.<ext>`): every photo of the quality subset
    has a valid one. A photo without one (missing, or its pair rejected at ingest: no photo, two for one photo,
    unreadable, the photo itself, another aspect ratio) is named with why; ERROR (blocks ControlNet) unless
    `[control] require_all_pairs = false`, which trains on the photos that have one (WARN). Annotator images:
    passes (one per photo)."""
    from assets_pipeline.assets.common import spec_from_snapshot
    from assets_pipeline.stages.conditioning import ControlConfig

    concept = context.partition_key
    missing = read_upstream(storage, concept, "control_images", "missing.parquet")
    control = read_upstream(storage, concept, "control_images", "control.parquet")
    spec = spec_from_snapshot(storage, concept)
    if "controlnet" not in spec.methods:  # its pairs are kept, and checked when it requests ControlNet
        return dg.AssetCheckResult(passed=True, description="ControlNet is not requested by this concept",
                                   metadata={"pairs": len(control), "photos_without_pair": len(missing)})
    required = spec.config("control", ControlConfig()).require_all_pairs
    lines = [f"{r.source_path}: {r.reason}" for r in missing.itertuples()]
    description = (None if not lines else f"{len(lines)} photo(s) of the quality subset have no valid conditioning "
                   "image" + (": ControlNet is blocked" if required else "; ControlNet trains on the "
                              f"{len(control)} that have one ([control] require_all_pairs = false)"))
    return dg.AssetCheckResult(
        passed=not lines, severity=dg.AssetCheckSeverity.ERROR if required else dg.AssetCheckSeverity.WARN,
        description=description,
        metadata={"pairs": len(control), "photos_without_pair": len(lines),
                  "without_pair": dg.MetadataValue.md("\n".join(f"- {line}" for line in lines[:50]) or "_none_")})


DATASET_CHECKS = [enough_training_images, subset_captioned, control_pairs_valid]
