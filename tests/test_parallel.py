"""assets_pipeline/parallel.py: per-image work on a thread pool gives what one thread gives, in the same order."""

from __future__ import annotations

import threading
import time

import pandas as pd
import pytest

from assets_pipeline.parallel import ENV, image_threads, prefetched, thread_map
from assets_pipeline.store import ItemCache
from helpers import encode, photo, write_concept


def test_thread_map_keeps_the_order_and_uses_several_threads():
    names = set()

    def work(i):
        names.add(threading.current_thread().name)
        time.sleep(0.01 * (i % 3))  # later items finish first
        return i * i

    assert thread_map(work, range(20), threads=4) == [i * i for i in range(20)]
    assert len(names) > 1 and all(n.startswith("images") for n in names)
    assert thread_map(work, [], threads=4) == []


def test_thread_map_raises_the_first_failure_in_the_items_order():
    def work(i):
        if i in (3, 7):
            time.sleep(0.05 if i == 3 else 0)  # item 7 fails first in time; item 3 is first in order
            raise ValueError(f"item {i}")
        return i

    with pytest.raises(ValueError, match="item 3"):
        thread_map(work, range(10), threads=4)


def test_prefetched_loads_the_next_batch_while_the_caller_works_on_this_one():
    started = []

    def load(x):
        started.append(x)
        return -x

    batches = [[1, 2], [3, 4], [5]]
    seen = []
    for batch in prefetched(batches, load, threads=2):
        deadline = time.monotonic() + 5
        want = {x for b in batches[len(seen) + 1 : len(seen) + 2] for x in b}
        while not want <= set(started) and time.monotonic() < deadline:  # the next batch, loaded meanwhile
            time.sleep(0.005)
        assert want <= set(started), (seen, started)
        seen.append(batch)
    assert seen == [[-1, -2], [-3, -4], [-5]]
    assert list(prefetched([], load)) == []


def test_prefetched_raises_at_the_failing_batch():
    def load(x):
        if x == 3:
            raise OSError("cannot read 3")
        return x

    got = []
    with pytest.raises(OSError, match="cannot read 3"):
        for batch in prefetched([[1], [2], [3], [4]], load, threads=2):
            got.append(batch)
    assert got == [[1], [2]]


def test_the_number_of_threads_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(ENV, "3")
    assert image_threads() == 3
    monkeypatch.setenv(ENV, "0")
    with pytest.raises(ValueError, match=f"{ENV}='0': expected a whole number of threads >= 1"):
        image_threads()
    monkeypatch.setenv(ENV, "many")
    with pytest.raises(ValueError, match="many"):
        image_threads()
    monkeypatch.delenv(ENV)
    assert 1 <= image_threads() <= 8


def test_cache_counts_are_exact_under_threads(tmp_path):
    cache = ItemCache(tmp_path, "items", ".txt")
    keys = [f"{i:064x}" for i in range(300)]
    thread_map(lambda k: cache.get_or_create(k, lambda tmp: tmp.write_text(k)), keys, threads=8)
    thread_map(lambda k: cache.get_or_create(k, lambda tmp: tmp.write_text("again")), keys[:100], threads=8)
    assert cache.counts() == {"items_computed": 300, "items_cached": 100}
    assert all(cache.path(k).read_text() == k for k in keys)


def test_ingest_and_latents_are_the_same_with_one_thread_or_several(tmp_path, monkeypatch, encoders):
    """Duplicates on both sides of a chunk boundary, a duplicated corrupt file: the manifest, the rejects and the
    latents do not depend on the number of threads."""
    from assets_pipeline.stages.ingest import ingest_concept
    from assets_pipeline.stages.latents import LatentConfig, compute_latents

    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "immunohistochemistry"]
    files = {f"{i:02d}_{n}.jpg": encode(photo(n, (96 + 8 * i, 80)), "JPEG", quality=90) for i, n in enumerate(names)}
    files["07_copy.jpg"] = files["01_coffee.jpg"]  # a duplicate in a later chunk (4 files a chunk at one thread)
    files["02b_copy.jpg"] = files["02_chelsea.jpg"]  # and one in the same chunk
    files["08_broken.jpg"] = files["03_rocket.jpg"][:400]
    files["09_broken_copy.jpg"] = files["08_broken.jpg"]  # a copy of rejected bytes gets their reason
    results = {}
    for threads in (1, 3):
        monkeypatch.setenv(ENV, str(threads))
        root = tmp_path / f"t{threads}"
        folder = write_concept(root / "data", "c", files)
        cache = ItemCache(root / "artifacts", "images", ".png")
        res = ingest_concept(folder, root / "data", cache)
        items = res.manifest.assign(caption="a photo", role="instance")
        latent_cache = ItemCache(root / "artifacts", "latents", ".safetensors")
        index = compute_latents(items, encoders, 64, LatentConfig(batch_size=2), latent_cache,
                                ItemCache(root / "artifacts", "text", ".safetensors"))
        latents = {k: latent_cache.path(k).read_bytes() for k in index["latent_key"]}
        manifest = res.manifest.drop(columns=["decoded_path"])
        decoded = [open(p, "rb").read() for p in res.manifest["decoded_path"]]
        results[threads] = (manifest, res.rejects, decoded, index, latents, cache.counts())
    (m1, r1, d1, i1, l1, c1), (m3, r3, d3, i3, l3, c3) = results[1], results[3]
    pd.testing.assert_frame_equal(m1, m3)
    pd.testing.assert_frame_equal(r1, r3)
    assert d1 == d3 and l1 == l3 and c1 == c3 == {"items_computed": 7, "items_cached": 0}
    pd.testing.assert_frame_equal(i1, i3)
    codes = dict(zip(r1["source_path"], r1["code"]))
    assert codes == {"07_copy.jpg": "exact_duplicate", "02b_copy.jpg": "exact_duplicate",
                     "08_broken.jpg": "truncated", "09_broken_copy.jpg": "truncated"}
    assert len(m1) == 7 and len({k for k in l1}) == 7


def test_a_preview_with_a_photo_twice_makes_its_thumbnail_once(tmp_path):
    from assets_pipeline.imaging import grid_markdown

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    photo("astronaut", (120, 90)).save(a)
    photo("coffee", (90, 120)).save(b)
    cache = ItemCache(tmp_path / "artifacts", "thumbnails", ".png")
    md = grid_markdown([str(a), str(b), str(a)], thumb_cache=cache)
    assert md.startswith("![preview](data:image/png;base64,")
    assert cache.counts() == {"items_computed": 2, "items_cached": 0}
    assert grid_markdown([str(b), str(a)], thumb_cache=cache) != md  # another order, another sheet
    assert cache.counts() == {"items_computed": 2, "items_cached": 2}
