"""stages/curation.py: min side, blur, aspect ratio, near-duplicates (the better photo kept), with reasons."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from assets_pipeline.stages.curation import QualityConfig, filter_images, laplacian_variance, phash
from assets_pipeline.store import ItemCache
from helpers import photo

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "camera", "coins"]


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def test_phash_of_an_image_against_itself_is_zero():
    for name in PHOTOS:
        img = photo(name)
        assert hamming(phash(img), phash(img.copy())) == 0


def test_phash_separates_different_photos():
    hashes = {n: phash(photo(n)) for n in PHOTOS}
    for a, b in itertools.combinations(PHOTOS, 2):
        assert hamming(hashes[a], hashes[b]) > 10, (a, b)


def test_phash_matches_resized_and_reencoded_copies():
    import io

    img = photo("chelsea")
    buf = io.BytesIO()
    img.resize((img.width * 9 // 10, img.height * 9 // 10), Image.Resampling.LANCZOS).save(buf, "JPEG", quality=70)
    assert hamming(phash(img), phash(Image.open(buf))) <= 10


def test_laplacian_variance_measures_sharpness():
    gray = np.asarray(photo("astronaut").convert("L"))
    blurred = np.asarray(photo("astronaut").convert("L").filter(ImageFilter.GaussianBlur(4)))
    assert laplacian_variance(gray) > 100 > laplacian_variance(blurred)
    assert laplacian_variance(np.full((20, 20), 128)) == 0


def test_laplacian_variance_is_the_4_neighbour_stencil_on_grey_levels():
    """skimage.filters.laplace computes it; the scale must stay 0..255 grey levels (skimage rescales a uint8
    image to 0..1, which would divide the variance by 255**2 and make min_blur_variance call everything blurry)."""
    g = np.random.default_rng(0).integers(0, 256, (40, 30)).astype(np.uint8)
    f = g.astype(np.float64)
    stencil = f[:-2, 1:-1] + f[2:, 1:-1] + f[1:-1, :-2] + f[1:-1, 2:] - 4.0 * f[1:-1, 1:-1]
    assert laplacian_variance(g) == pytest.approx(stencil.var(), rel=1e-12)
    assert laplacian_variance(f) == laplacian_variance(g)


def test_phash_is_the_dct_of_the_32x32_grey_copy_bits_in_row_order():
    """scipy.fft.dctn computes it; the bits are the 8x8 low frequencies > their median, row by row, first bit
    most significant (as imagehash's hex string)."""
    n = np.arange(32)
    dct = np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / 64)  # DCT-II basis, unnormalized
    for name in ["astronaut", "coffee"]:
        img = photo(name)
        g = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
        low = (dct @ g @ dct.T)[:8, :8]
        assert phash(img) == int("".join("1" if b else "0" for b in (low > np.median(low)).flat), 2)


@pytest.fixture
def frame(tmp_path):
    """Build the (captioned, manifest) pair filter_images takes from named PIL images."""

    def make(images: dict[str, Image.Image]):
        rows = []
        for i, (name, img) in enumerate(images.items()):
            path = tmp_path / f"{i}.png"
            img.save(path)
            rows.append({"image_sha256": f"{i:064x}", "source_path": name, "decoded_path": str(path),
                         "caption": f"a photo of sks dog {i}", "width": img.width, "height": img.height})
        df = pd.DataFrame(rows)
        return df.drop(columns=["width", "height"]), df[["image_sha256", "width", "height"]]

    return make


def run_filter(frame, tmp_path, images, cfg=QualityConfig(), resolution=64):
    captioned, manifest = frame(images)
    cache = ItemCache(tmp_path / "art", "quality_metrics", ".json")
    df = filter_images(captioned, manifest, cfg, resolution, cache)
    return df.set_index("source_path"), cache


