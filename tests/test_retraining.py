"""Scheduled retraining of stale outputs, blocking dataset checks, and the lineage audit in both directions."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pytest

from assets_pipeline.training.reuse import current_output
from conftest import link_models
from helpers import encode, photo, photos, write_concept

pytestmark = pytest.mark.slow
SPEC = 'token = "sks"\nclass_noun = "dog"\nmethods = ["lora"]\n'
DATASET = dg.AssetSelection.groups("dataset", "priors", "latents")


@pytest.fixture(scope="module")
def world(tmp_path_factory, built_models):
    from types import SimpleNamespace

    from assets_pipeline.definitions import ASSETS, CHECKS, default_resources
    from assets_pipeline.resources import PipelineStorage

    root = tmp_path_factory.mktemp("retraining")
    data = root / "data"
    storage = PipelineStorage(data_root=str(data), artifact_root=str(link_models(built_models, root / "art")))
    write_concept(data, "rusty", photos(["astronaut", "chelsea", "coffee", "rocket"]), SPEC)
    write_concept(data, "tiny", photos(["astronaut", "chelsea"]), SPEC)  # too few photos to train
    # A temporary on-disk instance: schedule contexts with resources need an instance they can reference.
    (root / "dagster_home").mkdir()
    instance = dg.DagsterInstance.local_temp(tempdir=str(root / "dagster_home"))
    instance.add_dynamic_partitions("concepts", ["rusty", "tiny"])
    resources = {**default_resources(), "storage": storage}

    def materialize(concept, selection, raise_on_error=True):
        return dg.materialize([*ASSETS, *CHECKS], selection=selection, partition_key=concept, instance=instance,
                              resources=resources, raise_on_error=raise_on_error)

    first = materialize("rusty", DATASET | dg.AssetSelection.assets("lora_adapter"))
    v1 = current_output(storage.layout(), "rusty", "lora_adapter")
    return SimpleNamespace(storage=storage, data=data, instance=instance, resources=resources,
                           materialize=materialize, first=first, v1=v1)


def schedule_tick(world):
    from assets_pipeline.schedules import retrain_schedule

    # As the daemon does: the context is entered and exited (with a persistent instance it opens its own
    # DagsterInstance from the ref, and only exiting closes it).
    with dg.build_schedule_context(instance=world.instance, resources=world.resources,
                                   scheduled_execution_time=datetime(2026, 11, 27, 3, tzinfo=timezone.utc)) as ctx:
        return retrain_schedule(ctx)


def run_request(world, request):
    """Execute a schedule's run request as the daemon would launch it (its job, run config and tags)."""
    from assets_pipeline.assets.packs import train_packs_job
    from assets_pipeline.definitions import ASSETS, CHECKS

    defs = dg.Definitions(assets=ASSETS, asset_checks=CHECKS, jobs=[train_packs_job], resources=world.resources)
    return defs.resolve_job_def("train_packs").execute_in_process(
        instance=world.instance, run_config=request.run_config, tags=request.tags, raise_on_error=False)


def test_blocking_check_stops_training_of_a_concept_with_too_few_photos(world):
    res = world.materialize("tiny", DATASET | dg.AssetSelection.assets("lora_adapter"), raise_on_error=False)
    checks = {c.check_name: c for c in res.get_asset_check_evaluations()}
    assert not checks["enough_training_images"].passed
    assert checks["enough_training_images"].severity == dg.AssetCheckSeverity.ERROR
    assert checks["subset_captioned"].passed
    mats = {e.materialization.asset_key.to_user_string() for e in res.get_asset_materialization_events()}
    assert "clip_scored_images" in mats and "lora_adapter" not in mats and "vae_latents" not in mats


def test_schedule_skips_up_to_date_and_unready_concepts(world):
    from assets_pipeline.schedules import plan_retraining

    plan = {(d.concept, d.method): d for d in plan_retraining(
        world.storage, world.resources["base_model"], world.resources["clip_scorer"], world.resources["trainer"],
        ["rusty", "tiny"])}
    assert plan[("tiny", "*")].reason == "dataset not built yet"  # the blocking check stopped it before latents
    world.materialize("tiny", DATASET.without_checks())  # latents too: now the readiness rules themselves decide
    result = schedule_tick(world)
    assert isinstance(result, dg.SkipReason)
    plan = {(d.concept, d.method): d for d in plan_retraining(
        world.storage, world.resources["base_model"], world.resources["clip_scorer"], world.resources["trainer"],
        ["rusty", "tiny"])}
    assert plan[("rusty", "lora")].reason == "up to date"
    assert not plan[("tiny", "lora")].retrain and "at least 3" in plan[("tiny", "lora")].reason


