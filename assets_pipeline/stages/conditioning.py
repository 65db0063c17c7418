"""ControlNet conditioning images: one per photo of the quality subset, from a controlnet_aux annotator.

Canny runs offline (no weights). The image is first given the training crop of its aspect-ratio bucket (the
same bucket and offsets as its latent, stages/latents.py), so each conditioning image is pixel-aligned with
the latent it will be paired with. Cached by (image sha256, annotator, its parameters, bucket size, crop); a
square bucket keeps the key the square training crop always had.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field

import pandas as pd

from assets_pipeline.concept import config_section
from assets_pipeline.hashing import digest
from assets_pipeline.parallel import thread_map
from assets_pipeline.stages.buckets import assign_bucket, bucket_crop
from assets_pipeline.stages.latents import image_size
from assets_pipeline.store import ItemCache

CONDITIONING_VERSION = 2
ANNOTATORS = ("canny",)


@config_section("control")
@dataclass(frozen=True)
class ControlConfig:
    annotator: str = field(default="canny", metadata={"help": f"One of {ANNOTATORS}."})
    low_threshold: int = field(default=100, metadata={"help": "Canny hysteresis low (diffusers' example: 100)."})
    high_threshold: int = field(default=200, metadata={"help": "Canny hysteresis high (diffusers' example: 200)."})

    def __post_init__(self) -> None:
        if self.annotator not in ANNOTATORS:
            raise ValueError(f"annotator {self.annotator!r} is not available offline; choose from {ANNOTATORS}")
        if not 0 <= self.low_threshold < self.high_threshold:
            raise ValueError("Canny thresholds need 0 <= low_threshold < high_threshold")


def make_annotator(cfg: ControlConfig):
    import warnings

    from PIL import Image

    with warnings.catch_warnings():  # controlnet_aux's import re-registers timm models, warning about each
        warnings.simplefilter("ignore")
        from controlnet_aux import CannyDetector

    detector = CannyDetector()

    def annotate(img):
        # controlnet_aux resizes the shorter side to 512 unless told the resolution: pass ours (the crop's
        # shorter side) for both detection and output.
        side = min(img.size)
        out = detector(img, low_threshold=cfg.low_threshold, high_threshold=cfg.high_threshold,
                       detect_resolution=side, image_resolution=side, output_type="pil")
        # It also rounds both sides to a multiple of 64 (controlnet_aux.util.resize_image), so e.g. 96 px comes
        # back as 128 px; it is the whole crop, rescaled, so scaling back keeps it aligned with the latents.
        if out.size != img.size:
            out = out.resize(img.size, Image.Resampling.BILINEAR)
        return out

    return annotate


def control_key(sha: str, cfg: ControlConfig, bucket: tuple[int, int], center_crop: bool) -> str:
    w, h = bucket
    if w == h:  # the square training crop, keyed as before buckets (as latents.latent_key)
        return digest("control-image", sha, CONDITIONING_VERSION, asdict(cfg), w, center_crop)
    return digest("control-image", sha, CONDITIONING_VERSION, asdict(cfg), "bucket-crop", w, h, center_crop)


def make_control_images(
    subset: pd.DataFrame, cfg: ControlConfig, buckets: list[tuple[int, int]], center_crop: bool, cache: ItemCache
) -> pd.DataFrame:
    """A conditioning image per photo of ``subset``, at the crop of its bucket among ``buckets``
    (latents.concept_buckets: the photo's latent has the same bucket and crop)."""
    from PIL import Image

    made, lock = [], threading.Lock()

    def annotator():  # made on the first miss (the import takes seconds), once whichever thread gets there first
        with lock:
            if not made:
                made.append(make_annotator(cfg))
        return made[0]

    sizes = [assign_bucket(*image_size(src), buckets) for src in subset["decoded_path"]]
    keys = [control_key(sha, cfg, bucket, center_crop) for sha, bucket in zip(subset["image_sha256"], sizes)]

    def control(item: tuple[str, str, tuple[int, int]]) -> str:  # on a thread pool (assets_pipeline/parallel.py)
        key, src, bucket = item

        def create(tmp):
            img, _ = bucket_crop(Image.open(src), bucket, center_crop)
            annotator()(img).convert("RGB").save(tmp, format="PNG")

        return str(cache.get_or_create(key, create))

    paths = thread_map(control, zip(keys, subset["decoded_path"], sizes))
    out = subset[["image_sha256", "source_path", "decoded_path", "caption"]].copy()
    out["control_path"] = paths
    out["annotator"] = cfg.annotator
    out["bucket_width"] = [w for w, _ in sizes]
    out["bucket_height"] = [h for _, h in sizes]
    return out
