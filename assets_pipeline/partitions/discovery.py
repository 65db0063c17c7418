"""Find concept folders under the data root and digest their content (pure; the sensor and the ``concept_folders``
observation call this)."""

from __future__ import annotations

import bisect
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from assets_pipeline.hashing import digest
from assets_pipeline.concept import SPEC_FILE, ConceptSpecError, is_valid_concept_key
from assets_pipeline.partitions.concept_spec import load_concept_spec

INVALID_NAME = "not a valid concept name (1-64 of a-z 0-9 _ -, starting with a letter or digit); rename the folder"


@dataclass(frozen=True)
class ConceptScan:
    concepts: dict[str, str]  # valid folder name -> content digest
    invalid: dict[str, str]  # folder name -> why it is not used


def _walk(folder: Path) -> tuple[list[tuple[str, int, int]], list[tuple[str, int]], int]:
    """Every file's (relative path, size, mtime), every folder's (path, mtime), the newest mtime."""
    entries, stamps, newest = [], [], 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        try:
            mtime = os.stat(dirpath).st_mtime_ns
        except OSError:
            mtime = -1
        stamps.append((dirpath, mtime))
        newest = max(newest, mtime)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except OSError:  # removed while we walked, or a dangling link: part of the listing all the same
                entries.append((p.relative_to(folder).as_posix(), -1, -1))
                continue
            entries.append((p.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns))
            newest = max(newest, st.st_mtime_ns)
    return entries, stamps, newest


def folder_digest(folder: Path) -> str:
    """Digest of every file's relative path, size and modification time under ``folder``: the folder's data
    version (the ``concept_folders`` observation). Ingest then hashes the bytes, so a touched but unchanged photo
    costs one ingest and changes no data version downstream."""
    return digest(_walk(folder)[0])


def scan_concepts(data_root: Path) -> ConceptScan:
    """Every folder under the data root read in full (the ``concept_folders`` observation run from the UI)."""
    if not data_root.is_dir():
        return ConceptScan({}, {})
    scan = FolderIndex(data_root).scan(read_budget_s=math.inf, verify_budget_s=0)
    return ConceptScan(scan.concepts, scan.invalid)


# -- the sensor's view of the data root, kept between ticks -------------------------------------------------------

RACY_S = 2.0  # a folder changed less than this before it was read is read again next tick (mtime granularity)


@dataclass
class FolderState:
    """What one concept folder looked like when last read in full: the path and mtime of the folder (first) and of
    each sub-folder (a file added, removed or renamed anywhere changes one of them), ``concept.toml``'s (inode,
    size, mtime), its content digest (:func:`folder_digest`) or why it is not a usable concept, and the data
    version Dagster holds for it (``reported``: what the last query said; None: not known yet)."""

    stamps: tuple[tuple[str, int], ...]
    spec_stamp: tuple[int, int, int] | None
    digest: str | None
    invalid: str | None
    racy: bool
    files: int
    reported: str | None = None  # None: not known (not asked yet, or Dagster has none)


@dataclass
class TickScan:
    """One tick's findings: every folder under the data root (``present``), the usable concepts among them with
    their digests (``concepts``), the others with why (``invalid``), the folders read in full this tick
    (``read``), how many folders the verification pass covered, how many were left for a later tick because the
    tick's time was spent (``deferred``: neither usable nor invalid yet), and where the next pass starts."""

    present: list[str]
    concepts: dict[str, str]
    invalid: dict[str, str]
    read: list[str]
    verified: int
    deferred: int
    verify_from: str


def _spec_stamp(folder: Path | str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(os.path.join(folder, SPEC_FILE))
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def read_folder(folder: Path) -> FolderState:
    """Read one concept folder in full: its spec (checked), every file's size and mtime, every folder's mtime."""
    spec_stamp = _spec_stamp(folder)
    entries, stamps, newest = _walk(folder)
    invalid = None
    if spec_stamp is None and not (folder / SPEC_FILE).is_symlink():
        invalid = "no concept.toml (it needs at least token = \"...\")"
    else:
        try:
            load_concept_spec(folder)
        except ConceptSpecError as e:  # reported until fixed; never built
            invalid = f"concept.toml is not usable: {e}"
    racy = time.time_ns() - newest < RACY_S * 1e9
    return FolderState(tuple(stamps), spec_stamp, None if invalid else digest(entries), invalid, racy, len(entries))


def unchanged(state: FolderState) -> bool:
    """Whether a folder read before still looks the same from its folders' mtimes and its spec's stamp alone (a
    stat per folder, not per file). A file rewritten in place changes neither: the verification pass of
    :meth:`FolderIndex.scan` reads every folder in full in turn, and finds it."""
    if state.racy or _spec_stamp(state.stamps[0][0]) != state.spec_stamp:
        return False
    for path, mtime in state.stamps:
        try:
            if os.stat(path).st_mtime_ns != mtime:
                return False
        except OSError:
            return False
    return True


class FolderIndex:
    """The concept folders under one data root as the sensor last saw them, kept in the code server's memory
    between ticks (lost on a restart: the next ticks read every folder again, within their time budget).

    A tick (:meth:`scan`) lists the data root, reads in full every folder that is new or whose folders' mtimes or
    spec changed, then verifies folders in name order from where the last tick stopped, reading each in full,
    until ``verify_budget_s`` is spent: every folder is read in full at least once per ``N / (folders verified
    per tick)`` ticks, so a file rewritten in place (same folder mtimes) is found within that many ticks. Reading
    stops at ``read_budget_s``; what is left is read by the next ticks."""

    def __init__(self, data_root: Path):
        self.data_root = data_root
        self.folders: dict[str, FolderState] = {}

    def scan(self, verify_from: str = "", read_budget_s: float = 20.0, verify_budget_s: float = 0.5) -> TickScan:
        start = time.perf_counter()
        names, invalid = [], {}
        with os.scandir(self.data_root) as it:
            listing = sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
        for name in listing:
            if not is_valid_concept_key(name):
                invalid[name] = INVALID_NAME
            else:
                names.append(name)
        for gone in set(self.folders) - set(names):
            del self.folders[gone]
        read, deferred = [], 0
        # Folders new to the index first (a mass upload registers in the fewest ticks), then changed ones.
        stale = [n for n in names if n not in self.folders] + [
            n for n in names if n in self.folders and not unchanged(self.folders[n])]
        for name in stale:
            if read and time.perf_counter() - start > read_budget_s:  # at least one a tick: always progress
                deferred += 1
                continue
            self._read(name)
            read.append(name)
        # Verification: folders in name order from verify_from (wrapping), read in full within the budget.
        verified, position = 0, verify_from
        if names:
            at = bisect.bisect_right(names, verify_from)
            order = names[at:] + names[:at]
            spent = time.perf_counter()
            done = set(read)
            for name in order:
                if time.perf_counter() - spent > verify_budget_s and verified:
                    break
                if name not in done and name in self.folders:
                    self._read(name)
                    read.append(name)
                verified += 1
                position = name
                if verified == len(names):
                    break
        concepts = {}
        for name in names:
            if (state := self.folders.get(name)) is None:
                continue
            if state.invalid:
                invalid[name] = state.invalid
            else:
                concepts[name] = state.digest
        return TickScan(listing, concepts, invalid, read, verified, deferred, position)

    def _read(self, name: str) -> None:
        state = read_folder(self.data_root / name)
        if (old := self.folders.get(name)) is not None:
            state.reported = old.reported
        self.folders[name] = state
