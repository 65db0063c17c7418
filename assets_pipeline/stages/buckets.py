"""Aspect-ratio buckets: train each photo at the shape nearest its own instead of a square crop of it.

A bucket is a training size (width, height) in pixels. The set (:func:`bucket_set`) follows kohya-ss's
``make_bucket_resolutions`` (sd-scripts, library/model_util.py) and NovelAI's aspect-ratio bucketing: sides in
multiples of ``step`` (64 px for SD, so every latent side is a multiple of 8 and survives the U-Net's three
downsamplings, kohya's ``bucket_reso_steps``), area at most the training resolution's pixel budget
(``resolution ** 2``), aspect ratios up to the quality filter's limit, and the square at the resolution always
in. Each photo goes to the bucket nearest its aspect ratio (:func:`assign_bucket`, kohya's
``BucketManager.select_bucket``), is resized to cover it and cropped (:func:`bucket_crop`); the crop's top-left
corner is SDXL's ``crop_coords_top_left`` micro-conditioning (Podell et al. 2023, diffusers'
train_text_to_image_sdxl.py), recorded in the latents index.
"""

from __future__ import annotations

import math
from fractions import Fraction

# Buckets smaller than this share of the pixel budget are left out: a photo is better cropped a little more
# than trained at a fraction of the resolution (kohya's min_bucket_reso of 256 at 512 px is the same idea).
MIN_AREA_SHARE = 0.5


def bucket_step(resolution: int) -> int:
    """The side multiple of the buckets at ``resolution``.

    64 px from 256 px up (kohya's default ``bucket_reso_steps``; SD's latent grid: 8 latent px). Below that only
    the embedded test model trains (64 px), where 64 px steps would leave the square alone; there the step is
    ``resolution / 8`` rounded down to a multiple of 8 (the SD VAE's factor), 8 px at 64 px, which gives the
    same set of shapes as 64 px steps give at 512 px."""
    if resolution >= 256:
        return 64
    return max(8, resolution // 8 // 8 * 8)


def bucket_set(resolution: int, max_aspect: float, step: int | None = None) -> list[tuple[int, int]]:
    """Bucket sizes (width, height) for ``resolution``, sorted by aspect ratio (tallest first).

    For each short side ``s`` (a multiple of ``step`` up to ``resolution``) the long side is the largest
    multiple of ``step`` within both the pixel budget and ``max_aspect``; one bucket per aspect ratio is kept
    (the largest), buckets under :data:`MIN_AREA_SHARE` of the budget are dropped, and each bucket comes in both
    orientations. The square ``(resolution, resolution)`` is always in, so a square photo (and every class image)
    trains exactly as without buckets."""
    step = step or bucket_step(resolution)
    if resolution < step or resolution % 8:
        raise ValueError(f"resolution {resolution} must be a multiple of 8 and at least the bucket step {step}")
    if max_aspect < 1:
        raise ValueError(f"max_aspect is longer side / shorter side, so at least 1; got {max_aspect}")
    budget = resolution * resolution
    best: dict[Fraction, tuple[int, int]] = {Fraction(1): (resolution, resolution)}
    for short in range(step, resolution + 1, step):
        long = min(budget // short // step * step, math.floor(short * max_aspect / step) * step)
        if long < short or short * long < MIN_AREA_SHARE * budget:
            continue
        aspect = Fraction(long, short)
        if aspect not in best or short * long > best[aspect][0] * best[aspect][1]:
            best[aspect] = (short, long)
    sizes = {(s, l) for s, l in best.values()} | {(l, s) for s, l in best.values()}
    return sorted(sizes, key=lambda wh: (wh[0] / wh[1], wh))


def aspect_error(width: int, height: int, bucket: tuple[int, int]) -> float:
    """How far a photo's aspect ratio is from a bucket's, in log space (so 2:1 and 1:2 are equally far from
    1:1): ``exp(error)`` is the factor by which the crop shortens the photo's longer side, at most."""
    return abs(math.log(width / height) - math.log(bucket[0] / bucket[1]))


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket nearest the photo's aspect ratio (log space); ties go to the larger bucket, then the first."""
    if width < 1 or height < 1:
        raise ValueError(f"a photo needs a positive size, got {width}x{height}")
    if not buckets:
        raise ValueError("no buckets to assign to")
    return min(buckets, key=lambda b: (round(aspect_error(width, height, b), 12), -b[0] * b[1], b))


def crop_geometry(size: tuple[int, int], bucket: tuple[int, int], center_crop: bool) -> tuple[int, int, int, int]:
    """(resized width, resized height, crop top, crop left) for a photo of ``size`` in ``bucket``: scaled so
    the bucket is covered (the shorter relative side fits exactly), then cropped at the center or the top-left
    corner. The offsets are in the resized photo's pixels (SDXL's ``crop_coords_top_left``)."""
    (w, h), (bw, bh) = size, bucket
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    top, left = ((rh - bh) // 2, (rw - bw) // 2) if center_crop else (0, 0)
    return rw, rh, top, left


def bucket_crop(img, bucket: tuple[int, int], center_crop: bool = True):
    """``img`` resized to cover ``bucket`` and cropped to it: (RGB image of the bucket's size, (top, left)).

    For the square bucket at the resolution this is the square training crop of ``buckets = false``, the one
    diffusers' scripts make (``transforms.Resize`` + ``CenterCrop``; top-left instead of ``RandomCrop`` when not
    centered, so the crop is a pure function of the photo)."""
    from PIL import Image

    img = img.convert("RGB")
    rw, rh, top, left = crop_geometry(img.size, bucket, center_crop)
    img = img.resize((rw, rh), Image.Resampling.BICUBIC)
    return img.crop((left, top, left + bucket[0], top + bucket[1])), (top, left)


def bucket_label(bucket: tuple[int, int]) -> str:
    """"640x384": how a bucket is named in tables, metadata and the latents bundle."""
    return f"{bucket[0]}x{bucket[1]}"


def parse_bucket_label(label: str) -> tuple[int, int]:
    w, sep, h = label.partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise ValueError(f"not a bucket label (WIDTHxHEIGHT): {label!r}")
    return int(w), int(h)
