"""Find concept folders under the data root and digest their content (pure; the sensor calls this)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from assets_pipeline.hashing import digest
from assets_pipeline.concept import ConceptSpecError, is_valid_concept_key
from assets_pipeline.partitions.concept_spec import load_concept_spec


@dataclass(frozen=True)
class ConceptScan:
    concepts: dict[str, str]  # valid folder name -> content digest
    invalid: dict[str, str]  # folder name -> why it is not used


def folder_digest(folder: Path) -> str:
    """Digest of every file's relative path, size and modification time under ``folder``.

    Cheap enough to run for every concept on every sensor tick; ingest then hashes the bytes, so a touched but
    unchanged photo costs one ingest and changes no data version downstream.
    """
    entries = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except OSError:  # removed while we walked, or a dangling link: part of the listing all the same
                entries.append((p.relative_to(folder).as_posix(), -1, -1))
                continue
            entries.append((p.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns))
    return digest(entries)


def scan_concepts(data_root: Path) -> ConceptScan:
    concepts: dict[str, str] = {}
    invalid: dict[str, str] = {}
    if not data_root.is_dir():
        return ConceptScan(concepts, invalid)
    for entry in sorted(data_root.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        if not is_valid_concept_key(entry.name):
            invalid[entry.name] = (
                "not a valid concept name (1-64 of a-z 0-9 _ -, starting with a letter or digit); rename the folder"
            )
            continue
        spec = entry / "concept.toml"
        if not spec.exists() and not spec.is_symlink():
            invalid[entry.name] = "no concept.toml (it needs at least token = \"...\")"
            continue
        try:
            load_concept_spec(entry)
        except ConceptSpecError as e:  # reported each tick until fixed; never built
            invalid[entry.name] = f"concept.toml is not usable: {e}"
            continue
        concepts[entry.name] = folder_digest(entry)
    return ConceptScan(concepts, invalid)
