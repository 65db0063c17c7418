"""The artifact root on disk: atomic writes, per-concept asset folders and content-addressed item caches.

Layout under the artifact root::

    base_models/<name>/                 built base models (diffusers folders)
    cache/<kind>/<key[:2]>/<key><ext>   content-addressed items (decoded images, latents, scores, ...)
    concepts/<concept>/<asset>/         the current output of one asset partition (replaced atomically)

Every write goes to a temporary sibling first and is renamed into place, so a crash never leaves a
half-written file where a reader (or a cache lookup) would take it for a complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` (a file) in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it becomes ``path``, replacing any previous folder.

    The old folder is first renamed aside and removed only after the new one is in place, so at every moment
    ``path`` is either the complete old output or the complete new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.{uuid.uuid4().hex}.old")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def link_or_copy(src: Path, dst: Path) -> None:
    """Place ``src`` at ``dst`` without duplicating bytes where the filesystem allows (hard link)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@dataclass
class ItemCache:
    """A content-addressed store of items of one kind: the key is a digest of everything that determines the
    item, so a changed input can never hit a stale entry, and a hit is valid across runs, concepts and methods.
    """

    root: Path
    kind: str
    ext: str
    computed: int = field(default=0, init=False)
    cached: int = field(default=0, init=False)

    def path(self, key: str) -> Path:
        return self.root / "cache" / self.kind / key[:2] / f"{key}{self.ext}"

    def get_or_create(self, key: str, create: Callable[[Path], None]) -> Path:
        """Return the item's path, calling ``create(tmp_path)`` to write it first when it is missing."""
        target = self.path(key)
        if target.exists():
            self.cached += 1
            return target
        return self.put(key, create)

    def split(self, keys: list[str]) -> list[str]:
        """Count the keys already stored as cache hits and return the missing ones, for batched computation
        (e.g. one VAE forward over all missing images); store each with :meth:`put`."""
        missing = [k for k in dict.fromkeys(keys) if not self.path(k).exists()]
        self.cached += len(dict.fromkeys(keys)) - len(missing)
        return missing

    def put(self, key: str, write: Callable[[Path], None]) -> Path:
        target = self.path(key)
        with atomic_path(target) as tmp:
            write(tmp)
        self.computed += 1
        return target

    def counts(self) -> dict[str, int]:
        return {"items_computed": self.computed, "items_cached": self.cached}


@dataclass(frozen=True)
class ArtifactLayout:
    """Where each output lives under the artifact root."""

    root: Path

    def asset_dir(self, concept: str, asset: str) -> Path:
        """The folder of one asset partition. The concept key is validated before any path is built (``..``,
        ``/`` or ``name/../name`` never reach the disk), and the result must resolve inside the root."""
        from assets_pipeline.partitions.concept_spec import validate_concept_key

        return self.inside(self.root / "concepts" / validate_concept_key(concept) / asset)

    def inside(self, path: Path) -> Path:
        """``path`` if it resolves inside the artifact root (links followed), else a ValueError naming both."""
        root = self.root.resolve()
        if not path.resolve().is_relative_to(root):
            raise ValueError(f"refusing {path}: it resolves to {path.resolve()}, outside the artifact root {root}")
        return path

    def cache(self, kind: str, ext: str) -> ItemCache:
        return ItemCache(self.root, kind, ext)

    def base_models_dir(self) -> Path:
        return self.root / "base_models"
