"""Lineage audit, both directions, from the manifests beside every trained output (pure, no Dagster).

- output -> sources: every training image of an output (path, sha256, caption, the filter and score decisions
  that let it in) and whether the file is still in the concept folder, unchanged.
- image -> outputs: every output, current or replaced, trained on an image (for takedown requests).

Replaced outputs keep their folders and manifests, so history stays auditable, also once retention.py has
pruned their weights (marked ``weights_pruned``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from assets_pipeline.hashing import sha256_file

LINEAGE_FILE = "lineage.json"
PRUNED_FILE = "PRUNED.json"  # beside the manifest of a version whose weights retention.py deleted


def row_concept(row: dict, manifest: dict) -> str:
    """The concept a training-image row of ``manifest`` comes from: an output trained on several concepts (a LoRA's
    datasets) names each row's; a row without one is the output's own concept's."""
    return row.get("concept", manifest["concept"])


def iter_manifests(artifact_root: Path) -> Iterator[tuple[Path, dict]]:
    """(output folder, manifest) for every finished output under the artifact root, oldest first. Folders whose
    name starts with '.' are unfinished (an output being written, a checkpoint) and never listed."""
    concepts = artifact_root / "concepts"
    for path in sorted(concepts.glob(f"*/*/*/{LINEAGE_FILE}")):
        if not any(part.startswith(".") for part in path.relative_to(concepts).parts):
            yield path.parent, json.loads(path.read_text())


def _output_dir(path: Path) -> Path:
    path = Path(path)
    folder = path if path.is_dir() else path.parent  # a weights file -> its folder
    if not (folder / LINEAGE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a trained output: no {LINEAGE_FILE} in {folder} (give an output "
                                "folder under artifacts/concepts/<concept>/<asset>/, or a weights file in one)")
    return folder


def audit_output(output: Path, data_root: Path) -> pd.DataFrame:
    """One row per training image of ``output`` (a folder or any weights file in it)."""
    folder = _output_dir(output)
    manifest = json.loads((folder / LINEAGE_FILE).read_text())
    rows = []
    for img in manifest["training_images"]:
        row = {**img, "concept": row_concept(img, manifest)}
        if img["role"] == "instance":
            source = data_root / row["concept"] / img["source_path"]
            if not source.is_file():
                row["status"] = "missing"
            else:
                row["status"] = "unchanged" if sha256_file(source) == img["image_sha256"] else "changed"
        else:
            row["status"] = "generated"  # class images come from the base model, not from a user's folder
        rows.append(row)
    return pd.DataFrame(rows)


def is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text.lower())


def source_of(path: Path, data_root: Path) -> tuple[str, str] | None:
    """(concept, path inside the concept folder) for a photo path under the data root, existing or not."""
    try:
        rel = Path(path).absolute().relative_to(Path(data_root).absolute())
    except ValueError:
        return None
    return (rel.parts[0], Path(*rel.parts[1:]).as_posix()) if len(rel.parts) > 1 else None


def outputs_trained_on(artifact_root: Path, sha: str | None, source: tuple[str, str] | None = None) -> pd.DataFrame:
    """Every output, current or replaced, whose manifest lists the image with this sha256 (``match`` =
    "content") or, given ``source`` = (concept, path), an earlier content of that path ("path: content changed
    since")."""
    rows = []
    for folder, m in iter_manifests(artifact_root):
        for r in m["training_images"]:
            if sha is not None and r["image_sha256"] == sha:
                match = "content"
            elif source and r["role"] == "instance" and (row_concept(r, m), r.get("source_path")) == source:
                match = "path: content changed since" if sha else "path: the file no longer exists"
            else:
                continue
            current = folder.parent / "current.json"
            is_current = current.is_file() and folder.parent / json.loads(current.read_text())["path"] == folder
            rows.append({"output": str(folder), "concept": m["concept"], "source_concept": row_concept(r, m),
                         "method": m["method"],
                         "created_at": m.get("created_at"), "run_id": m.get("run_id"), "current": is_current,
                         "weights_pruned": (folder / PRUNED_FILE).is_file(),
                         "source_path": r.get("source_path"), "image_sha256": r["image_sha256"], "match": match})
            break
    return pd.DataFrame(rows, columns=["output", "concept", "source_concept", "method", "created_at", "run_id", "current",
                                       "weights_pruned", "source_path", "image_sha256", "match"])
