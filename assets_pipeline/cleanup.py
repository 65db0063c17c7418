"""Stale temporaries: what a crashed writer left behind, removed by the next run that owns the folder.

Every write in this project goes to a temporary name first and is renamed into place (store.py,
training/output.py, training/loop.py). A crash (kill -9, OOM, power loss) between the two leaves the temporary
behind. Readers never take one for an output (its name starts with '.'), but it holds disk, a trained
model's weights included. The names this project gives its temporaries, and only those, are removed:

- ``.<name>.<32 hex>.tmp`` and ``.<name>.<32 hex>.old``: ``store.atomic_path`` / ``store.atomic_dir``
- ``.<name>.<8 chars>.tmp``: ``store.write_bytes_atomic`` (``tempfile.mkstemp``'s random part)
- ``.<name>.tmp``: an output folder being written (``.<version>.tmp/``), a checkpoint (``.step-N.tmp/``), a
  weights file being stamped
- ``.job-<run id>.json``: the job file a model asset hands its trainer

A temporary is removed only once nothing under it has changed for ``older_than_s``: a writer still at work
(another run of the same asset, another concept filling the same cache) keeps touching its temporary, and a
temporary of this project is never left unwritten for long while its writer lives. Pure: no Dagster import.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

GRACE_S = 3600.0
"""Default quiet time before a temporary counts as stale. A live writer's longest quiet spell is a model
asset's output folder during validation (loading the base pipeline and CLIP, rendering on a slow device):
minutes, not an hour. A live trainer's job file is written once and read only at the trainer's start, so
removing it an hour later harms nothing. Cleaning an hour late costs only disk until the next run."""

# After ".<name>.": what each writer appends (see the module docstring).
_TOKEN = r"(?:[0-9a-f]{32}\.(?:tmp|old)|[a-z0-9_]{8}\.tmp|tmp)"
_ANY = re.compile(rf"\..+\.{_TOKEN}")
_JOB = re.compile(r"\.job-[A-Za-z0-9_-]+\.json")


def is_temporary(name: str, owner: str | None = None) -> bool:
    """Whether ``name`` is one of this project's temporary names; with ``owner``, a temporary of the file or
    folder called ``owner`` only (``.raw_images.<hex>.tmp`` is raw_images', never captioned_images')."""
    if owner is None:
        return bool(_JOB.fullmatch(name) or _ANY.fullmatch(name))
    return re.fullmatch(rf"\.{re.escape(owner)}\.{_TOKEN}", name) is not None


def last_change(path: Path) -> float:
    """The newest modification time of ``path`` and, for a folder, of everything under it (links not
    followed): a folder whose writer is adding or growing files stays young."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                try:
                    newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
                except FileNotFoundError:
                    pass  # removed while we looked: its folder's own mtime records that
    return newest


def remove_stale_temporaries(folder: Path, older_than_s: float = GRACE_S, owner: str | None = None,
                             now: float | None = None) -> list[Path]:
    """Remove this project's temporaries directly inside ``folder`` (not below) that have been quiet for
    ``older_than_s`` seconds, and return them. ``owner`` limits it to one file's or folder's temporaries (a
    concept folder holds every asset's). ``older_than_s=0`` removes them whatever their age: only for a caller
    that knows no writer is live there (a trainer holding its job's lock). Anything else is never touched."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now = time.time() if now is None else now
    removed = []
    for path in sorted(folder.iterdir()):
        if not is_temporary(path.name, owner):
            continue
        try:
            if older_than_s > 0 and now - last_change(path) < older_than_s:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue  # another cleaner (a concurrent run of the same owner) was first
        removed.append(path)
    return removed


def remove_stale_cache_temporaries(kind_dir: Path, older_than_s: float = GRACE_S,
                                   now: float | None = None) -> list[Path]:
    """The same for one item-cache kind (``<artifact root>/cache/<kind>/``): its own folder and each
    ``<key[:2]>/`` shard. A cache is shared by every run and concept, so the grace period always applies."""
    kind_dir = Path(kind_dir)
    if not kind_dir.is_dir():
        return []
    removed = remove_stale_temporaries(kind_dir, older_than_s, now=now)
    for shard in sorted(kind_dir.iterdir()):
        if shard.is_dir() and not shard.is_symlink() and not shard.name.startswith("."):
            removed += remove_stale_temporaries(shard, older_than_s, now=now)
    return removed
