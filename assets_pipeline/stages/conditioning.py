"""ControlNet conditioning images: one per photo of the quality subset, the user's own (``control/``, paired by
name at ingest: stages/ingest.py) or from a controlnet_aux annotator.

Canny runs offline (no weights). The photo is first given the training crop of its aspect-ratio bucket (the
same bucket and offsets as its latent, stages/latents.py), so each conditioning image is pixel-aligned with
the latent it will be paired with; a user's conditioning image is first resized to its photo's size (their aspect
ratios agree: ingest rejects a pair that does not), then given the same crop. Cached by (image sha256, annotator
and its parameters or the pair's sha256, bucket size, crop); a square bucket keeps the key the square training
crop always had.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from assets_pipeline.concept import config_section
from assets_pipeline.hashing import digest, sha256_file
from assets_pipeline.parallel import thread_map
from assets_pipeline.stages.ingest import CONTROL_DIR
from assets_pipeline.stages.buckets import assign_bucket, bucket_crop
from assets_pipeline.stages.latents import image_size
from assets_pipeline.store import ItemCache

CONDITIONING_VERSION = 2
# Each annotator and the [control] keys its image depends on (its cache key: a changed parameter rebuilds it).
ANNOTATOR_KEYS = {
    "canny": ("low_threshold", "high_threshold"),  # controlnet_aux CannyDetector (OpenCV), offline
    "lineart": ("gaussian_sigma", "intensity_threshold"),  # controlnet_aux LineartStandardDetector, offline
    "depth": ("depth_model",),  # transformers' depth-estimation (DPT, Depth Anything) from a local folder
    "hed": ("hed_model", "safe"),  # controlnet_aux HEDdetector (soft edges), its ControlNetHED.pth in a local folder
    "scribble": ("hed_model", "safe"),  # the same network, scribble post-processing (thick binary strokes)
    "pose": ("pose_model",),  # controlnet_aux OpenPose (body), its body_pose_model.pth in a local folder
}
HED_FILE = "ControlNetHED.pth"  # what controlnet_aux's HEDdetector.from_pretrained reads from a folder
POSE_FILE = "body_pose_model.pth"  # what controlnet_aux's OpenPose body estimator reads
WEIGHTED = {"depth": "depth_model", "hed": "hed_model", "scribble": "hed_model",
            "pose": "pose_model"}  # annotators with a model folder, and the key naming it
WEIGHT_FILES = {"hed": HED_FILE, "scribble": HED_FILE, "pose": POSE_FILE}
ANNOTATORS = tuple(ANNOTATOR_KEYS)
SOURCES = ("auto", "folder", "annotator")
DEPTH_FILES = ("config.json", "preprocessor_config.json")  # and the weights: model.safetensors or pytorch_model.bin


@config_section("control")
@dataclass(frozen=True)
class ControlConfig:
    source: str = field(default="auto", metadata={"help": (
        f"Where the conditioning images come from: 'folder': the concept's own, in <concept>/{CONTROL_DIR}/, each "
        f"named as its photo ({CONTROL_DIR}/<photo path without extension>.<any image extension>); 'annotator': made "
        f"from each photo by `annotator`; 'auto' (default): 'folder' when the concept has a {CONTROL_DIR}/ folder, "
        "else 'annotator'.")})
    require_all_pairs: bool = field(default=True, metadata={"help": (
        "With the folder: ControlNet trains only when every photo of the quality subset has a valid conditioning "
        "image (the blocking check control_pairs_valid names each that has none, and why); false: it trains on "
        "the photos that have one.")})
    max_aspect_difference: float = field(default=0.02, metadata={"help": (
        "With the folder: a conditioning image whose width/height differs from its photo's by more than this "
        "fraction is rejected at ingest (it could not be aligned with the photo's crop).")})
    annotator: str = field(default="canny", metadata={"help": (
        f"One of {ANNOTATORS}: 'canny' edges and 'lineart' (controlnet_aux's LineartStandard) run offline; 'hed' "
        "and 'scribble' (controlnet_aux's HED) read `hed_model`, 'pose' (OpenPose body) `pose_model`, and 'depth' (a "
        "transformers depth-estimation model) `depth_model`: local folders.")})
    low_threshold: int = field(default=100, metadata={"help": "Canny hysteresis low (diffusers' example: 100)."})
    high_threshold: int = field(default=200, metadata={"help": "Canny hysteresis high (diffusers' example: 200)."})
    gaussian_sigma: float = field(default=6.0, metadata={"help": (
        "Line art: the blur whose difference from the photo draws the lines (controlnet_aux's default 6.0).")})
    intensity_threshold: int = field(default=8, metadata={"help": (
        "Line art: differences at or below this are not lines (controlnet_aux's default 8).")})
    hed_model: str = field(default="", metadata={"help": (
        f"HED and scribble: a local folder holding {HED_FILE} (lllyasviel/Annotators' file, copied from a machine "
        "with internet).")})
    safe: bool = field(default=False, metadata={"help": "HED and scribble: controlnet_aux's `safe` step (quantized "
                                                        "edges, fewer faint lines)."})
    pose_model: str = field(default="", metadata={"help": (
        f"Pose: a local folder holding {POSE_FILE} (lllyasviel/Annotators' OpenPose body model, copied from a "
        "machine with internet); the skeletons of the people found are drawn, hands and faces are not.")})
    depth_model: str = field(default="", metadata={"help": (
        "Depth: a local transformers depth-estimation model folder, saved with save_pretrained "
        f"({', '.join(DEPTH_FILES)} and model.safetensors), e.g. a copy of Intel/dpt-hybrid-midas or "
        "depth-anything/Depth-Anything-V2-Small-hf made on a machine with internet.")})

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source {self.source!r}: expected one of {list(SOURCES)}")
        if self.annotator not in ANNOTATORS:
            raise ValueError(f"annotator {self.annotator!r} is not available offline; choose from {ANNOTATORS}")
        if not 0 <= self.low_threshold < self.high_threshold:
            raise ValueError("Canny thresholds need 0 <= low_threshold < high_threshold")
        if not 0 <= self.max_aspect_difference < 1:
            raise ValueError(f"max_aspect_difference must be in [0, 1), got {self.max_aspect_difference}")
        if self.gaussian_sigma <= 0 or self.intensity_threshold < 0:
            raise ValueError("line art needs gaussian_sigma > 0 and intensity_threshold >= 0")
        if self.annotator == "depth" and not self.depth_model:
            raise ValueError("annotator 'depth' needs depth_model: a local depth-estimation model folder "
                             f"({', '.join(DEPTH_FILES)}, model.safetensors)")
        if self.annotator in WEIGHT_FILES and not getattr(self, WEIGHTED[self.annotator]):
            raise ValueError(f"annotator {self.annotator!r} needs {WEIGHTED[self.annotator]}: a local folder "
                             f"holding {WEIGHT_FILES[self.annotator]}")

    def model_folder(self) -> Path | None:
        """The local folder of the annotator's model (depth, HED, scribble), or None (Canny, line art)."""
        return Path(getattr(self, WEIGHTED[self.annotator])) if self.annotator in WEIGHTED else None

    def from_folder(self, concept_dir: Path) -> bool:
        """Whether the conditioning images are the concept's own (``control/``) rather than an annotator's."""
        return self.source == "folder" or (self.source == "auto" and (concept_dir / CONTROL_DIR).is_dir())

    def annotator_params(self) -> dict:
        """What an annotator's image depends on: the key's part (the other settings are about the folder, or
        another annotator's). Canny's is the dict its key always had."""
        return {"annotator": self.annotator, **{k: getattr(self, k) for k in ANNOTATOR_KEYS[self.annotator]}}