def test_a_damaged_current_json_retrains_that_output_and_the_tick_decides_the_other_concepts(world):
    """Issue 28, point 11: one damaged record does not fail the schedule's whole tick."""
    from assets_pipeline.schedules import plan_retraining

    pointer = world.storage.layout().asset_dir("rusty", "lora_adapter") / "current.json"
    intact = pointer.read_bytes()
    pointer.write_bytes(intact[: len(intact) // 2])
    try:
        plan = {(d.concept, d.method): d for d in plan_retraining(
            world.storage, world.resources["base_model"], world.resources["clip_scorer"],
            world.resources["trainer"], ["rusty", "tiny"])}
    finally:
        pointer.write_bytes(intact)
    assert plan[("rusty", "lora")].retrain and str(pointer) in plan[("rusty", "lora")].reason
    assert "made current again" in plan[("rusty", "lora")].reason
    assert not plan[("tiny", "lora")].retrain and "at least 3" in plan[("tiny", "lora")].reason


def test_changed_photos_retrain_only_that_concept_and_history_stays_auditable(world):
    from assets_pipeline.hashing import sha256_file
    from assets_pipeline.lineage import audit_output, outputs_trained_on

    folder = world.data / "rusty"
    removed = sha256_file(folder / "rocket.png")
    (folder / "rocket.png").unlink()
    (folder / "coins.png").write_bytes(encode(photo("coins", (96, 80)).convert("RGB"), "PNG"))
    world.materialize("rusty", DATASET)

    requests = schedule_tick(world)
    assert [r.run_config["ops"]["train_pack"]["config"] for r in requests] == [
        {"method": "lora", "concepts": ["rusty"]}]
    assert requests[0].tags["retrain/reason"] == "rusty: training inputs changed"
    assert schedule_tick(world)[0].run_key == requests[0].run_key  # same tick, same inputs: same key

    assert run_request(world, requests[0]).success  # the run the schedule launches: train_packs, one concept
    v2 = current_output(world.storage.layout(), "rusty", "lora_adapter")
    assert v2 != world.v1 and world.v1.is_dir()
    old = {r["image_sha256"] for r in json.loads((world.v1 / "lineage.json").read_text())["training_images"]}
    new = {r["image_sha256"] for r in json.loads((v2 / "lineage.json").read_text())["training_images"]}
    assert removed in old and removed not in new and len(new) == 4
    assert isinstance(schedule_tick(world), dg.SkipReason)  # retrained: up to date again

    # image -> outputs: only the replaced output lists the removed photo
    hits = outputs_trained_on(Path(world.storage.artifact_root), removed)
    assert list(hits["output"]) == [str(world.v1)] and not hits["current"].any()
    # output -> sources, with each file's present state; works from a weights file too
    audit = audit_output(world.v1 / "pytorch_lora_weights.safetensors", world.data).set_index("image_sha256")
    assert audit.loc[removed, "status"] == "missing" and audit.loc[removed, "source_path"] == "rocket.png"
    assert (audit.drop(removed)["status"] == "unchanged").all()
    assert {"clip_score", "blur_variance", "caption"} <= set(audit.columns)
    assert (audit_output(v2, world.data)["status"] == "unchanged").all()


def test_lineage_cli_answers_both_directions(world, monkeypatch, capsys):
    from assets_pipeline.cli import main

    monkeypatch.setenv("ASSETS_PIPELINE_DATA", str(world.storage.data_root))
    monkeypatch.setenv("ASSETS_PIPELINE_ARTIFACTS", str(world.storage.artifact_root))
    assert main(["lineage", "output", str(world.v1), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["source_path"] for r in rows} >= {"astronaut.png", "chelsea.png", "coffee.png"}
    assert main(["lineage", "image", str(world.data / "rusty" / "astronaut.png"), "--format", "json"]) == 0
    outputs = json.loads(capsys.readouterr().out)
    assert str(world.v1) in {o["output"] for o in outputs}

