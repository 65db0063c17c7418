"""Precomputed VAE latents and text embeddings: what every trainer reads instead of pixels and prompts.

Per item, content-addressed:
- latent: (image sha256, VAE fingerprint, bucket size, crop, flip, dtype) -> the VAE's latent distribution
  (mean and std, unscaled), so a trainer can still sample ``mean + std * eps`` each step as diffusers'
  scripts do with ``latent_dist.sample()``. Each photo is encoded at its aspect-ratio bucket (stages/buckets.py)
  or, with ``buckets = false``, at the square training crop; a square bucket's key is the square crop's key, so
  the two settings share those items;
- text embedding: (caption, text-encoder + tokenizer fingerprint, dtype; with a T5 encoder its token count) ->
  ``prompt_embeds`` and, where the family has one, ``pooled_prompt_embeds``: the family's ``encode_prompt``
  (models/text.py), what its pipeline conditions on: SD 1.x/2.x's ``last_hidden_state`` [77, dim]; SDXL's two
  encoders' penultimate hidden states concatenated [77, dim1 + dim2] plus the pooled [dim]; SD 3.x's
  [77 + max_sequence_length, 4096] and Flux's T5 [max_sequence_length, 4096] with their pooled embeddings. Keyed by
  all encoders' and tokenizers' fingerprints; one entry per distinct caption (class images share one), and the
  bundle stores each distinct caption once too.

The items are stacked into one bundle per concept by ``stages/bundle.py``, what every trainer reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from assets_pipeline.concept import config_section
from assets_pipeline.hashing import digest
from assets_pipeline.models.families import ModelFamily
from assets_pipeline.models.resolve import BaseModelRef
from assets_pipeline.parallel import prefetched
from assets_pipeline.stages.buckets import (
    assign_bucket, bucket_crop, bucket_set, crop_geometry,
)
from assets_pipeline.store import CorruptFile, ItemCache, check_file, digest_path

LATENT_VERSION = 1
# The bucket (training size, px), where its crop starts in the resized photo (SDXL's crop_coords_top_left) and
# the photo's own size (SDXL's original_size): square values at the resolution when buckets are off.
BUCKET_COLUMNS = ["bucket_width", "bucket_height", "crop_top", "crop_left", "original_width", "original_height"]
INDEX_COLUMNS = ["image_sha256", "role", "caption", "latent_key", "text_key", "flip_latent_key", "empty_text_key",
                 *BUCKET_COLUMNS]
_DTYPES = ("float32", "float16", "bfloat16")


@config_section("latents")
@dataclass(frozen=True)
class LatentConfig:
    resolution: int | None = field(default=None, metadata={"help": "Training side in px; None = model's."})
    center_crop: bool = field(default=True, metadata={"help": "Center crop (else top-left), as --center_crop."})
    random_flip: bool = field(default=False, metadata={"help": "Also cache horizontally flipped latents."})
    dtype: str = field(default="float32", metadata={"help": f"Stored dtype, one of {_DTYPES}."})
    batch_size: int = field(default=8, metadata={"help": "Images per VAE / text-encoder forward pass."})
    max_sequence_length: int | None = field(default=None, metadata={"help": (
        "T5 tokens cached per caption (SD 3.x, Flux; CLIP reads 77 whatever this says): None = the family's, what "
        "its pipeline encodes by default (SD 3.x: 256, Flux: 512). Each token of Flux's is 4096 wide: 512 tokens "
        "are 4 MiB a caption in bfloat16, so short captions lose nothing at 256 and halve the cache.")})
    buckets: bool = field(default=True, metadata={"help": (
        "Aspect-ratio buckets (stages/buckets.py): each photo trains at the shape nearest its own, at the "
        "resolution's pixel budget; false = square crops. On by default (issue 8): a square crop cuts the head "
        "or feet off a portrait; NovelAI's and kohya-ss's aspect-ratio bucketing, SDXL's training.")})

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        n = self.max_sequence_length
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 512):
            raise ValueError(f"max_sequence_length must be an integer in 1..512 (T5's pipelines read at most 512 "
                             f"tokens) or unset, got {n!r}")
        r = self.resolution
        if r is not None and (not isinstance(r, int) or isinstance(r, bool) or not 64 <= r <= 4096 or r % 8):
            raise ValueError(f"resolution must be a multiple of 8 (the VAE's downsampling) in 64..{4096} px (SD 1.x "
                             f"trains at 512, SDXL / SD 3.x / Flux.1 at 1024; unset = the base model's), got {r!r}")


@dataclass
class Encoders:
    """The frozen models latents come from, with the fingerprints that enter every cache key.

    ``load()`` returns the base model's :class:`~assets_pipeline.models.load.Components` (VAE, text encoders and
    tokenizers, on the device); it runs on first use, so a run whose items are all cached loads no model.
    ``family``: the base model's, which says how a prompt becomes conditioning (one encoder's last hidden state,
    or SDXL's two encoders with a pooled embedding and size conditioning).
    """

    load: Any
    vae_fingerprint: str
    text_fingerprint: str
    family: ModelFamily
    scaling_factor_hint: float | None = None  # from the VAE's config.json, when it can be read without loading
    shift_factor_hint: float | None = None  # likewise (SD 3.x and Flux VAEs have one; None = none)
    device: str = "cpu"
    loaded: Any = field(default=None, repr=False)

    def _get(self):
        if self.loaded is None:
            self.loaded = self.load()
        return self.loaded

    @property
    def vae(self):
        return self._get().vae

    @property
    def text_encoders(self) -> tuple:
        return self._get().text_encoders

    @property
    def tokenizers(self) -> tuple:
        return self._get().tokenizers

    @property
    def scaling_factor(self) -> float:
        return self.scaling_factor_hint if self.scaling_factor_hint is not None else self.vae.config.scaling_factor

    @property
    def shift_factor(self) -> float | None:
        if self.scaling_factor_hint is not None:  # the config was read: its shift (or none) is the hint
            return self.shift_factor_hint
        return getattr(self.vae.config, "shift_factor", None)


def load_encoders(ref: BaseModelRef, artifact_root: Path, device: str = "cpu") -> Encoders:
    """The base model's frozen VAE, text encoders and tokenizers (loaded on first use, on ``device``), with the
    fingerprints of the components they come from."""
    from assets_pipeline.models.load import load_components, resolve_device
    from assets_pipeline.models.resolve import component_fingerprint

    family = ref.model_family

    def load():
        parts = load_components(ref, ("vae", "text_encoders", "tokenizers"))
        dev = resolve_device(device)
        parts.vae = parts.vae.to(dev).eval()
        parts.text_encoders = tuple(e.to(dev).eval() for e in parts.text_encoders)
        return parts

    scaling_factor = shift_factor = None
    if ref.kind != "single_file":  # read from the config alone, without loading weights
        vae_config = json.loads((Path(ref.location) / "vae" / "config.json").read_text())
        scaling_factor = vae_config.get("scaling_factor", 0.18215)  # diffusers' AutoencoderKL default
        shift_factor = vae_config.get("shift_factor")
    text_fp = digest(*(component_fingerprint(ref, name, artifact_root)
                       for e in family.text_encoders for name in (e.component, e.tokenizer)))
    return Encoders(load, vae_fingerprint=component_fingerprint(ref, "vae", artifact_root), text_fingerprint=text_fp,
                    family=family, scaling_factor_hint=scaling_factor, shift_factor_hint=shift_factor, device=device)


def bundle_header(enc: Encoders, ref: BaseModelRef, cfg: LatentConfig, resolution: int) -> dict[str, Any]:
    """What a concept's bundle records besides its rows (``write_latent_bundle``'s ``meta``): its resolution, the
    VAE's scaling (and, for the flow-matching families, shift) factor, the T5 tokens each caption was encoded at,
    and the fingerprints of the models it came from."""
    return {
        "resolution": resolution, "scaling_factor": enc.scaling_factor,
        **({"shift_factor": enc.shift_factor} if enc.shift_factor is not None else {}),
        **({"text_max_lengths": list(enc.family.text_max_lengths(cfg.max_sequence_length))}
           if enc.family.has_sequence_length else {}),
        "base_model_fingerprint": ref.fingerprint, "vae_fingerprint": enc.vae_fingerprint,
        "text_fingerprint": enc.text_fingerprint,
    }


def concept_buckets(cfg: LatentConfig, resolution: int, max_aspect: float | None = None) -> list[tuple[int, int]]:
    """The sizes a concept's photos train at: the bucket set for ``resolution`` up to the quality filter's aspect
    limit (``max_aspect``, None = QualityConfig's default), or the square alone when buckets are off. Every
    asset that crops for training (vae_latents, control_images) asks here, so their crops agree."""
    if not cfg.buckets:
        return [(resolution, resolution)]
    if max_aspect is None:
        from assets_pipeline.stages.curation import QualityConfig

        max_aspect = QualityConfig().max_aspect_ratio
    return bucket_set(resolution, max_aspect)


def latent_key(sha: str, enc: Encoders, bucket: int | tuple[int, int], cfg: LatentConfig, flip: bool) -> str:
    """``bucket``: (width, height), or the side of the square crop. A square bucket's crop is the square
    training crop of ``buckets = false`` (the same function), keyed as it always was: caches made with
    ``buckets = false`` stay valid, and a square photo's latent is shared by both settings."""
    w, h = (bucket, bucket) if isinstance(bucket, int) else bucket
    if w == h:
        return digest("vae-latent", LATENT_VERSION, sha, enc.vae_fingerprint, w, cfg.center_crop, flip, cfg.dtype)
    return digest("vae-latent", LATENT_VERSION, sha, enc.vae_fingerprint, "bucket-crop", w, h, cfg.center_crop,
                  flip, cfg.dtype)


def text_key(caption: str, enc: Encoders, cfg: LatentConfig) -> str:
    """A family with a T5 encoder keys its tokens too (another max_sequence_length is another embedding); the
    CLIP-only families' keys are what they always were."""
    lengths = [list(enc.family.text_max_lengths(cfg.max_sequence_length))] if enc.family.has_sequence_length else []
    return digest("text-embedding", LATENT_VERSION, caption, enc.text_fingerprint, cfg.dtype, *lengths)


def _load_pixels(path: str, flip: bool, bucket: tuple[int, int], center_crop: bool):
    """One photo as the VAE's input: the bucket's training crop (mirrored for the flipped latent), [-1, 1], CHW.
    Thread-safe (compute_latents runs it on a thread pool)."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    with Image.open(path) as photo:
        img, _ = bucket_crop(photo, bucket, center_crop)
    if flip:
        img = ImageOps.mirror(img)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def _encode_pixels(pixels: list, enc: Encoders):
    """(mean, std) of the VAE's latent distribution for a batch of :func:`_load_pixels` of one bucket."""
    import torch

    # load_encoders loads the VAE in float32, which SDXL's VAE needs (its config's force_upcast: it overflows in
    # float16; the SDXL pipeline and training scripts upcast it too).
    x = torch.stack(pixels).to(enc.vae.device, dtype=enc.vae.dtype)
    with torch.inference_mode():
        dist = enc.vae.encode(x).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()


def encode_text_entries(captions: list[str], enc: Encoders, max_sequence_length: int | None = None) -> list[dict]:
    """Each caption's text-cache entry: {"prompt_embeds"} and, for a family with a pooled embedding (SDXL, SD 3.x,
    Flux), "pooled_prompt_embeds" (``ModelFamily.encode_prompt``: what the family's pipeline conditions on); a T5
    encoder reads ``max_sequence_length`` tokens (None = the family's)."""
    import torch

    from assets_pipeline.models.text import tokenize

    lengths = enc.family.text_max_lengths(max_sequence_length)
    ids = [t.to(e.device) for t, e in zip(tokenize(enc.tokenizers, captions, lengths), enc.text_encoders)]
    with torch.inference_mode():
        embeds, pooled = enc.family.encode_prompt(enc.text_encoders, ids)
    if pooled is None:
        return [{"prompt_embeds": e} for e in embeds.float().cpu()]
    return [{"prompt_embeds": e, "pooled_prompt_embeds": p} for e, p in zip(embeds.float().cpu(), pooled.float().cpu())]


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the image's header (no decoding). A file the project made that can no longer be read
    names its fix, as a damaged file found while encoding does."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError) as e:
        if digest_path(Path(path)).exists() and (why := check_file(Path(path))) is not None:
            raise CorruptFile(Path(path), f"{why}; rematerialize the asset that made it (class_images for a "
                              "class image, raw_images for a photo)") from e
        raise


def compute_latents(
    items: pd.DataFrame, enc: Encoders, resolution: int, cfg: LatentConfig,
    latent_cache: ItemCache, text_cache: ItemCache, max_aspect: float | None = None,
) -> pd.DataFrame:
    """Fill both caches for ``items`` (columns image_sha256, decoded_path, caption, role); return the index.

    Each image goes to its bucket (:func:`concept_buckets`; ``max_aspect`` is the quality filter's limit).
    torch is imported only when something is missing: a fully cached run needs no model library at all."""
    buckets = concept_buckets(cfg, resolution, max_aspect)
    jobs = []  # (key, path, flip, bucket)
    index = []
    # The empty caption's embedding, for training with caption_dropout (TrainConfig): the same key in every row,
    # so a bundle without it (an older index) differs from the new index and is restacked, not reused.
    empty_key = text_key("", enc, cfg)
    for r in items.itertuples():
        size = image_size(r.decoded_path)
        bucket = assign_bucket(*size, buckets)
        _, _, top, left = crop_geometry(size, bucket, cfg.center_crop)
        lk = latent_key(r.image_sha256, enc, bucket, cfg, False)
        fk = latent_key(r.image_sha256, enc, bucket, cfg, True) if cfg.random_flip else None
        tk = text_key(r.caption, enc, cfg)
        jobs.append((lk, r.decoded_path, False, bucket))
        if fk:
            jobs.append((fk, r.decoded_path, True, bucket))
        index.append({"image_sha256": r.image_sha256, "role": r.role, "caption": r.caption,
                      "latent_key": lk, "text_key": tk, "flip_latent_key": fk, "empty_text_key": empty_key,
                      "bucket_width": bucket[0], "bucket_height": bucket[1], "crop_top": top, "crop_left": left,
                      "original_width": size[0], "original_height": size[1]})

    table = pd.DataFrame(index, columns=INDEX_COLUMNS)
    missing = set(latent_cache.split([k for k, *_ in jobs]))
    captions = {**{row["text_key"]: row["caption"] for row in index}, **({empty_key: ""} if index else {})}
    missing_text = text_cache.split(list(captions))
    if not missing and not missing_text:
        return table
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, cfg.dtype)
    todo = list({k: (k, p, f, b) for k, p, f, b in jobs if k in missing}.values())  # one encode per key
    for path in dict.fromkeys(Path(p) for _, p, _, _ in todo):
        # Images from the project's caches carry a digest: the asset restores damaged photos before this, and
        # anything still damaged names its fix instead of being encoded.
        if digest_path(path).exists() and (why := check_file(path)) is not None:
            raise CorruptFile(path, f"{why}; rematerialize the asset that made it (class_images for a "
                              "class image, raw_images for a photo)")
    by_bucket: dict[tuple[int, int], list] = {}  # a VAE forward takes one shape
    for job in todo:
        by_bucket.setdefault(job[3], []).append(job)
    batches = [bucket_jobs[s : s + cfg.batch_size] for _, bucket_jobs in sorted(by_bucket.items())
               for s in range(0, len(bucket_jobs), cfg.batch_size)]
    # Photos are decoded and cropped on a thread pool, the next batch while the VAE encodes this one.
    loaded = prefetched(batches, lambda job: _load_pixels(job[1], job[2], job[3], cfg.center_crop))
    for batch, pixels in zip(batches, loaded):
        mean, std = _encode_pixels(pixels, enc)
        for (key, *_), m, sd in zip(batch, mean, std):
            latent_cache.put(key, lambda tmp, m=m, sd=sd: save_file(
                {"mean": m.to(dtype).contiguous(), "std": sd.to(dtype).contiguous()}, str(tmp)))

    for s in range(0, len(missing_text), cfg.batch_size):
        keys = missing_text[s : s + cfg.batch_size]
        entries = encode_text_entries([captions[k] for k in keys], enc, cfg.max_sequence_length)
        for key, e in zip(keys, entries):
            text_cache.put(key, lambda tmp, e=e: save_file({k: v.to(dtype).contiguous() for k, v in e.items()},
                                                           str(tmp)))
    return table