def missing_model_files(cfg: "ControlConfig") -> list[str]:
    """The files the annotator's model folder lacks (empty: it loads, or the annotator needs none)."""
    folder = cfg.model_folder()
    if folder is None:
        return []
    if cfg.annotator != "depth":
        return [] if (folder / WEIGHT_FILES[cfg.annotator]).is_file() else [WEIGHT_FILES[cfg.annotator]]
    missing = [f for f in DEPTH_FILES if not (folder / f).is_file()]
    if not any((folder / w).is_file() for w in ("model.safetensors", "pytorch_model.bin")):
        missing.append("model.safetensors")
    return missing


def check_model_folder(cfg: "ControlConfig") -> None:
    """FileNotFoundError naming the key, the folder and each file it lacks, and what to put there."""
    if missing := missing_model_files(cfg):
        key = WEIGHTED[cfg.annotator]
        what = (f"the {WEIGHT_FILES[cfg.annotator]} of lllyasviel/Annotators" if cfg.annotator != "depth" else
                "a depth-estimation model saved with save_pretrained (e.g. Intel/dpt-hybrid-midas or "
                "depth-anything/Depth-Anything-V2-Small-hf)")
        raise FileNotFoundError(f"[control] {key} = {str(cfg.model_folder())!r}: missing {missing}; put {what} "
                                "there, copied from a machine with internet")


