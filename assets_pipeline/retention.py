"""Retention of trained outputs: the audit trail forever, the weights of the newest versions only.

Every version folder of a model asset keeps its ``lineage.json``, ``metrics.json``, ``SHA256SUMS``, loss curve
and validation images forever: that is what the lineage audit answers from. The weights of replaced versions
beyond the newest ``keep`` are deleted (at SD 1.5 size a DreamBooth version is gigabytes); the current version's
never are. A pruned folder gets a ``PRUNED.json`` saying when and what was removed, and the lineage CLI marks it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from assets_pipeline.lineage import LINEAGE_FILE, PRUNED_FILE, Warn, read_manifest
from assets_pipeline.store import UnreadableFile, read_json, write_json_atomic

log = logging.getLogger(__name__)
DEFAULT_KEEP = 2  # the current version and the one before it: enough to roll back one retrain


@dataclass(frozen=True)
class Pruned:
    folder: Path
    files: list[str]  # relative to the folder
    bytes: int


def pruned_record(folder: Path) -> dict | None:
    """The record of a version whose weights were pruned, None for one never pruned; a damaged record is
    :class:`UnreadableFile` naming it and what to do."""
    path = Path(folder) / PRUNED_FILE
    if not path.exists() and not path.is_symlink():
        return None
    return read_json(path, "restore it from a backup, or delete it: `assets-pipeline prune` then records this "
                     "version again, without the original date and size", keys=("pruned_at", "files", "bytes"))


def versions(asset_dir: Path) -> list[Path]:
    """The finished version folders of one asset partition, oldest first (their names start with a UTC stamp)."""
    if not asset_dir.is_dir():
        return []
    return sorted(p for p in asset_dir.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / LINEAGE_FILE).is_file())


def prune_asset(asset_dir: Path, current: Path | None, keep: int = DEFAULT_KEEP, dry_run: bool = False,
                warn: Warn = log.warning) -> list[Pruned]:
    """Delete the weights of every version older than the newest ``keep``, never ``current``'s.

    The weights are the files the version's ``lineage.json`` lists under ``weights`` (the files the output was
    trained into, whatever the method's layout); a diffusers folder left empty by that is removed too. A version
    whose ``lineage.json`` or ``PRUNED.json`` is damaged keeps its weights, with a warning (``warn``) naming it.
    """
    if keep < 1:
        raise ValueError(f"keep = {keep}: at least the newest version's weights must be kept (keep >= 1)")
    done = []
    found = versions(asset_dir)
    for folder in found[:-keep]:
        if current is not None and folder.resolve() == Path(current).resolve():
            continue
        try:
            if pruned_record(folder) is not None:
                continue
            manifest = read_manifest(folder)
        except UnreadableFile as e:
            warn(f"{e}; until then the weights of {folder.name} are not pruned")
            continue
        files = [rel for rel in sorted(manifest.get("weights", {})) if (folder / rel).is_file()]
        size = sum((folder / rel).stat().st_size for rel in files)
        if not dry_run:
            # The record first: a crash part-way leaves a folder marked pruned with some weights still there,
            # never an unmarked folder with weights missing.
            write_json_atomic(folder / PRUNED_FILE, {
                "pruned_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "files": files,
                "bytes": size, "kept": "lineage.json, metrics.json, SHA256SUMS, loss curve, validation images"})
            for rel in files:
                (folder / rel).unlink()
                parent = (folder / rel).parent
                while parent != folder and not any(parent.iterdir()):
                    parent.rmdir()
                    parent = parent.parent
        done.append(Pruned(folder, files, size))
    return done


def human_bytes(n: float) -> str:
    """``n`` bytes as B, KiB, ... TiB (one decimal above bytes)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
