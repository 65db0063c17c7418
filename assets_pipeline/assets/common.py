"""What every asset body shares: the concept spec snapshot, output folders, and the metadata it reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from assets_pipeline.partitions.concept_spec import ConceptSpec, apply_overrides
from assets_pipeline.resources import PipelineStorage
from assets_pipeline.tables import read_table

SPEC_SNAPSHOT = "concept.json"


def spec_from_snapshot(storage: PipelineStorage, concept: str) -> ConceptSpec:
    """The concept spec as ``raw_images`` captured it, so every asset of one build agrees on it."""
    raw = json.loads((storage.layout().asset_dir(concept, "raw_images") / SPEC_SNAPSHOT).read_text())
    return ConceptSpec(name=raw["name"], token=raw["token"], class_noun=raw["class_noun"],
                       methods=tuple(raw["methods"]), overrides=raw["overrides"])


def concept_config(spec: ConceptSpec, section: str, default: Any) -> Any:
    """``default`` (a config dataclass) with the concept's ``[section]`` overrides applied."""
    return apply_overrides(default, spec.section(section), f"{spec.name}/concept.toml [{section}]")


def read_upstream(storage: PipelineStorage, concept: str, asset: str, table: str) -> pd.DataFrame:
    path = storage.layout().asset_dir(concept, asset) / table
    if not path.is_file():
        raise FileNotFoundError(f"{asset} has no output for concept {concept!r} yet ({path}); materialize it first")
    return read_table(path)


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
