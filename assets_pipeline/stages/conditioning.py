"""ControlNet conditioning images: one per photo of the quality subset, from a controlnet_aux annotator.

Canny runs offline (no weights). The image is first given the training crop, so each conditioning image is
pixel-aligned with the latents it will be paired with. Cached by (image sha256, annotator, its parameters,
resolution, crop).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

import pandas as pd

from assets_pipeline.hashing import digest
from assets_pipeline.imaging import training_crop
from assets_pipeline.store import ItemCache

CONDITIONING_VERSION = 2
ANNOTATORS = ("canny",)


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

    def annotate(img, resolution: int):
        # controlnet_aux resizes to 512 unless told the resolution: pass ours for both detection and output.
        out = detector(img, low_threshold=cfg.low_threshold, high_threshold=cfg.high_threshold,
                       detect_resolution=resolution, image_resolution=resolution, output_type="pil")
        # It also rounds both sides to a multiple of 64 (controlnet_aux.util.resize_image), so e.g. 96 px comes
        # back as 128 px; the crop is the same square, so scaling back keeps it aligned with the latents.
        if out.size != (resolution, resolution):
            out = out.resize((resolution, resolution), Image.Resampling.BILINEAR)
        return out

    return annotate


def make_control_images(
    subset: pd.DataFrame, cfg: ControlConfig, resolution: int, center_crop: bool, cache: ItemCache
) -> pd.DataFrame:
    from PIL import Image

    annotator = functools.cache(lambda: make_annotator(cfg))  # made on the first miss: the import takes seconds

    paths = []
    for sha, src in zip(subset["image_sha256"], subset["decoded_path"]):
        key = digest("control-image", sha, CONDITIONING_VERSION, asdict(cfg), resolution, center_crop)

        def create(tmp, src=src):
            img = training_crop(Image.open(src), resolution, center_crop)
            annotator()(img, resolution).convert("RGB").save(tmp, format="PNG")

        paths.append(str(cache.get_or_create(key, create)))
    out = subset[["image_sha256", "source_path", "decoded_path", "caption"]].copy()
    out["control_path"] = paths
    out["annotator"] = cfg.annotator
    return out
