"""The vae_latents bundle: a concept's cached latents and text embeddings stacked into one file, what every trainer
reads.

The asset output is one ``latents.safetensors`` plus ``index.parquet``, so a trainer loads a whole concept with
one read and can never pair a latent with the wrong caption. Bundle layout: ``prompt_embeds`` stacks each distinct
caption's embedding once, in order of first use, and ``text_index`` [N] gives each row's (class images share one
caption: a Flux caption is 512 x 4096 values, so a hundred copies of one would be gigabytes); bundles from before
``text_index`` stack every row's (:meth:`LatentBundle.text_rows` reads both); latents of different buckets have different shapes, so each bucket has its own stacked tensors,
``latent_mean@<w>x<h>`` and ``latent_std@<w>x<h>`` (+ ``flip_latent_*@<w>x<h>``), holding that bucket's rows in
index order; the header lists each row's image sha256, role and bucket (:class:`LatentBundle` reads it back).
A family with a pooled embedding (SDXL, SD 3.x, Flux) also gets ``pooled_prompt_embeds``, per distinct caption as
``prompt_embeds``; SDXL's ``add_time_ids`` [N, 6] are in row order (:func:`add_time_ids`), and
``flip_add_time_ids`` with ``random_flip``. ``empty_prompt_embeds`` [1, 77, dim] (SDXL: and
``empty_pooled_prompt_embeds`` [1, dim]) is the empty caption's embedding, what a trainer with ``caption_dropout``
trains the dropped rows on without loading a text encoder; it is a text item like any caption's (the index's
``empty_text_key``). Bundles from before it have none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from assets_pipeline.models.families import ModelFamily
from assets_pipeline.stages.buckets import bucket_label, crop_geometry, parse_bucket_label
from assets_pipeline.store import CorruptFile, ItemCache, atomic_path, check_file, record_digest


def add_time_ids(index: pd.DataFrame, center_crop: bool, flipped: bool = False):
    """SDXL's add_time_ids [N, 6] of the index's rows (int64): original size (h, w), crop top-left (top, left),
    target size (h, w) = the bucket (``families.sdxl_add_time_ids``, train_text_to_image_sdxl.py's order).

    ``flipped``: for the horizontally mirrored crop. diffusers' SDXL scripts flip the resized photo and then
    crop it, so the crop offset is measured in the mirrored photo: our mirrored crop is the crop of the mirrored
    photo at left' = resized width - bucket width - left."""
    import torch

    from assets_pipeline.models.unet import sdxl_add_time_ids

    rows = []
    for r in index.itertuples():
        left = int(r.crop_left)
        if flipped:
            size, bucket = (int(r.original_width), int(r.original_height)), (int(r.bucket_width), int(r.bucket_height))
            left = crop_geometry(size, bucket, center_crop)[0] - bucket[0] - left
        rows.append(sdxl_add_time_ids((r.original_height, r.original_width), (r.crop_top, left),
                                      (r.bucket_height, r.bucket_width)))
    return torch.cat(rows)


def bucket_counts(index: pd.DataFrame) -> pd.DataFrame:
    """Rows per bucket and role (columns bucket, width, height, aspect, instance, class), tallest bucket first:
    what the vae_latents materialization reports."""
    rows = []
    for (w, h), group in index.groupby(["bucket_width", "bucket_height"]):
        roles = group["role"].value_counts()
        rows.append({"bucket": bucket_label((w, h)), "width": int(w), "height": int(h), "aspect": round(w / h, 3),
                     "instance": int(roles.get("instance", 0)), "class": int(roles.get("class", 0))})
    columns = ["bucket", "width", "height", "aspect", "instance", "class"]
    return pd.DataFrame(rows, columns=columns).sort_values(["aspect", "width"], ignore_index=True)


def _tensor_name(name: str, bucket: tuple[int, int]) -> str:
    return f"{name}@{bucket_label(bucket)}"


def write_latent_bundle(index: pd.DataFrame, latent_cache: ItemCache, text_cache: ItemCache, out: Path,
                        meta: dict[str, Any], family: ModelFamily, center_crop: bool = True) -> None:
    """Stack the cached items of ``index`` into one safetensors file: ``prompt_embeds`` row i = index row i;
    per bucket, ``latent_mean@<w>x<h>`` etc. hold that bucket's rows in index order; ``empty_prompt_embeds``
    [1, 77, dim] when the index has an ``empty_text_key``. A ``family`` with a pooled text embedding (SDXL) also
    gets ``pooled_prompt_embeds`` (+ ``empty_pooled_prompt_embeds``), one with micro-conditioning ``add_time_ids``
    (+ ``flip_add_time_ids``), in row order; ``center_crop`` is the crop the latents were made with (a flipped
    crop's offset depends on it)."""
    import torch
    from safetensors.torch import load_file, save_file

    if not len(index):
        raise ValueError("no latents to bundle: the quality subset is empty (every photo was rejected, dropped by "
                         "the quality filter or left out by CLIP scoring; see those assets' tables)")

    def stack(keys, cache, name):
        return torch.stack([load_file(str(cache.path(k)))[name] for k in keys]).contiguous()

    buckets = list(zip(index["bucket_width"].astype(int), index["bucket_height"].astype(int)))
    texts = list(dict.fromkeys(index["text_key"]))  # each distinct caption once
    where = {k: i for i, k in enumerate(texts)}
    tensors = {"prompt_embeds": stack(texts, text_cache, "prompt_embeds"),
               "text_index": torch.tensor([where[k] for k in index["text_key"]], dtype=torch.long)}
    flip = index["flip_latent_key"].notna().all()
    empty = index["empty_text_key"].iloc[:1] if "empty_text_key" in index and index["empty_text_key"].notna().all() \
        else None
    if empty is not None:
        tensors["empty_prompt_embeds"] = stack(empty, text_cache, "prompt_embeds")
    if family.pooled_text:
        tensors["pooled_prompt_embeds"] = stack(texts, text_cache, "pooled_prompt_embeds")
        if empty is not None:
            tensors["empty_pooled_prompt_embeds"] = stack(empty, text_cache, "pooled_prompt_embeds")
    if family.micro_conditioning:
        tensors["add_time_ids"] = add_time_ids(index, center_crop).contiguous()
        if flip:
            tensors["flip_add_time_ids"] = add_time_ids(index, center_crop, flipped=True).contiguous()
    for bucket in sorted(set(buckets)):
        rows = index[[b == bucket for b in buckets]]
        tensors[_tensor_name("latent_mean", bucket)] = stack(rows["latent_key"], latent_cache, "mean")
        tensors[_tensor_name("latent_std", bucket)] = stack(rows["latent_key"], latent_cache, "std")
        if flip:
            tensors[_tensor_name("flip_latent_mean", bucket)] = stack(rows["flip_latent_key"], latent_cache, "mean")
            tensors[_tensor_name("flip_latent_std", bucket)] = stack(rows["flip_latent_key"], latent_cache, "std")
    header = {"image_sha256": json.dumps(list(index["image_sha256"])), "role": json.dumps(list(index["role"])),
              "bucket": json.dumps([bucket_label(b) for b in buckets]),
              **{k: json.dumps(v) for k, v in meta.items()}}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    record_digest(out)  # a rerun links this bundle forward only while it still matches


@dataclass
class LatentBundle:
    """A vae_latents bundle read back: per-row lists (index order) and the tensors (see the module docstring)."""

    tensors: dict[str, Any]
    image_sha256: list[str]
    roles: list[str]
    buckets: list[tuple[int, int]]  # each row's bucket (width, height) in px
    meta: dict[str, Any]  # what the asset stored besides the rows: resolution, scaling factor, fingerprints

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """The buckets present, in the order their tensors were written."""
        return sorted(set(self.buckets))

    def positions(self) -> list[int]:
        """Each row's position in its bucket's tensors (its bucket's rows are stored in index order)."""
        seen: dict[tuple[int, int], int] = {}
        out = []
        for b in self.buckets:
            out.append(seen.get(b, 0))
            seen[b] = out[-1] + 1
        return out

    def latents(self, name: str, bucket: tuple[int, int]):
        """``name`` ("latent_mean", "latent_std", "flip_latent_mean", "flip_latent_std") of one bucket's rows;
        KeyError when the bundle has no such tensor (flips are stored only with random_flip)."""
        return self.tensors[_tensor_name(name, bucket)]

    def has(self, name: str) -> bool:
        return all(_tensor_name(name, b) in self.tensors for b in self.sizes)

    def text_rows(self):
        """Each row's index into ``prompt_embeds`` (and ``pooled_prompt_embeds``): the bundle's ``text_index``, or
        the row itself in a bundle from before it (one embedding per row)."""
        import torch

        if "text_index" in self.tensors:
            return self.tensors["text_index"]
        return torch.arange(len(self.image_sha256))

    def per_row(self, name: str):
        """A text tensor (``prompt_embeds``, ``pooled_prompt_embeds``) with one entry per row, in index order."""
        return self.tensors[name][self.text_rows()]


def bundle_meta(path: Path) -> dict[str, Any]:
    """What a bundle's asset stored besides the rows (resolution, scaling factor, fingerprints), from its header
    alone: no tensor is read."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    return {k: json.loads(v) for k, v in header.items() if k not in ("image_sha256", "role", "bucket")}


def load_latent_bundle(path: Path) -> LatentBundle:
    """Read a bundle back. What trainers call.

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
    if "bucket" not in meta:
        raise ValueError(f"{path}: a bundle from before aspect-ratio buckets (no per-row bucket); rematerialize "
                         "vae_latents for this concept to rebuild it")
    return LatentBundle(tensors, meta.pop("image_sha256"), meta.pop("role"),
                        [parse_bucket_label(b) for b in meta.pop("bucket")], meta)
