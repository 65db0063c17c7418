"""What every asset body shares: the concept spec snapshot, output folders, and the metadata it reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from assets_pipeline.partitions.concept_spec import ConceptSpec, apply_overrides
from assets_pipeline.resources import PipelineStorage
from assets_pipeline.tables import read_table, write_table

SPEC_SNAPSHOT = "concept.json"


def spec_from_snapshot(storage: PipelineStorage, concept: str) -> ConceptSpec:
    """The concept spec as ``raw_images`` captured it, so every asset of one build agrees on it."""
    raw = json.loads((storage.layout().asset_dir(concept, "raw_images") / SPEC_SNAPSHOT).read_text())
    return ConceptSpec(name=raw["name"], token=raw["token"], class_noun=raw["class_noun"],
                       methods=tuple(raw["methods"]), overrides=raw["overrides"])


def concept_config(spec: ConceptSpec, section: str, default: Any) -> Any:
    """``default`` (a config dataclass) with the concept's ``[section]`` overrides applied."""
    return apply_overrides(default, spec.section(section), f"{spec.name}/concept.toml [{section}]")


# Table columns holding files inside the artifact root: stored relative to it (so the root can move), absolute
# in memory.
PATH_COLUMNS = ("decoded_path", "control_path")


def read_upstream(storage: PipelineStorage, concept: str, asset: str, table: str) -> pd.DataFrame:
    layout = storage.layout()
    path = layout.asset_dir(concept, asset) / table
    if not path.is_file():
        raise FileNotFoundError(f"{asset} has no output for concept {concept!r} yet ({path}); materialize it first")
    df = read_table(path)
    for col in PATH_COLUMNS:
        if col in df:
            df[col] = [None if v is None else str(layout.absolute(v)) for v in df[col]]
    return df


def save_table(storage: PipelineStorage, df: pd.DataFrame, path: Path) -> None:
    """Write an asset's table, its path columns relative to the artifact root (:func:`read_upstream` undoes it)."""
    layout = storage.layout()
    df = df.copy()
    for col in PATH_COLUMNS:
        if col in df:
            df[col] = [None if v is None else layout.relative(v) for v in df[col]]
    write_table(df, path)


def restore_images(context: dg.AssetExecutionContext, storage: PipelineStorage, concept: str,
                   df: pd.DataFrame) -> dict[str, int]:
    """Check the decoded photos ``df`` names before they are read or linked; re-decode any missing or corrupt
    one from its photo (stages.ingest.restore_decoded). Returns metadata: how many were restored."""
    from assets_pipeline.stages.ingest import restore_decoded

    restored = restore_decoded(df, storage.concept_dir(concept), storage.layout().cache("images", ".png"))
    for path in restored:
        context.log.warning(f"decoded image {path} was missing or corrupt: discarded and re-decoded from its photo")
    return {"images_restored": len(restored)}


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
    return dg.MetadataValue.md(df[columns].head(rows).to_markdown(index=False) if len(df) else "_empty_")


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
