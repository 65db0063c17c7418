"""partitions/discovery.py: concept folders found under the data root and their content digests."""

from __future__ import annotations

import os

from assets_pipeline.partitions.discovery import folder_digest, scan_concepts
from helpers import write_concept


def test_folder_digest_changes_with_content_not_with_reads(data_root):
    folder = write_concept(data_root, "rusty", {"a.png": b"1", "sub/b.png": b"2"})
    d0 = folder_digest(folder)
    (folder / "a.png").read_bytes()
    assert folder_digest(folder) == d0
    (folder / "c.png").write_bytes(b"3")
    d1 = folder_digest(folder)
    assert d1 != d0
    os.utime(folder / "c.png", ns=(1, 1))  # touched
    assert folder_digest(folder) != d1
    (folder / "c.png").unlink()
    assert folder_digest(folder) == d0


def test_scan_concepts(data_root):
    write_concept(data_root, "rusty", {})
    write_concept(data_root, "Nope", {})
    write_concept(data_root, "nospec", {}, spec=None)
    (data_root / "loose.jpg").write_bytes(b"x")
    scan = scan_concepts(data_root)
    assert list(scan.concepts) == ["rusty"]
    assert set(scan.invalid) == {"Nope", "nospec"}
