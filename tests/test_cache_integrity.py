"""Corrupt cache entries and reused outputs (issue 10, point 3): each is detected by its integrity digest, logged
with its path, discarded and recomputed, and the build succeeds; a link never spreads a damaged file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import pytest

from assets_pipeline.store import CorruptFile, ItemCache, check_file, digest_path, link_or_copy
from conftest import link_models
from helpers import encode, photo, write_concept

SPEC = 'token = "sks"\nclass_noun = "dog"\nmethods = ["lora", "controlnet"]\n'
DATASET = dg.AssetSelection.groups("dataset", "priors", "latents")


def truncate(path: Path, keep: int = 40) -> None:
    """Damage a file in place (same inode, so every hard link to it sees the damage too)."""
    data = path.read_bytes()
    with open(path, "r+b") as f:
        f.truncate(min(keep, len(data) // 2))


def test_an_entry_is_verified_on_every_lookup_and_a_bad_one_is_recomputed(tmp_path, caplog):
    cache = ItemCache(tmp_path, "scores", ".json")
    path = cache.get_or_create("ab12", lambda tmp: Path(tmp).write_text("0.25"))
    assert check_file(path) is None and digest_path(path).is_file()
    assert ItemCache(tmp_path, "scores", ".json").split(["ab12"]) == []  # intact: a hit

    path.write_text("{garbage")  # the case: a JSON that no longer parses
    again = ItemCache(tmp_path, "scores", ".json")
    assert again.split(["ab12"]) == ["ab12"]
    assert len(again.discarded) == 1 and again.discarded[0].startswith(f"{path}: contents changed since written")
    assert again.counts()["items_discarded_corrupt"] == 1
    assert str(path) in caplog.text and "discarding cache entry" in caplog.text
    assert not path.exists()  # removed, so nothing reads it while it is recomputed
    again.put("ab12", lambda tmp: Path(tmp).write_text("0.25"))
    assert json.loads(path.read_text()) == 0.25 and check_file(path) is None


def test_an_entry_without_its_digest_reads_as_missing(tmp_path):
    """A crash between the entry's rename and its digest's, or an entry written before digests existed."""
    cache = ItemCache(tmp_path, "captions", ".txt")
    path = cache.put("cd34", lambda tmp: Path(tmp).write_text("a photo of sks dog"))
    digest_path(path).unlink()
    fresh = ItemCache(tmp_path, "captions", ".txt")
    assert fresh.get_or_create("cd34", lambda tmp: Path(tmp).write_text("a photo of sks dog")) == path
    assert (fresh.computed, fresh.cached, len(fresh.discarded)) == (1, 0, 1)
    assert "no integrity digest" in fresh.discarded[0]


def test_a_link_is_made_only_from_an_intact_file_and_carries_its_digest(tmp_path):
    cache = ItemCache(tmp_path, "images", ".png")
    src = cache.put("ef56", lambda tmp: Path(tmp).write_bytes(encode(photo("coffee", (32, 32)), "PNG")))
    link_or_copy(src, tmp_path / "out" / "a.png")
    assert check_file(tmp_path / "out" / "a.png") is None  # verifiable where it was linked to
    truncate(src)
    with pytest.raises(CorruptFile, match="contents changed since written") as err:
        link_or_copy(src, tmp_path / "out2" / "a.png")
    assert err.value.path == src and not (tmp_path / "out2" / "a.png").exists()


@pytest.fixture(scope="module")
def world(tmp_path_factory, built_models):
    from types import SimpleNamespace

    from assets_pipeline.definitions import ASSETS, CHECKS, default_resources
    from assets_pipeline.resources import PipelineStorage

    root = tmp_path_factory.mktemp("integrity")
    storage = PipelineStorage(data_root=str(root / "data"), artifact_root=str(link_models(built_models, root / "art")))
    names = ["astronaut", "chelsea", "coffee", "rocket"]
    write_concept(root / "data", "rex", {f"{n}.png": encode(photo(n, (96, 80)), "PNG") for n in names}, SPEC)
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("concepts", ["rex"])
        resources = {**default_resources(), "storage": storage}

        def materialize(selection, raise_on_error=True):
            res = dg.materialize([*ASSETS, *CHECKS], selection=selection, partition_key="rex", instance=instance,
                                 resources=resources, raise_on_error=raise_on_error)
            mats = {e.materialization.asset_key.to_user_string(): {k: getattr(v, "value", v) for k, v in
                                                                  e.materialization.metadata.items()}
                    for e in res.get_asset_materialization_events()}
            return res, mats

        materialize(DATASET.without_checks())
        yield SimpleNamespace(storage=storage, layout=storage.layout(), materialize=materialize)


def _asset(world, name: str) -> Path:
    return world.layout.asset_dir("rex", name)


def test_a_truncated_latents_bundle_stops_training_with_its_path_and_a_rerun_rebuilds_it(world):
    from assets_pipeline.stages.bundle import load_latent_bundle

    bundle = _asset(world, "vae_latents") / "latents.safetensors"
    truncate(bundle)
    # Training refuses before claiming the GPU, naming the file and the fix (it used to die on the header).
    res, _ = world.materialize(dg.AssetSelection.assets("lora_adapter"), raise_on_error=False)
    failure = next(e for e in res.all_events if e.event_type_value == "STEP_FAILURE")
    message = str(failure.event_specific_data.error)
    assert str(bundle) in message and "rematerialize vae_latents" in message
    with pytest.raises(CorruptFile, match="rematerialize vae_latents"):
        load_latent_bundle(bundle)

    # Unchanged rows would normally keep (link) the current bundle: a damaged one is restacked instead.
    _, mats = world.materialize(dg.AssetSelection.assets("vae_latents"))
    assert mats["vae_latents"]["bundle_reused"] is False
    restacked = load_latent_bundle(bundle)
    assert len(restacked.image_sha256) == mats["vae_latents"]["dagster/row_count"]
    assert sum(len(restacked.latents("latent_mean", b)) for b in restacked.sizes) == len(restacked.image_sha256)
    _, mats = world.materialize(dg.AssetSelection.assets("vae_latents"))
    assert mats["vae_latents"]["bundle_reused"] is True  # intact again: linked forward


def test_a_truncated_decoded_photo_is_re_decoded_and_repaired_in_every_dataset_that_linked_it(world):
    """Issue 28, point 3: damage written through one link reaches every name of the inode; rebuilding one asset
    used to restore the cache entry as a new file and leave every other dataset folder's link truncated."""
    from PIL import Image

    scores = json.loads((_asset(world, "clip_scored_images") / "imagefolder" / "metadata.jsonl")
                        .read_text().splitlines()[0])
    linked = _asset(world, "clip_scored_images") / "imagefolder" / scores["file_name"]
    # The dataset folders link the decoded cache entry; damage it through one of those links.
    cache_entry = next(p for p in (world.layout.root / "cache" / "images").rglob("*.png")
                       if os.path.samefile(p, linked))
    damaged_inode = cache_entry.stat().st_ino
    names = [p for p in (world.layout.root / "concepts").rglob(scores["file_name"]) if os.path.samefile(p, linked)]
    assert len(names) >= 3  # captioned, filtered, clip-scored (and control) datasets share the inode
    truncate(linked)
    assert check_file(cache_entry) is not None

    # Only the first reader is rebuilt: the others' folders are repaired through the cache entry's repair.
    _, mats = world.materialize(dg.AssetSelection.assets("captioned_images"))
    assert mats["captioned_images"]["images_restored"] == 1
    assert mats["captioned_images"]["links_repaired"] == len(names)  # its own (about to be rewritten) among them
    assert check_file(cache_entry) is None and cache_entry.stat().st_ino != damaged_inode
    assert not list((world.layout.root / "cache" / "images").rglob("*.damaged"))
    for name in names:
        assert check_file(name) is None, name
        assert os.path.samefile(name, cache_entry)
        with Image.open(name) as img:
            img.load()  # a complete PNG in every dataset folder, rebuilt or not

    _, mats = world.materialize(dg.AssetSelection.assets("filtered_images", "clip_scored_images", "control_images"))
    assert all(mats[a]["images_restored"] == 0 for a in ("filtered_images", "clip_scored_images", "control_images"))


