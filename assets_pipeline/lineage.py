"""Lineage audit, both directions, from the manifests beside every trained output (pure, no Dagster).

- output -> sources: every training image of an output (path, sha256, caption, the filter and score decisions
  that let it in) and whether the file is still in the concept folder, unchanged.
- image -> outputs: every output, current or replaced, trained on an image (for takedown requests).

Replaced outputs keep their folders and manifests, so history stays auditable, also once retention.py has
pruned their weights (marked ``weights_pruned``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd

from assets_pipeline.hashing import sha256_file
from assets_pipeline.store import UnreadableFile, read_json

log = logging.getLogger(__name__)
LINEAGE_FILE = "lineage.json"
PRUNED_FILE = "PRUNED.json"  # beside the manifest of a version whose weights retention.py deleted
CURRENT_FILE = "current.json"  # {"path": <version folder name>}: the asset's current output among kept versions
# What to do about a damaged lineage.json: nothing rebuilds it, it is the record of what the output was trained on.
LINEAGE_REMEDY = "restore it from a backup (nothing rebuilds it: it records what this output was trained on)"
Warn = Callable[[str], None]  # where a skipped record is reported (a log, the CLI's stderr)


def manifest_problem(manifest: dict) -> str | None:
    """What keeps a parsed lineage manifest from being audited (a key or the training rows missing), or None."""
    if missing := [k for k in ("concept", "method", "training_images") if k not in manifest]:
        return f"lacks the key(s) {missing}"
    rows = manifest["training_images"]
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "image_sha256" in r and "role" in r
                                             for r in rows):
        return "training_images is not a list of rows with image_sha256 and role"
    return None


def read_manifest(folder: Path) -> dict:
    """The lineage manifest of the output ``folder``, or :class:`UnreadableFile` naming it and what to do."""
    path = Path(folder) / LINEAGE_FILE
    manifest = read_json(path, LINEAGE_REMEDY)
    if (why := manifest_problem(manifest)) is not None:
        raise UnreadableFile(path, why, LINEAGE_REMEDY)
    return manifest


def current_version(asset_dir: Path) -> Path | None:
    """The version folder an asset's ``current.json`` names, or None before its first output; a damaged one is
    :class:`UnreadableFile` naming it and what to do."""
    pointer = Path(asset_dir) / CURRENT_FILE
    if not pointer.exists() and not pointer.is_symlink():
        return None
    remedy = (f"rematerialize {pointer.parent.name} for concept {pointer.parent.parent.name!r} (an intact kept "
              "version of the same job is made current again, else it trains), or write {\"path\": \"<version "
              "folder>\"} into it")
    name = read_json(pointer, remedy, keys=("path",))["path"]
    if not isinstance(name, str) or not name:
        raise UnreadableFile(pointer, f"its path is {name!r}, expected a version folder's name", remedy)
    # Relative to the pointer's folder (an absolute path, written by an older version, is kept as is).
    return pointer.parent / name


def row_concept(row: dict, manifest: dict) -> str:
    """The concept a training-image row of ``manifest`` comes from: an output trained on several concepts (a LoRA's
    datasets) names each row's; a row without one is the output's own concept's."""
    return row.get("concept", manifest["concept"])


def iter_manifests(artifact_root: Path, warn: Warn = log.warning) -> Iterator[tuple[Path, dict]]:
    """(output folder, manifest) for every finished output under the artifact root, oldest first. Folders whose
    name starts with '.' are unfinished (an output being written, a checkpoint) and never listed. A manifest that
    is not a JSON object is left out with a warning (``warn``) naming it: one such file does not cost the others
    (:func:`manifest_problem` tells whether one that is can be audited)."""
    concepts = artifact_root / "concepts"
    for path in sorted(concepts.glob(f"*/*/*/{LINEAGE_FILE}")):
        if any(part.startswith(".") for part in path.relative_to(concepts).parts):
            continue
        try:
            manifest = read_json(path, LINEAGE_REMEDY)
        except UnreadableFile as e:
            warn(f"{e}; until then this output is left out")
            continue
        yield path.parent, manifest


