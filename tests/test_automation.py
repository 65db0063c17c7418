"""Declarative automation: after a change, exactly the asset partitions it invalidates are requested."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from helpers import encode, photo, photos, write_concept
from conftest import link_models

DATASET_CHAIN = {"captioned_images", "filtered_images", "clip_scored_images", "control_images", "class_images",
                 "vae_latents"}
SPEC = 'token = "sks"\nclass_noun = "dog"\nmethods = ["lora"]\n'


class World:
    def __init__(self, root: Path, built_models: Path):
        from assets_pipeline.definitions import ASSETS, default_resources
        from assets_pipeline.resources import PipelineStorage

        self.data = root / "data"
        self.storage = PipelineStorage(data_root=str(self.data),
                                       artifact_root=str(link_models(built_models, root / "artifacts")))
        write_concept(self.data, "alpha", photos(["astronaut", "chelsea", "coffee", "rocket"]), SPEC)
        write_concept(self.data, "beta", photos(["astronaut", "chelsea", "coffee", "hubble_deep_field"]), SPEC)
        self.instance = dg.DagsterInstance.ephemeral()
        self.instance.add_dynamic_partitions("concepts", ["alpha", "beta"])
        self.assets = ASSETS
        self.resources = {**default_resources(), "storage": self.storage}
        for concept in ("alpha", "beta"):
            self.materialize(concept, dg.AssetSelection.groups("dataset", "priors", "latents"))
        self.cursor = self.evaluate().cursor  # the daemon's first tick: records versions, requests nothing

    def materialize(self, concept, selection, assets=None):
        res = dg.materialize(assets or self.assets, selection=selection, partition_key=concept,
                             instance=self.instance, resources=self.resources)
        assert res.success
        return {e.materialization.asset_key.to_user_string(): e.materialization
                for e in res.get_asset_materialization_events()}

    def evaluate(self, assets=None):
        defs = dg.Definitions(assets=assets or self.assets, resources=self.resources)
        result = dg.evaluate_automation_conditions(defs=defs, instance=self.instance,
                                                   cursor=getattr(self, "cursor", None))
        self.cursor = result.cursor
        return result

    def ingest(self, concept):
        """What the folder sensor's run does: raw_images for that concept only."""
        return self.materialize(concept, ["raw_images"])


def requested(result) -> dict[str, set]:
    out = {}
    for asset in ("raw_images", *DATASET_CHAIN, "lora_adapter", "dreambooth_model"):
        parts = result.get_requested_partitions(dg.AssetKey(asset))
        if parts:
            out[asset] = set(parts)
    return out


@pytest.fixture
def world(tmp_path, built_models):
    return World(tmp_path, built_models)


@pytest.mark.slow
def test_nothing_changed_requests_nothing(world):
    assert world.evaluate().total_requested == 0


@pytest.mark.slow
def test_new_photo_rebuilds_that_concepts_dataset_chain_only(world):
    (world.data / "alpha" / "coins.png").write_bytes(encode(photo("coins", (96, 80)).convert("RGB"), "PNG"))
    world.ingest("alpha")
    got = requested(world.evaluate())
    assert got == {asset: {"alpha"} for asset in DATASET_CHAIN}  # beta untouched, nothing trained
    # Running what was requested computes only the new photo's items.
    mats = world.materialize("alpha", sorted(DATASET_CHAIN))
    assert mats["vae_latents"].metadata["latents_computed"].value == 1
    assert mats["clip_scored_images"].metadata["items_computed"].value == 1
    assert world.evaluate().total_requested == 0  # settled


@pytest.mark.slow
def test_reingesting_identical_photos_rebuilds_nothing(world):
    for p in (world.data / "alpha").glob("*.png"):
        p.write_bytes(p.read_bytes())  # new mtime, same bytes: the sensor sees a change and ingests
    world.ingest("alpha")
    assert world.evaluate().total_requested == 0


@pytest.mark.slow
def test_edited_caption_rebuilds_captions_onward_and_reuses_latents(world):
    (world.data / "alpha" / "coffee.txt").write_text("a photo of sks dog next to a cup of coffee")
    world.ingest("alpha")
    got = requested(world.evaluate())
    assert got == {asset: {"alpha"} for asset in DATASET_CHAIN}
    mats = world.materialize("alpha", sorted(DATASET_CHAIN))
    latents = mats["vae_latents"].metadata
    assert latents["latents_computed"].value == 0 and latents["latents_cached"].value == 4
    assert latents["text_embeds_computed"].value == 1  # only the new caption is encoded
    assert mats["clip_scored_images"].metadata["items_computed"].value == 1  # its score depends on the caption


@pytest.mark.slow
def test_code_version_bump_rebuilds_that_asset_onward_for_every_concept(world):
    from assets_pipeline.assets.dataset import filtered_images

    bumped = [a if a is not filtered_images else
              a.map_asset_specs(lambda s: s.replace_attributes(code_version="999")) for a in world.assets]
    got = requested(world.evaluate(bumped))
    downstream = {"filtered_images", "clip_scored_images", "control_images", "vae_latents"}
    assert got == {asset: {"alpha", "beta"} for asset in downstream}
    assert world.evaluate(bumped).total_requested == 0  # handled: not requested again next tick