def make_annotator(cfg: ControlConfig, device: str = "cpu"):
    """The annotator: a function from a photo's training crop to its conditioning image, of the same size."""
    import warnings

    from PIL import Image

    check_model_folder(cfg)
    if cfg.annotator == "depth":
        return _depth_annotator(Path(cfg.depth_model), device)
    with warnings.catch_warnings():  # controlnet_aux's import re-registers timm models, warning about each
        warnings.simplefilter("ignore")
        from controlnet_aux import CannyDetector, HEDdetector
        from controlnet_aux.lineart_standard import LineartStandardDetector

    if cfg.annotator == "pose":
        from controlnet_aux.open_pose import Body, OpenposeDetector

        body = Body(str(Path(cfg.pose_model) / POSE_FILE))
        body.to(device)
        pose = OpenposeDetector(body)  # the body estimator alone: no hand or face model is loaded
        lock = threading.Lock()

        def detect(img, side):
            with lock:
                return pose(img, detect_resolution=side, image_resolution=side, include_body=True,
                            include_hand=False, include_face=False, output_type="pil")
    elif cfg.annotator in ("hed", "scribble"):
        hed = HEDdetector.from_pretrained(cfg.hed_model).to(device)
        lock = threading.Lock()  # one forward at a time: the images' threads share the network

        def detect(img, side):
            with lock:
                return hed(img, detect_resolution=side, image_resolution=side, safe=cfg.safe,
                           scribble=cfg.annotator == "scribble", output_type="pil")
    elif cfg.annotator == "canny":
        detector = CannyDetector()

        def detect(img, side):
            return detector(img, low_threshold=cfg.low_threshold, high_threshold=cfg.high_threshold,
                            detect_resolution=side, image_resolution=side, output_type="pil")
    else:  # lineart
        lineart = LineartStandardDetector()

        def detect(img, side):
            return lineart(img, guassian_sigma=cfg.gaussian_sigma, intensity_threshold=cfg.intensity_threshold,
                           detect_resolution=side, output_type="pil")

    def annotate(img):
        # controlnet_aux resizes the shorter side to 512 unless told the resolution: pass ours (the crop's
        # shorter side) for both detection and output.
        out = detect(img, min(img.size))
        # It also rounds both sides to a multiple of 64 (controlnet_aux.util.resize_image), so e.g. 96 px comes
        # back as 128 px; it is the whole crop, rescaled, so scaling back keeps it aligned with the latents.
        if out.size != img.size:
            out = out.resize(img.size, Image.Resampling.BILINEAR)
        return out

    return annotate


def _depth_annotator(folder: Path, device: str):
    """transformers' depth-estimation pipeline on the local model ``folder``: its predicted depth, scaled to 0-255
    per image (near = bright, as the ControlNet depth models were trained), at the crop's size."""
    from PIL import Image
    from transformers import pipeline

    estimator = pipeline("depth-estimation", model=str(folder), device=device)
    lock = threading.Lock()  # one forward at a time: the images' threads share the model

    def annotate(img):
        with lock:
            depth = estimator(img)["predicted_depth"]
        d = depth.detach().float().squeeze().cpu().numpy()
        lo, hi = float(d.min()), float(d.max())
        scaled = ((d - lo) / (hi - lo) * 255.0 if hi > lo else d * 0.0).round().astype("uint8")
        out = Image.fromarray(scaled).convert("RGB")
        return out if out.size == img.size else out.resize(img.size, Image.Resampling.BILINEAR)

    return annotate


def control_key(sha: str, cfg: ControlConfig, bucket: tuple[int, int], center_crop: bool,
                weights: str | None = None) -> str:
    """``weights``: the fingerprint of an annotator's model (depth), part of the key."""
    w, h = bucket
    params = {**cfg.annotator_params(), **({"weights": weights} if weights else {})}
    if w == h:  # the square training crop, keyed as before buckets (as latents.latent_key)
        return digest("control-image", sha, CONDITIONING_VERSION, params, w, center_crop)
    return digest("control-image", sha, CONDITIONING_VERSION, params, "bucket-crop", w, h, center_crop)


