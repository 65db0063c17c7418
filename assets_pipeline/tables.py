"""Parquet tables and HF-imagefolder datasets, written atomically; the data version of a table."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from assets_pipeline.hashing import digest
from assets_pipeline.store import ArtifactLayout, atomic_path, link_or_copy, write_bytes_atomic

# Table columns holding files inside the artifact root: stored relative to it (so the root can move), absolute
# in memory.
PATH_COLUMNS = ("decoded_path", "control_path", "control_decoded_path")


def write_table(df: pd.DataFrame, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)


def read_table(path: Path) -> pd.DataFrame:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pandas()


def read_asset_table(layout: ArtifactLayout, concept: str, asset: str, table: str) -> pd.DataFrame:
    """One table of an asset's output for a concept, its path columns absolute again."""
    path = layout.asset_dir(concept, asset) / table
    if not path.is_file():
        raise FileNotFoundError(f"{asset} has no output for concept {concept!r} yet ({path}); materialize it first")
    df = read_table(path)
    for col in PATH_COLUMNS:
        if col in df:
            df[col] = [None if v is None else str(layout.absolute(v)) for v in df[col]]
    return df


def write_asset_table(layout: ArtifactLayout, df: pd.DataFrame, path: Path) -> None:
    """Write an asset's table, its path columns relative to the artifact root (:func:`read_asset_table` undoes it)."""
    df = df.copy()
    for col in PATH_COLUMNS:
        if col in df:
            df[col] = [None if v is None else layout.relative(v) for v in df[col]]
    write_table(df, path)


def table_version(df: pd.DataFrame, columns: Iterable[str]) -> str:
    """Digest of the given columns, row order ignored: the data version of a table-backed asset.

    Only columns that downstream assets read go in, so identical content gives the same version no matter
    where or when it was computed.
    """
    cols = list(columns)
    rows = sorted(json.dumps([_plain(v) for v in r], default=str) for r in df[cols].itertuples(index=False))
    return digest(cols, rows)


def _plain(v):
    if isinstance(v, float) and v != v:  # NaN
        return None
    return v.item() if hasattr(v, "item") else v


def write_imagefolder(folder: Path, rows: list[dict]) -> None:
    """Write an HF ``imagefolder`` dataset: linked image files plus ``metadata.jsonl``.

    Each row has ``image`` (source path), ``file_name`` and ``text``; optionally ``conditioning_image`` (source
    path) and ``conditioning_image_file_name``, the column diffusers' ControlNet example reads.
    ``datasets.load_dataset("imagefolder", data_dir=folder)`` reads the result.
    """
    lines = []
    for row in rows:
        link_or_copy(Path(row["image"]), folder / row["file_name"])
        entry = {"file_name": row["file_name"], "text": row["text"]}
        if "conditioning_image" in row:
            link_or_copy(Path(row["conditioning_image"]), folder / row["conditioning_image_file_name"])
            entry["conditioning_image_file_name"] = row["conditioning_image_file_name"]
        lines.append(json.dumps(entry, ensure_ascii=False))
    write_bytes_atomic(folder / "metadata.jsonl", ("\n".join(lines) + "\n").encode() if lines else b"")
