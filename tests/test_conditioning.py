"""stages/conditioning.py: one Canny control image per photo, at its bucket's training crop, pixel-aligned with
its latent."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from assets_pipeline.stages.buckets import bucket_set, crop_geometry
from assets_pipeline.stages.conditioning import ControlConfig, make_control_images
from assets_pipeline.store import ItemCache
from helpers import photo


def subset(tmp_path, images: dict[str, Image.Image]) -> pd.DataFrame:
    rows = []
    for i, (name, img) in enumerate(images.items()):
        path = tmp_path / f"{name}.png"
        img.save(path)
        rows.append({"image_sha256": f"{i:064x}", "source_path": name, "decoded_path": str(path),
                     "caption": "a photo of sks dog"})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("resolution", [64, 96])
def test_control_image_is_square_at_resolution(tmp_path, resolution):
    items = subset(tmp_path, {"wide": photo("coffee", (150, 100)), "tall": photo("rocket", (60, 90)),
                              "tiny": photo("chelsea", (40, 30))})
    df = make_control_images(items, ControlConfig(), [(resolution, resolution)], True,
                             ItemCache(tmp_path, "control", ".png"))
    for path in df["control_path"]:
        img = Image.open(path)
        assert img.size == (resolution, resolution)
        assert img.mode == "RGB"
    assert list(df["image_sha256"]) == list(items["image_sha256"])
    assert (df["annotator"] == "canny").all()
    assert (df["bucket_width"] == resolution).all() and (df["bucket_height"] == resolution).all()


def test_control_image_has_its_photos_bucket(tmp_path):
    items = subset(tmp_path, {"wide": photo("coffee", (150, 90)), "tall": photo("rocket", (60, 100)),
                              "square": photo("chelsea", (70, 70))})
    df = make_control_images(items, ControlConfig(), bucket_set(64, 3.0), True,
                             ItemCache(tmp_path, "control", ".png"))
    buckets = [(80, 48), (48, 80), (64, 64)]
    assert list(zip(df["bucket_width"], df["bucket_height"])) == buckets
    for path, bucket in zip(df["control_path"], buckets):
        assert Image.open(path).size == bucket


def edge_box(path: str) -> tuple[int, int, int, int]:
    edges = np.asarray(Image.open(path).convert("L")) > 0
    ys, xs = np.nonzero(edges)
    return xs.min(), ys.min(), xs.max(), ys.max()


@pytest.mark.parametrize(("center_crop", "bucket"), [(True, (64, 64)), (False, (64, 64)), (True, (96, 96)),
                                                     (True, (96, 40)), (False, (96, 40)), (True, (48, 80))])
def test_control_image_is_aligned_with_the_training_crop(tmp_path, center_crop, bucket):
    # A white box on black in a 200x100 photo. The crop scales it to cover the bucket and cuts the bucket out:
    # from the middle (center crop; in 64x64: 128 px wide -> left edge at 32) or from the top-left corner.
    w, h = 200, 100
    box = (90, 30, 120, 70)  # x0, y0, x1, y1 in the photo
    px = np.zeros((h, w, 3), np.uint8)
    px[box[1]:box[3], box[0]:box[2]] = 255
    items = subset(tmp_path, {"box": Image.fromarray(px)})
    df = make_control_images(items, ControlConfig(), [bucket], center_crop, ItemCache(tmp_path, "control", ".png"))

    rw, rh, top, left = crop_geometry((w, h), bucket, center_crop)
    sx, sy = rw / w, rh / h
    limit = [bucket[0] - 1, bucket[1] - 1] * 2
    expected = np.clip([box[0] * sx - left, box[1] * sy - top, box[2] * sx - left, box[3] * sy - top], 0, limit)
    got = edge_box(df["control_path"][0])
    assert np.abs(np.array(got) - np.array(expected)).max() <= 2.5, (got, expected)


def test_cache_key_covers_bucket_crop_and_thresholds(tmp_path):
    items = subset(tmp_path, {"a": photo("coffee", (150, 100))})
    seen = set()
    for cfg, bucket, crop in [(ControlConfig(), (64, 64), True), (ControlConfig(), (64, 64), True),
                              (ControlConfig(), (96, 96), True), (ControlConfig(), (64, 64), False),
                              (ControlConfig(low_threshold=50), (64, 64), True), (ControlConfig(), (80, 48), True)]:
        cache = ItemCache(tmp_path / "art", "control", ".png")
        path = make_control_images(items, cfg, [bucket], crop, cache)["control_path"][0]
        assert cache.counts() == ({"items_computed": 0, "items_cached": 1} if path in seen
                                  else {"items_computed": 1, "items_cached": 0})
        seen.add(path)
    assert len(seen) == 5


@pytest.mark.parametrize("kwargs", [{"annotator": "sketch"}, {"annotator": "depth"}, {"annotator": "pose"},
                                    {"gaussian_sigma": 0},
                                    {"low_threshold": 200, "high_threshold": 100}])
def test_control_config_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        ControlConfig(**kwargs)


# -- the other annotators: line art (offline) and depth (a transformers model from a local folder) ------------------

@pytest.fixture(scope="module")
def depth_model(tmp_path_factory):
    from helpers import tiny_depth_model

    return tiny_depth_model(tmp_path_factory.mktemp("dpt"))


@pytest.fixture(scope="module")
def hed_model(tmp_path_factory):
    from helpers import tiny_hed_model

    return tiny_hed_model(tmp_path_factory.mktemp("hed"))


@pytest.fixture(scope="module")
def pose_model(tmp_path_factory):
    from helpers import tiny_pose_model

    return tiny_pose_model(tmp_path_factory.mktemp("pose"))


@pytest.mark.parametrize("annotator", ["canny", "lineart", "depth", "hed", "scribble", "pose"])
def test_each_annotator_makes_a_conditioning_image_of_its_photos_bucket(tmp_path, depth_model, hed_model, pose_model,
                                                                          annotator):
    cfg = ControlConfig(annotator=annotator, depth_model=str(depth_model) if annotator == "depth" else "",
                        hed_model=str(hed_model) if annotator in ("hed", "scribble") else "",
                        pose_model=str(pose_model) if annotator == "pose" else "")
    items = subset(tmp_path, {"wide": photo("coffee", (150, 90)), "square": photo("chelsea", (70, 70))})
    df = make_control_images(items, cfg, bucket_set(64, 3.0), True, ItemCache(tmp_path, "control", ".png"),
                             weights="w" * 64 if annotator in ("depth", "hed", "scribble", "pose") else None)
    for path, bucket in zip(df["control_path"], [(80, 48), (64, 64)]):
        img = Image.open(path)
        px = np.asarray(img)
        assert img.size == bucket and img.mode == "RGB"
        # drawn, not blank; a random-weight pose network finds no person: its canvas is black, as for a real
        # network on a photo without people
        assert px.max() > px.min() if annotator != "pose" else px.max() == 0
    assert df["control_source"][0].startswith(f"annotator annotator={annotator} ")
    if annotator in ("depth", "hed", "scribble", "pose"):  # the model's fingerprint: part of what it is made from
        assert "weights=" + "w" * 64 in df["control_source"][0]


def test_an_annotators_key_covers_its_own_parameters_and_model_only(tmp_path):
    from assets_pipeline.stages.conditioning import control_key

    key = lambda cfg, weights=None: control_key("a" * 64, cfg, (64, 64), True, weights)  # noqa: E731
    assert key(ControlConfig(gaussian_sigma=3.0)) == key(ControlConfig())  # canny ignores line-art settings
    assert key(ControlConfig(annotator="lineart")) != key(ControlConfig(annotator="lineart", gaussian_sigma=3.0))
    depth = ControlConfig(annotator="depth", depth_model="/models/dpt")
    assert key(depth, "1" * 64) != key(depth, "2" * 64)  # other weights, another image
    assert len({key(ControlConfig()), key(ControlConfig(annotator="lineart")), key(depth, "1" * 64)}) == 3


def test_a_depth_model_folder_that_lacks_files_is_named_with_what_it_lacks(tmp_path, depth_model):
    import shutil

    from assets_pipeline.stages.conditioning import make_annotator

    broken = tmp_path / "dpt"
    shutil.copytree(depth_model, broken)
    (broken / "model.safetensors").unlink()
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"depth_model = .*: missing \['preprocessor_config.json', "
                                                r"'model.safetensors'\]; put a depth-estimation model"):
        make_annotator(ControlConfig(annotator="depth", depth_model=str(broken)))
    with pytest.raises(FileNotFoundError, match=r"hed_model = .*: missing \['ControlNetHED.pth'\]"):
        make_annotator(ControlConfig(annotator="scribble", hed_model=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match=r"pose_model = .*: missing \['body_pose_model.pth'\]"):
        make_annotator(ControlConfig(annotator="pose", pose_model=str(tmp_path)))
