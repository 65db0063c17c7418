"""What every asset body shares: the concept spec snapshot, output folders, and the metadata it reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from assets_pipeline.concept import ConceptSpec
from assets_pipeline.display import shown
from assets_pipeline.resources import PipelineStorage
from assets_pipeline.tables import read_asset_table, write_asset_table


# Each dataset asset's and check's own function (what its decorator wraps), by name: a batch build
# (assets/batch.py) runs the same bodies for many concepts in one op, each with a context of its own (:class:`Step`).
BODIES: dict[str, Any] = {}


def dataset_asset(**kwargs):
    """``dg.asset(**kwargs)``, the function also kept in :data:`BODIES` for batch builds. Its body may use of
    its context only what :class:`Step` has."""
    def wrap(fn):
        BODIES[fn.__name__] = fn
        return dg.asset(**kwargs)(fn)
    return wrap


def dataset_check(**kwargs):
    """``dg.asset_check(**kwargs)``, the function also kept in :data:`BODIES` (see :func:`dataset_asset`)."""
    def wrap(fn):
        BODIES[fn.__name__] = fn
        return dg.asset_check(**kwargs)(fn)
    return wrap


class Step:
    """What a dataset asset's or check's body reads of its context, for one concept of a batch build: its
    partition key, the run's log, the instance, the asset's key."""

    def __init__(self, partition_key: str, log, instance: dg.DagsterInstance, asset_key: dg.AssetKey):
        self.partition_key, self.log, self.instance, self.asset_key = partition_key, log, instance, asset_key


def provenance_tags(instance: dg.DagsterInstance, code_version: str, deps: list[dg.AssetKey], partition: str,
                    data_version: str) -> dict:
    """The tags Dagster's own asset step writes on a materialization (its data version, code version, and each
    dependency's data version and event), for one an op reports itself (a pack run, a batch build): with them the
    staleness of that partition is computed as for one its asset materialized. Each dependency's are its
    partition's (this concept's) latest."""
    from dagster._core.definitions.data_version import (
        CODE_VERSION_TAG, DATA_VERSION_IS_USER_PROVIDED_TAG, DATA_VERSION_TAG, DEFAULT_DATA_VERSION,
        NULL_EVENT_POINTER, get_input_data_version_tag, get_input_event_pointer_tag,
    )

    tags = {DATA_VERSION_TAG: data_version, CODE_VERSION_TAG: code_version, DATA_VERSION_IS_USER_PROVIDED_TAG: "true"}
    for key in deps:
        record = instance.get_latest_data_version_record(key, partition_key=partition)
        event = (record.asset_materialization or record.asset_observation) if record is not None else None
        version = (event.tags or {}).get(DATA_VERSION_TAG) if event is not None else None
        tags[get_input_data_version_tag(key)] = version or DEFAULT_DATA_VERSION.value
        tags[get_input_event_pointer_tag(key)] = NULL_EVENT_POINTER if record is None else str(record.storage_id)
    return tags


def announce_planned(context: dg.OpExecutionContext, asset_keys: list[dg.AssetKey], partitions: list[str]) -> None:
    """The ASSET_MATERIALIZATION_PLANNED event of each asset's partition, as an asset run logs at its start: the
    UI shows the partition in progress (automation leaves it alone meanwhile), and failed if this run fails
    without materializing it."""
    from dagster._core.events import AssetMaterializationPlannedData, DagsterEvent

    for key in asset_keys:
        for partition in partitions:
            event = DagsterEvent.build_asset_materialization_planned_event(
                context.job_name, str(context.op_handle), AssetMaterializationPlannedData(key, partition=partition))
            context.instance.report_dagster_event(event, run_id=context.run_id)


def spec_from_snapshot(storage: PipelineStorage, concept: str) -> ConceptSpec:
    """The concept spec as ``raw_images`` captured it, so every asset of one build agrees on it."""
    return storage.layout().spec(concept)


def latest_data_version(context: dg.AssetExecutionContext, key: dg.AssetKey, partition: str) -> str | None:
    """The data version the asset's partition was last materialized with (None: never)."""
    rec = context.instance.get_latest_data_version_record(key, partition_key=partition)
    mat = rec.asset_materialization if rec else None
    return mat.tags.get("dagster/data_version") if mat and mat.tags else None


