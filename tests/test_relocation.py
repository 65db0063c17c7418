"""A moved artifact root (copied, mounted elsewhere, restored from a backup) keeps working: every stored path is
relative to the root, so lineage, reuse of trained outputs, caches and training all resolve against the new place."""

from __future__ import annotations

import json
import shutil

import dagster as dg
import pytest

from conftest import link_models
from helpers import encode, photo, write_concept

pytestmark = pytest.mark.slow
SPEC = 'token = "sks"\nclass_noun = "dog"\nmethods = ["lora"]\n[lora]\nmax_train_steps = 4\n'
DATASET = dg.AssetSelection.groups("dataset", "priors", "latents")


def test_moving_the_artifact_root_keeps_lineage_reuse_caches_and_training(tmp_path, built_models):
    from assets_pipeline.training.reuse import current_output
    from assets_pipeline.definitions import ASSETS, CHECKS, default_resources
    from assets_pipeline.lineage import audit_output, outputs_trained_on
    from assets_pipeline.resources import PipelineStorage, TrainerLauncher
    from assets_pipeline.tables import read_table
    from assets_pipeline.training.reuse import FORCE_RETRAIN_TAG

    class NoTraining(TrainerLauncher):
        def launch(self, context, job_path, cache_dir=""):
            raise AssertionError(f"trained although nothing changed ({job_path})")

    data = tmp_path / "data"
    write_concept(data, "rex", {f"{n}.png": encode(photo(n, (96, 80)), "PNG")
                                for n in ("astronaut", "chelsea", "coffee", "rocket")}, SPEC)
    old_root = link_models(built_models, tmp_path / "old" / "artifacts")

    def build(root, selection, trainer=None, tags=None, keep=2):
        resources = {**default_resources(), "storage": PipelineStorage(data_root=str(data), artifact_root=str(root),
                                                                       keep_weight_versions=keep)}
        if trainer is not None:
            resources["trainer"] = trainer
        res = dg.materialize([*ASSETS, *CHECKS], selection=selection, partition_key="rex", instance=instance,
                             resources=resources, tags=tags)
        assert res.success
        return {e.materialization.asset_key.to_user_string(): e.materialization
                for e in res.get_asset_materialization_events()}

    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("concepts", ["rex"])
        build(old_root, DATASET | dg.AssetSelection.assets("lora_adapter"))
        storage_old = PipelineStorage(data_root=str(data), artifact_root=str(old_root))
        trained = current_output(storage_old.layout(), "rex", "lora_adapter")
        manifest = read_table(old_root / "concepts" / "rex" / "raw_images" / "manifest.parquet")
        assert not any(p.startswith("/") for p in manifest["decoded_path"])  # stored relative to the root

        new_root = tmp_path / "restored" / "artifacts"
        shutil.move(str(tmp_path / "old"), str(tmp_path / "restored"))  # the old place no longer exists
        assert not old_root.exists()
        storage = PipelineStorage(data_root=str(data), artifact_root=str(new_root))

        # Lineage, both directions.
        moved = current_output(storage.layout(), "rex", "lora_adapter")
        assert moved == new_root / trained.relative_to(old_root) and moved.is_dir()
        sha = manifest["image_sha256"][0]
        found = outputs_trained_on(new_root, sha)
        assert list(found["output"]) == [str(moved)] and list(found["current"]) == [True]
        assert sha in set(audit_output(moved, data)["image_sha256"])

        # Reuse: the same job finds its output at the new place and trains nothing.
        mats = build(new_root, dg.AssetSelection.assets("lora_adapter"), trainer=NoTraining(device="cpu"))
        assert mats["lora_adapter"].metadata["reused"].value is True
        assert mats["lora_adapter"].metadata["path"].value == str(moved)

        # Caches: rebuilding the dataset half computes nothing.
        mats = build(new_root, DATASET)
        for asset in ("raw_images", "captioned_images", "clip_scored_images", "vae_latents"):
            assert mats[asset].metadata["items_computed"].value == 0, asset

        # Training: a forced retrain reads the moved latents and photos and writes into the new root. Retention
        # (newest 1 kept here) then prunes the replaced version's weights; its lineage still answers.
        mats = build(new_root, dg.AssetSelection.assets("lora_adapter"), tags={FORCE_RETRAIN_TAG: "true"}, keep=1)
        newest = current_output(storage.layout(), "rex", "lora_adapter")
        assert newest != moved and newest.parent == moved.parent
        lineage = json.loads((newest / "lineage.json").read_text())
        assert {r["image_sha256"] for r in lineage["training_images"]} == set(manifest["image_sha256"])
        assert list(newest.glob("*.safetensors")) and not list(moved.glob("*.safetensors"))
        found = outputs_trained_on(new_root, sha).set_index("output")
        assert found.loc[str(moved), "weights_pruned"] and not found.loc[str(newest), "weights_pruned"]