def test_a_damaged_shared_entry_is_repaired_under_every_concept_that_links_it(tmp_path):
    cache = ItemCache(tmp_path, "images", ".png")
    png = encode(photo("coffee", (32, 32)), "PNG")
    src = cache.put("ef56", lambda tmp: Path(tmp).write_bytes(png))
    names = [tmp_path / "concepts" / c / "captioned_images" / "imagefolder" / "x.png" for c in ("a", "b", "c")]
    for name in names:
        link_or_copy(src, name)
    (tmp_path / "concepts" / "d").mkdir()
    (tmp_path / "concepts" / "d" / "x.png").write_bytes(png)  # same bytes, its own inode: left alone
    truncate(names[1])
    assert all(check_file(n) is not None for n in names)

    path = cache.get_or_create("ef56", lambda tmp: Path(tmp).write_bytes(png))
    assert cache.discarded and sorted(cache.repaired) == sorted(map(str, names))
    assert cache.counts()["links_repaired"] == 3
    for name in names:
        assert name.read_bytes() == png and check_file(name) is None and os.path.samefile(name, path)
    assert not path.with_name(path.name + ".damaged").exists()


def test_a_garbage_clip_score_is_discarded_and_recomputed(world):
    entries = sorted((world.layout.root / "cache" / "clip_scores").rglob("*.json"))
    assert entries
    entries[0].write_text("{not json")
    _, mats = world.materialize(dg.AssetSelection.assets("clip_scored_images"))
    md = mats["clip_scored_images"]
    assert md["items_discarded_corrupt"] == 1 and md["items_computed"] == 1
    assert isinstance(json.loads(entries[0].read_text()), float)


def test_every_file_written_has_the_same_mode(world):
    """Weights and latents used to be created 0600 (a private temp file renamed into place), the rest 0644."""
    from assets_pipeline.store import FILE_MODE

    modes = {}
    for path in world.layout.root.rglob("*"):
        if path.is_file() and "base_models" not in path.parts:
            modes.setdefault(oct(path.stat().st_mode & 0o777), []).append(path.name)
    assert set(modes) == {oct(FILE_MODE)}, {m: names[:5] for m, names in modes.items()}
