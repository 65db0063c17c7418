"""store.py and tables.py: atomic writes, the content-addressed item cache, table data versions."""

from __future__ import annotations

import pandas as pd
import pytest

from assets_pipeline.store import ItemCache, atomic_dir, write_bytes_atomic
from assets_pipeline.tables import table_version


def test_atomic_dir_keeps_the_old_output_when_the_new_one_fails(tmp_path):
    out = tmp_path / "asset"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("half-written")
            raise RuntimeError("crash mid-write")
    assert (out / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["asset"]  # no temporary left behind
    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]


def test_failed_item_write_leaves_no_cache_entry(tmp_path):
    cache = ItemCache(tmp_path, "things", ".txt")

    def broken(tmp):
        tmp.write_text("partial")
        raise ValueError("boom")

    with pytest.raises(ValueError):
        cache.get_or_create("ab" * 32, broken)
    assert not cache.path("ab" * 32).exists()
    path = cache.get_or_create("ab" * 32, lambda tmp: tmp.write_text("done"))
    assert path.read_text() == "done"
    assert cache.get_or_create("ab" * 32, lambda tmp: tmp.write_text("never")) == path
    assert path.read_text() == "done"
    assert cache.counts() == {"items_computed": 1, "items_cached": 1}


def test_split_counts_duplicates_once(tmp_path):
    cache = ItemCache(tmp_path, "things", ".txt")
    cache.put("aa" * 32, lambda tmp: tmp.write_text("x"))
    missing = cache.split(["aa" * 32, "bb" * 32, "bb" * 32])
    assert missing == ["bb" * 32]
    assert cache.cached == 1


def test_write_bytes_atomic(tmp_path):
    write_bytes_atomic(tmp_path / "d" / "f.bin", b"123")
    assert (tmp_path / "d" / "f.bin").read_bytes() == b"123"
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["f.bin"]


def test_table_version_ignores_row_order_and_unlisted_columns():
    a = pd.DataFrame({"image_sha256": ["1", "2"], "caption": ["x", "y"], "decoded_path": ["/a", "/b"]})
    b = a.iloc[::-1].assign(decoded_path=["/elsewhere/b", "/elsewhere/a"])
    assert table_version(a, ["image_sha256", "caption"]) == table_version(b, ["image_sha256", "caption"])
    c = a.assign(caption=["x", "z"])
    assert table_version(a, ["image_sha256", "caption"]) != table_version(c, ["image_sha256", "caption"])


@pytest.mark.parametrize("content, why", [
    (b'{"path": "2026', "not valid JSON, damaged or cut short (Unterminated string"),
    (b"", "empty (a write that never finished, or a full disk)"),
    (b"  \n", "empty"),
    (b"null", "holds null, expected a JSON object"),
    (b'{"other": 1}', "lacks the key(s) ['path']"),
    (b'{"path": "caf\xe9"}', "not UTF-8 text (byte 0xe9 at offset 13)"),
    (None, "cannot be read (No such file or directory)"),
    ("fifo", "a named pipe (FIFO), not a regular file"),
    ("folder", "a folder, not a regular file"),
], ids=["truncated", "empty", "blank", "null", "key_missing", "not_utf8", "missing", "fifo", "folder"])
def test_read_json_names_the_file_what_is_wrong_and_what_to_do(tmp_path, content, why):
    """Issue 28, point 11: the one reader of the project's JSON records. Every failure is an UnreadableFile whose
    message is '<file>: <what is wrong>; <remedy>'; a FIFO is never opened (it would block)."""
    import os

    from assets_pipeline.store import UnreadableFile, read_json

    path = tmp_path / "current.json"
    if content == "fifo":
        os.mkfifo(path)
    elif content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UnreadableFile) as e:
        read_json(path, "write it again", keys=("path",))
    assert str(e.value).startswith(f"{path}: {why}") and str(e.value).endswith("; write it again")
    assert e.value.path == path and isinstance(e.value, ValueError)
    path.rmdir() if content == "folder" else path.unlink(missing_ok=True)
    path.write_text('\ufeff{"path": "v1", "run_id": "r"}')  # a byte order mark, as some editors save, is fine
    assert read_json(path, "write it again", keys=("path",)) == {"path": "v1", "run_id": "r"}