def pair_key(sha: str, pair_sha: str, size: tuple[int, int], bucket: tuple[int, int], center_crop: bool) -> str:
    """A user's conditioning image (``pair_sha``) given its photo's (``sha``, ``size``) crop for ``bucket``."""
    return digest("control-pair", sha, pair_sha, CONDITIONING_VERSION, list(size), list(bucket), center_crop)


def make_control_images(
    subset: pd.DataFrame, cfg: ControlConfig, buckets: list[tuple[int, int]], center_crop: bool, cache: ItemCache,
    weights: str | None = None, device: str = "cpu",
) -> pd.DataFrame:
    """A conditioning image per photo of ``subset``, at the crop of its bucket among ``buckets``
    (latents.concept_buckets: the photo's latent has the same bucket and crop). ``weights``: the annotator model's
    fingerprint (depth), in each key and in the lineage source; ``device``: where that model runs."""
    from PIL import Image

    made, lock = [], threading.Lock()

    def annotator():  # made on the first miss (the import takes seconds), once whichever thread gets there first
        with lock:
            if not made:
                made.append(make_annotator(cfg, device))
        return made[0]

    sizes = [assign_bucket(*image_size(src), buckets) for src in subset["decoded_path"]]
    keys = [control_key(sha, cfg, bucket, center_crop, weights) for sha, bucket in zip(subset["image_sha256"], sizes)]

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
    out["control_source_path"] = None
    # lineage: the image the annotator made (its bytes: the cache verifies them on every read) and how
    out["control_sha256"] = thread_map(sha256_file, paths)
    out["control_source"] = "annotator " + " ".join(
        f"{k}={v}" for k, v in {**cfg.annotator_params(), **({"weights": weights} if weights else {})}.items())
    out["bucket_width"] = [w for w, _ in sizes]
    out["bucket_height"] = [h for _, h in sizes]
    return out


def pair_control_images(subset: pd.DataFrame, pairs: pd.DataFrame, buckets: list[tuple[int, int]], center_crop: bool,
                        cache: ItemCache) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(control, missing): each photo of ``subset`` that has a valid pair (raw_images' ``pairs`` table) with its
    conditioning image, resized to the photo's size and given the crop of the photo's bucket among ``buckets``
    (so pixel-aligned with its latent); and each photo that has none (``source_path``, ``reason``)."""
    from PIL import Image

    by_sha = {r.image_sha256: r for r in pairs.itertuples()}
    have = subset[subset["image_sha256"].isin(by_sha)]
    missing = subset[~subset["image_sha256"].isin(by_sha)]
    sizes = [image_size(src) for src in have["decoded_path"]]
    buckets_of = [assign_bucket(*size, buckets) for size in sizes]
    pair_of = [by_sha[sha] for sha in have["image_sha256"]]
    keys = [pair_key(sha, p.control_sha256, size, bucket, center_crop)
            for sha, p, size, bucket in zip(have["image_sha256"], pair_of, sizes, buckets_of)]

    def control(item) -> str:  # on a thread pool (assets_pipeline/parallel.py)
        key, pair, size, bucket = item

        def create(tmp):
            with Image.open(pair.control_decoded_path) as img:
                img = img.convert("RGB")
                if img.size != size:  # the same aspect ratio within the tolerance: the photo's pixels
                    img = img.resize(size, Image.Resampling.LANCZOS)
                crop, _ = bucket_crop(img, bucket, center_crop)
                crop.save(tmp, format="PNG")

        return str(cache.get_or_create(key, create))

    paths = thread_map(control, zip(keys, pair_of, sizes, buckets_of))
    out = have[["image_sha256", "source_path", "decoded_path", "caption"]].copy()
    out["control_path"] = paths
    out["annotator"] = "folder"
    out["control_source_path"] = [p.control_source_path for p in pair_of]
    out["control_sha256"] = [p.control_sha256 for p in pair_of]  # lineage: the user's file
    out["control_source"] = out["control_source_path"]
    out["bucket_width"] = [w for w, _ in buckets_of]
    out["bucket_height"] = [h for _, h in buckets_of]
    lacking = pd.DataFrame({"source_path": missing["source_path"], "reason": [
        f"no valid conditioning image {CONTROL_DIR}/{Path(p).with_suffix('').as_posix()}.<image extension> (missing, "
        "or rejected at ingest: see raw_images' rejects)" for p in missing["source_path"]]})
    return out, lacking.reset_index(drop=True)
