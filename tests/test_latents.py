"""stages/latents.py and stages/bundle.py: cached VAE latents + text embeddings, keyed by image sha256, per bucket,
and the bundle they are stacked into."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageOps

from assets_pipeline.hashing import digest
from assets_pipeline.stages.buckets import bucket_crop
from assets_pipeline.stages.bundle import load_latent_bundle, write_latent_bundle
from assets_pipeline.stages.latents import (
    INDEX_COLUMNS, LatentConfig, compute_latents, encode_text_entries, latent_key, text_key,
)
from assets_pipeline.store import ItemCache
from helpers import photo

RES = 64
SIZES = [(96, 64), (64, 104), (72, 72)]  # landscape, portrait, square
BUCKETS = [(80, 48), (48, 80), (64, 64)]  # theirs at 64 px (stages/buckets.py)


@pytest.fixture
def items(tmp_path) -> pd.DataFrame:
    rows = []
    for i, name in enumerate(["astronaut", "coffee", "rocket"]):
        path = tmp_path / f"{name}.png"
        photo(name, SIZES[i]).save(path)
        rows.append({"image_sha256": f"{i:02d}" * 32, "decoded_path": str(path),
                     "caption": f"a photo of sks {name}", "role": "instance"})
    return pd.DataFrame(rows)


def caches(root):
    return ItemCache(root, "latents", ".safetensors"), ItemCache(root, "text_embeds", ".safetensors")


def vae_mean(enc, path: str, bucket: tuple[int, int], flip: bool = False) -> torch.Tensor:
    """The VAE posterior mean of one photo at its bucket's crop, computed here without the stage's batching."""
    img, _ = bucket_crop(Image.open(path), bucket, True)
    if flip:
        img = ImageOps.mirror(img)
    x = torch.from_numpy(np.asarray(img, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        return enc.vae.encode(x).latent_dist.mean[0]


@pytest.mark.parametrize("buckets", [True, False])
def test_bundle_round_trip_pairs_each_photo_with_its_own_caption(items, encoders, tmp_path, buckets):
    lat, txt = caches(tmp_path / "art")
    index = compute_latents(items, encoders, RES, LatentConfig(batch_size=2, buckets=buckets), lat, txt)
    assert list(index.columns) == INDEX_COLUMNS
    expected = BUCKETS if buckets else [(RES, RES)] * 3
    assert list(zip(index["bucket_width"], index["bucket_height"])) == expected
    assert list(zip(index["original_width"], index["original_height"])) == SIZES
    out = tmp_path / "latents.safetensors"
    write_latent_bundle(index, lat, txt, out, {"resolution": RES, "note": "x"}, encoders.family)
    bundle = load_latent_bundle(out)
    assert bundle.image_sha256 == list(items["image_sha256"]) and bundle.buckets == expected
    assert bundle.roles == ["instance"] * 3
    assert bundle.meta == {"resolution": RES, "note": "x"}
    assert bundle.tensors["prompt_embeds"].shape == (3, 77, 32)
    assert sorted(k for k in bundle.tensors if k.startswith("latent_mean@")) == sorted(
        f"latent_mean@{w}x{h}" for w, h in set(expected))
    assert not bundle.has("flip_latent_mean")

    by_sha = items.set_index("image_sha256")
    positions = bundle.positions()
    for row, sha in enumerate(bundle.image_sha256):
        bucket = bundle.buckets[row]
        mean = bundle.latents("latent_mean", bucket)[positions[row]]
        assert mean.shape == (4, bucket[1] // 2, bucket[0] // 2)  # the tiny VAE downsamples 2x
        assert bundle.latents("latent_std", bucket)[positions[row]].shape == mean.shape
        expected_text = encode_text_entries([by_sha.loc[sha, "caption"]], encoders)[0]["prompt_embeds"]
        assert torch.allclose(bundle.tensors["prompt_embeds"][row], expected_text, atol=1e-5)
        assert torch.allclose(mean, vae_mean(encoders, by_sha.loc[sha, "decoded_path"], bucket), atol=1e-4)
    # The captions differ, so a mix-up would have been visible above.
    assert not torch.allclose(bundle.tensors["prompt_embeds"][0], bundle.tensors["prompt_embeds"][1])


def test_items_are_computed_once_and_reused(items, encoders, tmp_path):
    lat, txt = caches(tmp_path / "art")
    compute_latents(items, encoders, RES, LatentConfig(), lat, txt)
    assert (lat.computed, txt.computed) == (3, 4)  # three captions and the empty one (caption_dropout's)

    lat2, txt2 = caches(tmp_path / "art")
    compute_latents(items, encoders, RES, LatentConfig(), lat2, txt2)
    assert (lat2.computed, lat2.cached, txt2.computed, txt2.cached) == (0, 3, 0, 4)

    lat3, txt3 = caches(tmp_path / "art")
    index = compute_latents(items, encoders, RES, LatentConfig(random_flip=True), lat3, txt3)
    assert (lat3.computed, lat3.cached) == (3, 3)  # only the flipped ones are new
    out = tmp_path / "flip.safetensors"
    write_latent_bundle(index, lat3, txt3, out, {}, encoders.family)
    bundle = load_latent_bundle(out)
    bucket = bundle.buckets[1]  # the portrait
    path = items.set_index("image_sha256").loc[bundle.image_sha256[1], "decoded_path"]
    flipped = bundle.latents("flip_latent_mean", bucket)[0]
    assert torch.allclose(flipped, vae_mean(encoders, path, bucket, flip=True), atol=1e-4)
    assert not torch.allclose(flipped, bundle.latents("latent_mean", bucket)[0])

    # The square photo's latent is the square crop's, shared with buckets = false; the others are new.
    lat4, txt4 = caches(tmp_path / "art")
    compute_latents(items, encoders, RES, LatentConfig(buckets=False), lat4, txt4)
    assert (lat4.computed, lat4.cached) == (2, 1)


def test_stored_dtype(items, encoders, tmp_path):
    lat, txt = caches(tmp_path / "art")
    index = compute_latents(items, encoders, RES, LatentConfig(dtype="float16"), lat, txt)
    out = tmp_path / "half.safetensors"
    write_latent_bundle(index, lat, txt, out, {}, encoders.family)
    tensors = load_latent_bundle(out).tensors
    assert {t.dtype for name, t in tensors.items() if name != "text_index"} == {torch.float16}
    assert tensors["text_index"].dtype == torch.long


def test_cache_keys_change_with_every_input(encoders):
    sha = "ab" * 32
    base = latent_key(sha, encoders, 64, LatentConfig(), False)
    assert base == latent_key(sha, encoders, 64, LatentConfig(), False)  # deterministic
    variants = [
        latent_key("cd" * 32, encoders, 64, LatentConfig(), False),
        latent_key(sha, encoders, 128, LatentConfig(), False),
        latent_key(sha, encoders, 64, LatentConfig(), True),
        latent_key(sha, encoders, 64, LatentConfig(center_crop=False), False),
        latent_key(sha, encoders, 64, LatentConfig(dtype="float16"), False),
        latent_key(sha, encoders, 64, LatentConfig(dtype="bfloat16"), False),
        latent_key(sha, dataclasses.replace(encoders, vae_fingerprint="another-vae"), 64, LatentConfig(), False),
    ]
    assert len({base, *variants}) == len(variants) + 1
    # Settings that do not change a latent must not split the cache.
    assert latent_key(sha, encoders, 64, LatentConfig(batch_size=1), False) == base
    # The square crop is keyed as before buckets existed (caches made then stay valid), whatever `buckets` says.
    assert base == digest("vae-latent", 1, sha, encoders.vae_fingerprint, 64, True, False, "float32")
    assert latent_key(sha, encoders, (64, 64), LatentConfig(buckets=False), False) == base
    # Each bucket is its own crop.
    buckets = {latent_key(sha, encoders, b, LatentConfig(), False) for b in [(80, 48), (48, 80), (80, 56)]}
    assert len(buckets | {base}) == 4
    assert latent_key(sha, dataclasses.replace(encoders, text_fingerprint="x"), 64, LatentConfig(), False) == base

    t = text_key("a photo of sks dog", encoders, LatentConfig())
    assert len({t, text_key("a photo of sks cat", encoders, LatentConfig()),
                text_key("a photo of sks dog", encoders, LatentConfig(dtype="float16")),
                text_key("a photo of sks dog", dataclasses.replace(encoders, text_fingerprint="x"),
                         LatentConfig())}) == 4
    assert text_key("a photo of sks dog", dataclasses.replace(encoders, vae_fingerprint="y"), LatentConfig()) == t


def test_encoder_fingerprints_are_per_component(encoders):
    assert encoders.vae_fingerprint != encoders.text_fingerprint
    assert len(encoders.vae_fingerprint) == 64


@pytest.mark.parametrize("kwargs", [{"resolution": 100}, {"dtype": "int8"}])
def test_latent_config_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        LatentConfig(**kwargs)


def test_empty_subset_fails_with_a_message_not_a_torch_error(encoders, tmp_path):
    lat, txt = caches(tmp_path / "art")
    empty = pd.DataFrame(columns=["image_sha256", "decoded_path", "caption", "role"])
    index = compute_latents(empty, encoders, RES, LatentConfig(), lat, txt)
    assert len(index) == 0 and (lat.computed, txt.computed) == (0, 0)
    with pytest.raises(ValueError, match="quality subset is empty"):
        write_latent_bundle(index, lat, txt, tmp_path / "x.safetensors", {}, encoders.family)
    assert not (tmp_path / "x.safetensors").exists()


def test_a_bundle_from_before_buckets_names_its_fix(tmp_path):
    from safetensors.torch import save_file

    from assets_pipeline.store import record_digest

    old = tmp_path / "latents.safetensors"
    save_file({"latent_mean": torch.zeros(1, 4, 2, 2)}, str(old),
              metadata={"image_sha256": '["a"]', "role": '["instance"]'})
    record_digest(old)
    with pytest.raises(ValueError, match="before aspect-ratio buckets.*rematerialize vae_latents"):
        load_latent_bundle(old)


@pytest.mark.gpu
def test_gpu_latents_match_cpu_so_the_cache_can_be_shared(items, encoders, tmp_path):
    """The device is not part of a latent's cache key, so a GPU-computed item must equal the CPU one (within
    TF32/cuDNN rounding) for a hit from either to be valid."""
    import copy

    from assets_pipeline.resources import AcceleratorResource

    assert AcceleratorResource().torch_device() == "cuda"
    vae, text_encoders = copy.deepcopy(encoders.vae).to("cuda"), [copy.deepcopy(e).to("cuda")
                                                                    for e in encoders.text_encoders]
    on_gpu = dataclasses.replace(encoders.loaded, vae=vae, text_encoders=tuple(text_encoders))
    gpu = dataclasses.replace(encoders, load=lambda: on_gpu, loaded=None, device="cuda")
    bundles = []
    for name, enc in (("cpu", encoders), ("gpu", gpu)):
        lat, txt = caches(tmp_path / name)
        index = compute_latents(items, enc, RES, LatentConfig(), lat, txt)
        write_latent_bundle(index, lat, txt, tmp_path / f"{name}.safetensors", {}, encoders.family)
        bundles.append(load_latent_bundle(tmp_path / f"{name}.safetensors"))
    cpu, gpu = bundles
    assert cpu.image_sha256 == gpu.image_sha256 and cpu.buckets == gpu.buckets
    assert cpu.tensors.keys() == gpu.tensors.keys()
    for name in cpu.tensors:
        assert torch.allclose(cpu.tensors[name], gpu.tensors[name], atol=1e-2, rtol=1e-2), name
