"""Precomputed VAE latents and text embeddings: what every trainer reads instead of pixels and prompts.

Per item, content-addressed:
- latent: (image sha256, VAE fingerprint, resolution, crop, flip, dtype) -> the VAE's latent distribution
  (mean and std, unscaled), so a trainer can still sample ``mean + std * eps`` each step as diffusers'
  scripts do with ``latent_dist.sample()``;
- text embedding: (caption, text-encoder + tokenizer fingerprint, dtype) -> ``last_hidden_state`` [77, dim].

The asset output is one ``latents.safetensors`` (stacked tensors, rows in ``index.parquet`` order, keyed by
image sha256) plus the index, so a trainer loads a whole concept with one read and can never pair a latent
with the wrong caption.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from assets_pipeline.hashing import digest
from assets_pipeline.imaging import training_crop
from assets_pipeline.store import CorruptFile, ItemCache, atomic_path, check_file, digest_path, record_digest

LATENT_VERSION = 1
INDEX_COLUMNS = ["image_sha256", "role", "caption", "latent_key", "text_key", "flip_latent_key"]
_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class LatentConfig:
    resolution: int | None = field(default=None, metadata={"help": "Training side in px; None = model's."})
    center_crop: bool = field(default=True, metadata={"help": "Center crop (else top-left), as --center_crop."})
    random_flip: bool = field(default=False, metadata={"help": "Also cache horizontally flipped latents."})
    dtype: str = field(default="float32", metadata={"help": f"Stored dtype, one of {_DTYPES}."})
    batch_size: int = field(default=8, metadata={"help": "Images per VAE / text-encoder forward pass."})

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.resolution is not None and self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE's downsampling), got {self.resolution}")


@dataclass
class Encoders:
    """The frozen models latents come from, with the fingerprints that enter every cache key.

    ``load()`` returns (vae, text_encoder, tokenizer); it runs on first use, so a run whose items are all
    cached loads no model.
    """

    load: Any
    vae_fingerprint: str
    text_fingerprint: str
    scaling_factor_hint: float | None = None  # from the VAE's config.json, when it can be read without loading
    device: str = "cpu"
    loaded: tuple | None = field(default=None, repr=False)

    def _get(self) -> tuple:
        if self.loaded is None:
            self.loaded = self.load()
        return self.loaded

    @property
    def vae(self):
        return self._get()[0]

    @property
    def text_encoder(self):
        return self._get()[1]

    @property
    def tokenizer(self):
        return self._get()[2]

    @property
    def scaling_factor(self) -> float:
        return self.scaling_factor_hint if self.scaling_factor_hint is not None else self.vae.config.scaling_factor


def latent_key(sha: str, enc: Encoders, resolution: int, cfg: LatentConfig, flip: bool) -> str:
    return digest("vae-latent", LATENT_VERSION, sha, enc.vae_fingerprint, resolution, cfg.center_crop, flip, cfg.dtype)


def text_key(caption: str, enc: Encoders, cfg: LatentConfig) -> str:
    return digest("text-embedding", LATENT_VERSION, caption, enc.text_fingerprint, cfg.dtype)


def _encode_images(paths: list[str], flips: list[bool], enc: Encoders, resolution: int, center_crop: bool):
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    pixels = []
    for p, flip in zip(paths, flips):
        img = training_crop(Image.open(p), resolution, center_crop)
        if flip:
            img = ImageOps.mirror(img)
        pixels.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    x = torch.stack(pixels).to(enc.vae.device, dtype=enc.vae.dtype)
    with torch.inference_mode():
        dist = enc.vae.encode(x).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()


def encode_prompts(captions: list[str], enc: Encoders):
    import torch

    ids = enc.tokenizer(captions, padding="max_length", max_length=enc.tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(enc.text_encoder.device)
    with torch.inference_mode():
        return enc.text_encoder(ids)[0].float().cpu()


def compute_latents(
    items: pd.DataFrame, enc: Encoders, resolution: int, cfg: LatentConfig,
    latent_cache: ItemCache, text_cache: ItemCache,
) -> pd.DataFrame:
    """Fill both caches for ``items`` (columns image_sha256, decoded_path, caption, role); return the index.
    torch is imported only when something is missing: a fully cached run needs no model library at all."""
    jobs = []  # (key, path, flip)
    index = []
    for r in items.itertuples():
        lk = latent_key(r.image_sha256, enc, resolution, cfg, False)
        fk = latent_key(r.image_sha256, enc, resolution, cfg, True) if cfg.random_flip else None
        tk = text_key(r.caption, enc, cfg)
        jobs.append((lk, r.decoded_path, False))
        if fk:
            jobs.append((fk, r.decoded_path, True))
        index.append({"image_sha256": r.image_sha256, "role": r.role, "caption": r.caption,
                      "latent_key": lk, "text_key": tk, "flip_latent_key": fk})

    table = pd.DataFrame(index, columns=INDEX_COLUMNS)
    missing = set(latent_cache.split([k for k, _, _ in jobs]))
    captions = {row["text_key"]: row["caption"] for row in index}
    missing_text = text_cache.split(list(captions))
    if not missing and not missing_text:
        return table
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, cfg.dtype)
    todo = list({k: (k, p, f) for k, p, f in jobs if k in missing}.values())  # one encode per key
    for path in dict.fromkeys(Path(p) for _, p, _ in todo):
        # Images from the project's caches carry a digest: the asset restores damaged photos before this, and
        # anything still damaged names its fix instead of being encoded.
        if digest_path(path).exists() and (why := check_file(path)) is not None:
            raise CorruptFile(path, f"{why}; rematerialize the asset that made it (class_images for a "
                              "class image, raw_images for a photo)")
    for s in range(0, len(todo), cfg.batch_size):
        batch = todo[s : s + cfg.batch_size]
        mean, std = _encode_images([p for _, p, _ in batch], [f for *_, f in batch], enc, resolution, cfg.center_crop)
        for (key, _, _), m, sd in zip(batch, mean, std):
            latent_cache.put(key, lambda tmp, m=m, sd=sd: save_file(
                {"mean": m.to(dtype).contiguous(), "std": sd.to(dtype).contiguous()}, str(tmp)))

    for s in range(0, len(missing_text), cfg.batch_size):
        keys = missing_text[s : s + cfg.batch_size]
        embeds = encode_prompts([captions[k] for k in keys], enc)
        for key, e in zip(keys, embeds):
            text_cache.put(key, lambda tmp, e=e: save_file({"prompt_embeds": e.to(dtype).contiguous()}, str(tmp)))
    return table


def write_latent_bundle(index: pd.DataFrame, latent_cache: ItemCache, text_cache: ItemCache, out: Path,
                        meta: dict[str, Any]) -> None:
    """Stack the cached items of ``index`` into one safetensors file (row i = index row i)."""
    import torch
    from safetensors.torch import load_file, save_file

    if not len(index):
        raise ValueError("no latents to bundle: the quality subset is empty (every photo was rejected, dropped by "
                         "the quality filter or left out by CLIP scoring; see those assets' tables)")

    def stack(keys, cache, name):
        return torch.stack([load_file(str(cache.path(k)))[name] for k in keys]).contiguous()

    tensors = {
        "latent_mean": stack(index["latent_key"], latent_cache, "mean"),
        "latent_std": stack(index["latent_key"], latent_cache, "std"),
        "prompt_embeds": stack(index["text_key"], text_cache, "prompt_embeds"),
    }
    if index["flip_latent_key"].notna().all():
        tensors["flip_latent_mean"] = stack(index["flip_latent_key"], latent_cache, "mean")
        tensors["flip_latent_std"] = stack(index["flip_latent_key"], latent_cache, "std")
    header = {"image_sha256": json.dumps(list(index["image_sha256"])), "role": json.dumps(list(index["role"])),
              **{k: json.dumps(v) for k, v in meta.items()}}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    record_digest(out)  # a rerun links this bundle forward only while it still matches


def load_latent_bundle(path: Path):
    """Read a bundle back: (tensors, image_sha256 list, roles, metadata). What trainers call.

    The bundle must match its recorded digest (:class:`CorruptFile` names it otherwise), so a damaged file
    stops training with its path and the fix, not with a safetensors header error."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if (why := check_file(path)) is not None:
        raise CorruptFile(path, f"{why}; rematerialize vae_latents for this concept to rebuild it")

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    tensors = load_file(str(path))
    meta = {k: json.loads(v) for k, v in header.items()}
    return tensors, meta.pop("image_sha256"), meta.pop("role"), meta
