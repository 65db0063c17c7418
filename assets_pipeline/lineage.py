"""Lineage audit, both directions, from the manifests beside every trained output (pure, no Dagster).

- output -> sources: every training image of an output (path, sha256, caption, the filter and score decisions
  that let it in) and whether the file is still in the concept folder, unchanged.
- image -> outputs: every output, current or replaced, trained on an image (for takedown requests).

Replaced outputs keep their folders and manifests, so history stays auditable.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from assets_pipeline.hashing import sha256_file

LINEAGE_FILE = "lineage.json"


def iter_manifests(artifact_root: Path) -> Iterator[tuple[Path, dict]]:
    """(output folder, manifest) for every trained output under the artifact root, oldest first."""
    for path in sorted((artifact_root / "concepts").glob(f"*/*/*/{LINEAGE_FILE}")):
        yield path.parent, json.loads(path.read_text())


def _output_dir(path: Path) -> Path:
    path = Path(path)
    return path if path.is_dir() else path.parent  # a weights file -> its folder


def audit_output(output: Path, data_root: Path) -> pd.DataFrame:
    """One row per training image of ``output`` (a folder or any weights file in it)."""
    folder = _output_dir(output)
    manifest = json.loads((folder / LINEAGE_FILE).read_text())
    concept_dir = data_root / manifest["concept"]
    rows = []
    for img in manifest["training_images"]:
        row = dict(img)
        if img["role"] == "instance":
            source = concept_dir / img["source_path"]
            if not source.is_file():
                row["status"] = "missing"
            else:
                row["status"] = "unchanged" if sha256_file(source) == img["image_sha256"] else "changed"
        else:
            row["status"] = "generated"  # class images come from the base model, not from a user's folder
        rows.append(row)
    return pd.DataFrame(rows)


def image_sha256(image: str) -> str:
    """A file's sha256, or ``image`` itself when it is already a sha256 (64 hex digits) and not a file."""
    path = Path(image)
    if path.is_file():
        return sha256_file(path)
    if len(image) == 64 and all(c in "0123456789abcdef" for c in image.lower()):
        return image.lower()
    raise FileNotFoundError(f"{image!r} is neither a file nor a sha256")


def outputs_trained_on(artifact_root: Path, sha: str) -> pd.DataFrame:
    """Every output, current or replaced, whose manifest lists the image with this sha256."""
    rows = []
    for folder, m in iter_manifests(artifact_root):
        hits = [r for r in m["training_images"] if r["image_sha256"] == sha]
        if hits:
            current = folder.parent / "current.json"
            is_current = current.is_file() and Path(json.loads(current.read_text())["path"]) == folder
            rows.append({"output": str(folder), "concept": m["concept"], "method": m["method"],
                         "created_at": m.get("created_at"), "run_id": m.get("run_id"), "current": is_current,
                         "source_path": hits[0].get("source_path")})
    return pd.DataFrame(rows, columns=["output", "concept", "method", "created_at", "run_id", "current",
                                       "source_path"])