def _output_dir(path: Path) -> Path:
    path = Path(path)
    folder = path if path.is_dir() else path.parent  # a weights file -> its folder
    if not (folder / LINEAGE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a trained output: no {LINEAGE_FILE} in {folder} (give an output "
                                "folder under artifacts/concepts/<concept>/<asset>/, or a weights file in one)")
    return folder


CONTROL_PREFIX = "control/"  # a user's conditioning image (stages/ingest.py CONTROL_DIR), as lineage names it


def audit_output(output: Path, data_root: Path) -> pd.DataFrame:
    """One row per training image of ``output`` (a folder or any weights file in it); a ControlNet's rows also say
    whether the user's conditioning image (``control_source``) is still there unchanged (``control_status``)."""
    folder = _output_dir(output)
    manifest = read_manifest(folder)
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
        if (control := img.get("control_source")) is not None:  # ControlNet: the pair's other half
            if not control.startswith(CONTROL_PREFIX):
                row["control_status"] = "generated"  # an annotator's, from the photo
            else:
                pair = data_root / row["concept"] / control
                row["control_status"] = ("missing" if not pair.is_file() else
                                         "unchanged" if sha256_file(pair) == img.get("control_sha256") else "changed")
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


def outputs_trained_on(artifact_root: Path, sha: str | None, source: tuple[str, str] | None = None,
                       warn: Warn = log.warning) -> pd.DataFrame:
    """Every output, current or replaced, whose manifest lists the image with this sha256 (``match`` =
    "content"; a ControlNet's held-out validation pair says so in ``match``) or, given ``source`` = (concept,
    path), an earlier content of that path ("path: content changed
    since"). A damaged manifest is left out, and a damaged ``current.json`` leaves ``current`` unknown (None),
    each with a warning (``warn``) naming the file."""
    rows = []
    currents: dict[Path, Path | None] = {}  # asset folder -> the version its current.json names
    unknown: set[Path] = set()  # asset folders whose current.json is damaged
    for folder, m in iter_manifests(artifact_root, warn):
        if (why := manifest_problem(m)) is not None:
            warn(f"{UnreadableFile(folder / LINEAGE_FILE, why, LINEAGE_REMEDY)}; until then this output is left out")
            continue
        held = [{**r, "role": "instance"} for r in m.get("validation_pairs", [])]  # ControlNet: not trained on
        for i, r in enumerate(m["training_images"] + held):
            if sha is not None and r["image_sha256"] == sha:
                match = "content"
            elif sha is not None and r.get("control_sha256") == sha:  # ControlNet: the pair's conditioning image
                match = "content: conditioning image"
            elif source and r["role"] == "instance" and (row_concept(r, m), r.get("source_path")) == source:
                match = "path: content changed since" if sha else "path: the file no longer exists"
            elif source and (row_concept(r, m), r.get("control_source")) == source:
                match = ("path: conditioning image, content changed since" if sha else
                         "path: conditioning image, the file no longer exists")
            else:
                continue
            if i >= len(m["training_images"]):
                match += " (held out of training: a validation pair)"
            if folder.parent not in currents:  # each asset's pointer read once, a damaged one warned about once
                try:
                    currents[folder.parent] = current_version(folder.parent)
                except UnreadableFile as e:
                    warn(f"{e}; until then which version of it is current is unknown")
                    currents[folder.parent] = None
                    unknown.add(folder.parent)
            is_current = None if folder.parent in unknown else currents[folder.parent] == folder
            rows.append({"output": str(folder), "concept": m["concept"], "source_concept": row_concept(r, m),
                         "method": m["method"],
                         "created_at": m.get("created_at"), "run_id": m.get("run_id"), "current": is_current,
                         "weights_pruned": (folder / PRUNED_FILE).is_file(),
                         "source_path": r.get("source_path"), "image_sha256": r["image_sha256"], "match": match})
            break
    return pd.DataFrame(rows, columns=["output", "concept", "source_concept", "method", "created_at", "run_id", "current",
                                       "weights_pruned", "source_path", "image_sha256", "match"])
