"""Per-image host work (decoding, resizing, hashing pixels) on a thread pool.

The dataset stages do the same pure work for every photo: decode, EXIF-transpose, resize, crop, compute
metrics. Pillow releases the GIL while it decodes, encodes and resamples, and numpy and torch do in their
kernels, so threads spread that work over the machine's cores within one Dagster step (no process start,
no pickling of images). Results come back in the input's order, so what is written never depends on the
number of threads. Callers give each thread its own cache keys: an ItemCache entry is written atomically, but
one key written by two threads at once could be read by one while the other replaces it.

``ASSETS_PIPELINE_IMAGE_THREADS`` sets the number of threads (default: the cores this process may use, at
most 8; 1 = one at a time, in the calling thread).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

ENV = "ASSETS_PIPELINE_IMAGE_THREADS"
MAX_DEFAULT = 8  # past this, decoding a concept's photos is bound by the disk and the GPU, not by cores


def image_threads() -> int:
    """Threads for per-image work: ``ASSETS_PIPELINE_IMAGE_THREADS``, else the usable cores (at most 8)."""
    raw = os.environ.get(ENV)
    if raw is not None and raw.strip():
        try:
            n = int(raw)
        except ValueError:
            raise ValueError(f"{ENV}={raw!r}: expected a whole number of threads >= 1") from None
        if n < 1:
            raise ValueError(f"{ENV}={raw!r}: expected a whole number of threads >= 1")
        return n
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_DEFAULT, cores))


def thread_map(fn: Callable[[T], R], items: Iterable[T], threads: int | None = None) -> list[R]:
    """``[fn(x) for x in items]``, computed on ``threads`` threads (default :func:`image_threads`). The first
    exception raised by ``fn`` (in the items' order) is raised here, after the calls already started finish."""
    items = list(items)
    threads = min(threads or image_threads(), len(items))
    if threads <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(threads, thread_name_prefix="images") as pool:
        return list(pool.map(fn, items))


def prefetched(batches: list[list[T]], load: Callable[[T], R], threads: int | None = None) -> Iterator[list[R]]:
    """For each batch in order, ``[load(x) for x in batch]``: the items of a batch load in parallel, and the
    next batch loads while the caller works on this one (a GPU forward, which releases the GIL). An exception
    in ``load`` is raised when its batch is reached; the batches not yet started are cancelled."""
    threads = threads or image_threads()
    if threads <= 1:
        for batch in batches:
            yield [load(x) for x in batch]
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="images")
    try:
        pending = [pool.submit(load, x) for x in batches[0]] if batches else []
        for i in range(len(batches)):
            current = pending
            if i + 1 < len(batches):
                pending = [pool.submit(load, x) for x in batches[i + 1]]
            yield [f.result() for f in current]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