def expect_training_if_changed(context: dg.AssetExecutionContext, storage: PipelineStorage, data_version: str) -> None:
    """A first dataset step whose output changed (new photos, a changed concept.toml, a first build): a training
    probably follows, so where this process may start its trainer ahead, it does (resources/spare_trainer.py)."""
    from assets_pipeline.resources import spare_trainer

    if spare_trainer.allowed() and latest_data_version(context, context.asset_key, context.partition_key) != data_version:
        spare_trainer.expect_training(storage.layout().cache_root(), context.log.info)


def read_upstream(storage: PipelineStorage, concept: str, asset: str, table: str) -> pd.DataFrame:
    return read_asset_table(storage.layout(), concept, asset, table)


def save_table(storage: PipelineStorage, df: pd.DataFrame, path: Path) -> None:
    """Write an asset's table, its path columns relative to the artifact root (:func:`read_upstream` undoes it)."""
    write_asset_table(storage.layout(), df, path)


def restore_images(context: dg.AssetExecutionContext, storage: PipelineStorage, concept: str,
                   df: pd.DataFrame) -> dict[str, int]:
    """Check the decoded photos ``df`` names before they are read or linked; re-decode any missing or corrupt
    one from its photo (stages.ingest.restore_decoded). Returns metadata: how many were restored."""
    from assets_pipeline.stages.ingest import restore_decoded

    cache = storage.layout().cache("images", ".png")
    restored = restore_decoded(df, storage.concept_dir(concept), cache)
    for path in restored:
        context.log.warning(f"decoded image {path} was missing or corrupt: discarded and re-decoded from its photo")
    for path in cache.repaired:
        context.log.warning(f"{path} shared the damaged decoded image: replaced by the re-decoded one")
    return {"images_restored": len(restored), "links_repaired": len(cache.repaired)}


def clean_stale_temporaries(context: dg.AssetExecutionContext, storage: PipelineStorage, concept: str,
                            asset: str, caches: tuple[str, ...] = ()) -> list[Path]:
    """What earlier materializations of this asset left half-written when they crashed (cleanup.py): its
    folder's temporaries beside it in the concept folder and inside it (a model asset's ``.<version>.tmp/``,
    ``.job-*.json``), and those of the item cache kinds it writes. Each removal is logged."""
    from assets_pipeline import cleanup

    layout = storage.layout()
    out = layout.asset_dir(concept, asset)
    removed = cleanup.remove_stale_temporaries(out.parent, owner=asset) + cleanup.remove_stale_temporaries(out)
    for kind in caches:
        removed += cleanup.remove_stale_cache_temporaries(layout.cache(kind, "").folder)
    for path in removed:
        context.log.info(f"removed stale temporary {path}: a write that never finished (crashed or killed run)")
    return removed


def table_preview(df: pd.DataFrame, columns: list[str], rows: int = 10) -> dg.MetadataValue:
    """The first ``rows`` of ``df`` as Markdown, floats to 4 significant digits (the table keeps them whole)."""
    return dg.MetadataValue.md(df[columns].head(rows).map(shown).to_markdown(index=False) if len(df) else "_empty_")


def image_preview(layout, paths) -> dg.MetadataValue:
    """A contact sheet of the first images, from thumbnails cached by content (no full-size reopen on rebuild)."""
    from assets_pipeline.imaging import grid_markdown

    return dg.MetadataValue.md(grid_markdown(list(paths[:24]), thumb_cache=layout.cache("thumbnails", ".png")))


def result(
    path: Path, data_version: str, row_count: int, extra: dict[str, Any] | None = None
) -> dg.MaterializeResult:
    return dg.MaterializeResult(
        data_version=dg.DataVersion(data_version),
        metadata={"path": dg.MetadataValue.path(str(path)), "dagster/row_count": row_count, **(extra or {})},
    )
