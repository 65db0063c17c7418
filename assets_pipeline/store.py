"""The artifact root on disk: atomic writes, per-concept asset folders and content-addressed item caches.

Layout under the artifact root::

    base_models/<name>/                 built base models (diffusers folders)
    cache/<kind>/<key[:2]>/<key><ext>   content-addressed items (decoded images, latents, scores, ...)
    concepts/<concept>/<asset>/         the current output of one asset partition (replaced atomically)

Every write goes to a temporary sibling first and is renamed into place, so a crash never leaves a
half-written file where a reader (or a cache lookup) would take it for a complete one.

Integrity: every cache entry, and every output file that a later run reuses instead of rewriting, has a
``<name>.sha256`` sidecar written after it. A lookup re-hashes the entry; a missing, truncated or overwritten
one is logged with its path, discarded and recomputed. Hard links share one inode, so a file is verified
before it is linked anywhere: a corrupted entry is never spread into other outputs. Damage made in place after
linking (a tool writing through one of the names) reaches every name of the inode at once: a damaged entry is
therefore set aside (``<entry>.damaged``), and when it is recomputed every other name of the damaged inode under
``concepts/`` (the dataset folders of every concept that linked it) is replaced by a link to the repaired entry.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assets_pipeline.concept import ConceptSpec, validate_concept_key
from assets_pipeline.hashing import sha256_file

log = logging.getLogger(__name__)
DIGEST_SUFFIX = ".sha256"
SPEC_SNAPSHOT = "concept.json"  # raw_images' copy of the concept spec it ingested with


def _file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (read without changing it for long)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


def share_files(path: Path) -> None:
    """Give ``path`` (a file, or every file under a folder) the usual file mode. Some writers (safetensors,
    mkstemp) create files 0600; an output must be as readable as any other, whichever library wrote it."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    for f in files:
        if f.stat().st_mode & 0o777 != FILE_MODE:
            os.chmod(f, FILE_MODE)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)  # mkstemp creates 0600; every output gets the mode any other new file gets
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


# What a file that is not a regular file is, by its stat.S_IS* test (a folder is not "special": callers name it).
_SPECIAL_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def special_kind(mode: int) -> str | None:
    """What a FIFO, socket or device is, in words, from its ``st_mode``; None for a regular file or a folder."""
    return next((kind for test, kind in _SPECIAL_KINDS if test(mode)), None)


class NotRegularFile(OSError):
    """A path that is a FIFO, socket, device or folder where a regular file was expected; it was not opened."""

    def __init__(self, path: Path, kind: str):
        super().__init__(f"{path} is {kind}, not a regular file: not opened")
        self.path = path
        self.kind = kind


def _kind(mode: int) -> str | None:
    """None for a regular file, else what it is in words."""
    if stat.S_ISREG(mode):
        return None
    return special_kind(mode) or ("a folder" if stat.S_ISDIR(mode) else "of an unknown file type")


def read_regular_file(path: Path) -> bytes:
    """The bytes of the regular file at ``path`` (links followed). Anything else raises :class:`NotRegularFile`
    unopened: opening a FIFO to read blocks until a writer comes, and opening a device can act on it. The file is
    opened non-blocking and checked again, so one swapped for a FIFO after the first check cannot hang the read.
    Other failures (missing, a link loop, no permission) are the usual OSError."""
    if kind := _kind(os.stat(path).st_mode):
        raise NotRegularFile(path, kind)
    with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
        if kind := _kind(os.fstat(f.fileno()).st_mode):
            raise NotRegularFile(path, kind)
        return f.read()


class UnreadableFile(ValueError):
    """A project file (a manifest, a pointer, a record) that cannot be read or is not what it should be. The
    message names the file, what is wrong with it and what to do."""

    def __init__(self, path: Path, why: str, remedy: str):
        super().__init__(f"{path}: {why}; {remedy}")
        self.path = Path(path)
        self.why = why
        self.remedy = remedy


def read_text(path: Path, remedy: str) -> str:
    """A project file's UTF-8 text, or :class:`UnreadableFile` naming it, why, and ``remedy`` (what to do)."""
    try:
        data = read_regular_file(path)
    except NotRegularFile as e:
        raise UnreadableFile(path, f"{e.kind}, not a regular file", remedy) from None
    except OSError as e:
        raise UnreadableFile(path, f"cannot be read ({e.strerror or e})", remedy) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UnreadableFile(path, f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})",
                             remedy) from None