def test_each_quality_check_drops_with_its_reason(frame, tmp_path):
    astronaut = photo("astronaut", (256, 256))
    df, _ = run_filter(frame, tmp_path, {
        "good.png": astronaut,
        "blurry.png": photo("coffee", (240, 160)).filter(ImageFilter.GaussianBlur(3)),
        "small.png": photo("rocket", (48, 32)),
        "panorama.png": photo("camera", (400, 100)),
        "chelsea.png": photo("chelsea", (150, 100)),
    })
    assert df["kept"].to_dict() == {"good.png": True, "blurry.png": False, "small.png": False,
                                    "panorama.png": False, "chelsea.png": True}
    assert df.loc["blurry.png", "reason"].startswith("blurry: Laplacian variance")
    assert df.loc["small.png", "reason"] == "too small: shorter side 32 px < 64"
    assert df.loc["panorama.png", "reason"].startswith("aspect ratio 4.00 > 3.0")
    assert (df.loc[df["kept"], "reason"] == "").all()


def test_min_side_defaults_to_resolution_and_can_be_overridden(frame, tmp_path):
    images = {"a.png": photo("coffee", (150, 100))}
    assert not run_filter(frame, tmp_path, images, resolution=128)[0].loc["a.png", "kept"]
    assert run_filter(frame, tmp_path, images, QualityConfig(min_side=64), resolution=128)[0].loc["a.png", "kept"]


def test_near_duplicate_keeps_the_larger_photo(frame, tmp_path):
    big = photo("chelsea", (300, 200))
    # Named so the worse copy sorts first: the choice must come from quality, not from file order.
    df, _ = run_filter(frame, tmp_path, {"a_small_copy.png": big.resize((200, 133), Image.Resampling.LANCZOS),
                                         "z_original.png": big})
    assert df.loc["z_original.png", "kept"]
    assert not df.loc["a_small_copy.png", "kept"]
    assert df.loc["a_small_copy.png", "reason"].startswith("near duplicate of z_original.png (pHash distance")


def test_near_duplicate_keeps_the_sharper_photo(frame, tmp_path):
    sharp = photo("coffee", (300, 200))
    softer = sharp.filter(ImageFilter.GaussianBlur(0.8))  # still above the blur threshold on its own
    df, _ = run_filter(frame, tmp_path, {"a_softer.png": softer, "z_sharp.png": sharp})
    assert df.loc["a_softer.png", "blur_variance"] >= 100
    assert df["kept"].to_dict() == {"a_softer.png": False, "z_sharp.png": True}


def test_blurry_copy_never_displaces_the_good_photo(frame, tmp_path):
    sharp = photo("astronaut", (128, 128))
    df, _ = run_filter(frame, tmp_path, {"a_big_blurry.png": photo("astronaut", (256, 256)).filter(
        ImageFilter.GaussianBlur(5)), "z_sharp.png": sharp})
    assert df["kept"].to_dict() == {"a_big_blurry.png": False, "z_sharp.png": True}
    assert "near duplicate" not in df.loc["a_big_blurry.png", "reason"]


def test_hash_distance_setting_controls_duplicates(frame, tmp_path):
    images = {"a.png": photo("chelsea", (150, 100)), "b.png": photo("chelsea", (150, 100)).transpose(
        Image.Transpose.FLIP_LEFT_RIGHT)}
    strict, _ = run_filter(frame, tmp_path, images, QualityConfig(max_hash_distance=0))
    assert strict["kept"].all()
    loose, _ = run_filter(frame, tmp_path, images, QualityConfig(max_hash_distance=64))
    assert loose["kept"].sum() == 1


def test_metrics_are_cached(frame, tmp_path):
    images = {"a.png": photo("coffee", (120, 80)), "b.png": photo("rocket", (120, 80))}
    _, first = run_filter(frame, tmp_path, images)
    df, second = run_filter(frame, tmp_path, images)
    assert first.counts() == {"items_computed": 2, "items_cached": 0}
    assert second.counts() == {"items_computed": 0, "items_cached": 2}
    assert df["phash"].str.fullmatch(r"[0-9a-f]{16}").all()


@pytest.mark.parametrize("kwargs", [{"min_side": 0}, {"max_aspect_ratio": 0.5}, {"max_hash_distance": 65}])
def test_quality_config_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        QualityConfig(**kwargs)
