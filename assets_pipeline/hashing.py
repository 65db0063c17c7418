"""Content digests: the one way this project names content (sample ids, cache keys, data versions)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digest(*parts: Any) -> str:
    """sha256 of a canonical JSON encoding of ``parts``.

    Canonical (sorted keys, no whitespace) so the same logical inputs give the same key on every machine;
    used for cache keys, where every input that determines an item must be one of the parts.
    """
    payload = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