def read_json(path: Path, remedy: str, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """A project JSON file holding an object with (at least) ``keys``, or :class:`UnreadableFile` naming it,
    what is wrong (unreadable, empty, cut short, not an object, keys missing) and ``remedy``."""
    text = read_text(path, remedy)
    if not text.strip():
        raise UnreadableFile(path, "empty (a write that never finished, or a full disk)", remedy)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UnreadableFile(path, f"not valid JSON, damaged or cut short ({e})", remedy) from None
    if not isinstance(obj, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(obj), "a number")
        raise UnreadableFile(path, f"holds {kind}, expected a JSON object", remedy)
    if missing := [k for k in keys if k not in obj]:
        raise UnreadableFile(path, f"lacks the key(s) {missing}", remedy)
    return obj


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` (a file) in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        share_files(tmp)
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
        share_files(tmp)
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


class CorruptFile(Exception):
    """A file whose bytes no longer match the digest recorded when it was written."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path}: {why}")
        self.path = path
        self.why = why


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + DIGEST_SUFFIX)


def record_digest(path: Path) -> str:
    """Write ``path``'s sha256 beside it (``<name>.sha256``); call once the file is complete and in place."""
    value = sha256_file(path)
    write_bytes_atomic(digest_path(path), (value + "\n").encode())
    return value


def check_file(path: Path) -> str | None:
    """None when ``path`` matches its recorded digest, else why not (no digest, unreadable, mismatch)."""
    try:
        recorded = digest_path(path).read_text().strip()
    except FileNotFoundError:
        return "no integrity digest recorded (an unfinished write, or written by an older version)"
    except OSError as e:
        return f"integrity digest unreadable: {e}"
    try:
        actual = sha256_file(path)
    except OSError as e:
        return f"unreadable: {e}"
    if actual != recorded:
        return f"contents changed since written (sha256 {actual[:12]}, recorded {recorded[:12]}; size {path.stat().st_size} B)"
    return None


def verify_file(path: Path) -> Path:
    """``path`` if it matches its recorded digest, else :class:`CorruptFile`."""
    why = check_file(path)
    if why is not None:
        raise CorruptFile(path, why)
    return path


def link_or_copy(src: Path, dst: Path, verify: bool = True) -> None:
    """Place ``src`` at ``dst`` without duplicating bytes where the filesystem allows (hard link).

    With ``verify`` (the default) ``src`` must match its recorded digest first (:class:`CorruptFile` if not),
    and the digest travels with it, so a link never spreads a corrupted file and the copy stays verifiable.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    if verify:
        verify_file(src)
        link_or_copy(digest_path(src), digest_path(dst), verify=False)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


DAMAGED_SUFFIX = ".damaged"  # a discarded cache entry kept (same inode) until its other names are repaired


def other_names(path: Path, under: Path) -> list[Path]:
    """The other names (hard links) of ``path``'s inode below ``under``. The walk compares the inode numbers the
    directory entries carry (no stat per file) and stops once it has found every link the inode counts."""
    st = path.stat()
    wanted = st.st_nlink - 1
    found: list[Path] = []
    stack = [under]
    while stack and len(found) < wanted:
        try:
            entries = list(os.scandir(stack.pop()))
        except FileNotFoundError:  # a folder replaced meanwhile (atomic_dir): its new contents are fresh links
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif (entry.inode() == st.st_ino and entry.is_file(follow_symlinks=False)
                  and entry.stat(follow_symlinks=False).st_dev == st.st_dev and Path(entry.path) != path):
                found.append(Path(entry.path))
    return found


def replace_with_link(src: Path, dst: Path) -> None:
    """Atomically make ``dst`` a name of ``src`` (a copy where links are not possible)."""
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


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
    discarded: list[str] = field(default_factory=list, init=False)  # "<path>: <why>" of each bad entry found
    repaired: list[str] = field(default_factory=list, init=False)  # other names of a damaged entry, relinked
    # The stages call it from several threads (assets_pipeline/parallel.py): entries are distinct files written
    # atomically; the counts are updated under this lock.
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @property
    def folder(self) -> Path:
        """This kind's folder: ``<root>/cache/<kind>/``, entries sharded below it by their key's first two hex."""
        return self.root / "cache" / self.kind

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}{self.ext}"

    def get_or_create(self, key: str, create: Callable[[Path], None]) -> Path:
        """Return the item's path, calling ``create(tmp_path)`` to write it first when it is missing or bad."""
        if self._valid(key):
            with self._lock:
                self.cached += 1
            return self.path(key)
        return self.put(key, create)

    def split(self, keys: list[str]) -> list[str]:
        """Count the keys already stored (and intact) as cache hits and return the missing ones, for batched
        computation (e.g. one VAE forward over all missing images); store each with :meth:`put`."""
        missing = [k for k in dict.fromkeys(keys) if not self._valid(k)]
        with self._lock:
            self.cached += len(dict.fromkeys(keys)) - len(missing)
        return missing

    def put(self, key: str, write: Callable[[Path], None]) -> Path:
        target = self.path(key)
        with atomic_path(target) as tmp:
            write(tmp)
            digest = sha256_file(tmp)
        # Written after the entry: a crash in between leaves an entry without a digest, which reads as missing.
        write_bytes_atomic(digest_path(target), (digest + "\n").encode())
        repaired = self._repair_links(target)
        with self._lock:
            self.computed += 1
            self.repaired += repaired
        return target

    def _repair_links(self, target: Path) -> list[str]:
        """Point every other name of the damaged inode set aside for ``target`` (see :meth:`_valid`) at the new
        entry, its digest sidecar with it; then drop the damaged inode. Returns the names repaired."""
        damaged = target.with_name(target.name + DAMAGED_SUFFIX)
        try:
            names = other_names(damaged, self.root / "concepts")
        except FileNotFoundError:  # none set aside (or another process repaired them meanwhile)
            return []
        for name in names:
            replace_with_link(target, name)
            replace_with_link(digest_path(target), digest_path(name))
        if names:
            log.warning("repaired %d other link(s) of damaged cache entry %s: %s", len(names), target,
                        ", ".join(map(str, names)))
        damaged.unlink(missing_ok=True)
        return [str(n) for n in names]

    def _valid(self, key: str) -> bool:
        """Whether the entry exists and matches its digest; a bad one is logged, counted and removed."""
        target = self.path(key)
        if not target.exists():
            return False
        why = check_file(target)
        if why is None:
            return True
        log.warning("discarding cache entry %s: %s; recomputing it", target, why)
        with self._lock:
            self.discarded.append(f"{target}: {why}")
        # The recomputed entry is a new inode. Outputs hard-linked to the damaged one share its damage: the damaged
        # inode is kept aside under a name no lookup reads, so that put() can find those links and repair them.
        try:
            if target.stat().st_nlink > 1:
                os.replace(target, target.with_name(target.name + DAMAGED_SUFFIX))
            else:
                target.unlink()
        except FileNotFoundError:  # another process found it first and set it aside
            pass
        digest_path(target).unlink(missing_ok=True)
        return False

    def counts(self) -> dict[str, int]:
        """Materialization metadata: hits, misses and (when any) the corrupt entries replaced."""
        out = {"items_computed": self.computed, "items_cached": self.cached}
        if self.discarded:
            out["items_discarded_corrupt"] = len(self.discarded)
        if self.repaired:
            out["links_repaired"] = len(self.repaired)
        return out


@dataclass(frozen=True)
class ArtifactLayout:
    """Where each output lives under the artifact root."""

    root: Path

    def asset_dir(self, concept: str, asset: str) -> Path:
        """The folder of one asset partition. The concept key is validated before any path is built (``..``,
        ``/`` or ``name/../name`` never reach the disk), and the result must resolve inside the root."""
        return self.inside(self.root / "concepts" / validate_concept_key(concept) / asset)

    def inside(self, path: Path) -> Path:
        """``path`` if it resolves inside the artifact root (links followed), else a ValueError naming both."""
        root = self.root.resolve()
        if not path.resolve().is_relative_to(root):
            raise ValueError(f"refusing {path}: it resolves to {path.resolve()}, outside the artifact root {root}")
        return path

    def relative(self, path: Path | str) -> str:
        """How a path inside the root is stored in tables: relative to the root, so the root can be moved,
        mounted elsewhere or restored from a backup and every stored path still resolves."""
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    def absolute(self, stored: str) -> Path:
        """A stored path resolved against this root (an absolute one, from an older table, is kept as is)."""
        return self.root / stored

    def spec(self, concept: str) -> ConceptSpec:
        """The concept spec as ``raw_images`` captured it (``SPEC_SNAPSHOT``), so every asset of one build agrees
        on it."""
        raw = read_json(self.asset_dir(concept, "raw_images") / SPEC_SNAPSHOT,
                        f"rematerialize raw_images for concept {concept!r} to write it again",
                        keys=("name", "token", "class_noun", "methods", "overrides"))
        return ConceptSpec.from_json(raw)

    def cache(self, kind: str, ext: str) -> ItemCache:
        return ItemCache(self.root, kind, ext)

    def cache_root(self) -> Path:
        """Every cache's folder: the item caches', and the compilers' (a training job's ``cache_dir``)."""
        return self.root / "cache"

    def base_models_dir(self) -> Path:
        return self.root / "base_models"
