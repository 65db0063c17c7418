"""assets/batch.py: new concepts' datasets built many per run, each concept's partitions materialized as its asset
steps would (own data versions, provenance, checks), a failing concept failing alone (issue 27, point 3)."""

from __future__ import annotations

import dagster as dg
import pytest

from helpers import encode, photo, photos, write_concept

pytestmark = pytest.mark.slow

SPEC = 'token = "sks"\nclass_noun = "dog"\nmethods = ["lora"]\n'
DATASET = ["raw_images", "captioned_images", "filtered_images", "clip_scored_images", "control_images",
           "class_images", "vae_latents"]


def test_a_batch_builds_each_concept_as_its_asset_steps_would_and_a_failing_concept_fails_alone(
        tmp_path, built_models, capfd):
    from assets_pipeline.assets.batch import build_concepts_job
    from assets_pipeline.automation import dataset_automation_sensor
    from assets_pipeline.definitions import ASSETS, CHECKS, default_resources
    from assets_pipeline.resources import PipelineStorage
    from conftest import link_models
    from test_sensors import built, tick

    data = tmp_path / "data"
    storage = PipelineStorage(data_root=str(data), artifact_root=str(link_models(built_models, tmp_path / "art")))
    write_concept(data, "alpha", photos(["astronaut", "chelsea", "coffee", "rocket"]), SPEC)
    write_concept(data, "beta", photos(["astronaut", "chelsea", "coffee", "hubble_deep_field"]), SPEC)
    write_concept(data, "tiny", photos(["coffee"]), SPEC)  # one photo: its blocking check fails
    resources = {**default_resources(), "storage": storage}
    defs = dg.Definitions(assets=ASSETS, asset_checks=CHECKS, jobs=[build_concepts_job], resources=resources)
    job = defs.resolve_job_def("build_concepts")

    def evaluate(cursor):
        res = dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                                asset_selection=dataset_automation_sensor.asset_selection,
                                                cursor=cursor)
        return res, {k.to_user_string(): set(res.get_requested_partitions(k))
                     for k in (dg.AssetKey(a) for a in DATASET) if res.get_requested_partitions(k)}

    with dg.DagsterInstance.ephemeral() as instance:
        auto, _ = evaluate(None)
        first = tick(instance, data, storage.artifact_root)  # registers all three, one batch run requested
        [request] = first.run_requests
        assert built(first) == [["alpha", "beta", "tiny"]]
        auto, requested = evaluate(auto.cursor)
        assert requested == {}  # new concepts are the batch's, not automation's
        res = job.execute_in_process(run_config=request.run_config, instance=instance, raise_on_error=False,
                                     tags=request.tags)
        assert not res.success
        failure = next(e for e in res.all_events if e.event_type_value == "STEP_FAILURE")
        assert ("1 of 3 concept(s) failed; the others are built: tiny: blocking check enough_training_images "
                "of clip_scored_images failed") in failure.step_failure_data.error.message

        mats = {(e.materialization.asset_key.to_user_string(), e.materialization.partition): e.materialization
                for e in res.get_asset_materialization_events()}
        for concept in ("alpha", "beta"):
            assert all((a, concept) in mats for a in DATASET)
        assert ("vae_latents", "tiny") not in mats and ("class_images", "tiny") in mats  # only its downstream waits
        assert mats[("raw_images", "alpha")].tags["dagster/data_version"] != \
            mats[("raw_images", "beta")].tags["dagster/data_version"]  # each concept its own version
        planned = instance.all_logs(res.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED)
        assert len(planned) == 3 * len(DATASET)  # announced at its start: in progress for the UI and automation
        checks = {(c.check_name, c.partition): c for c in res.get_asset_check_evaluations()}
        assert checks[("subset_captioned", "alpha")].passed  # each concept's checks on its own partition
        assert checks[("enough_training_images", "alpha")].severity == dg.AssetCheckSeverity.WARN  # 4 photos
        assert checks[("enough_training_images", "tiny")].severity == dg.AssetCheckSeverity.ERROR

        # the same partitions an asset run makes: materializing alpha's assets again computes nothing new and
        # gives every asset the data version the batch gave it
        again = dg.materialize(ASSETS, selection=DATASET, partition_key="alpha", instance=instance,
                               resources=resources)
        for e in again.get_asset_materialization_events():
            m = e.materialization
            assert m.tags["dagster/data_version"] == mats[(m.asset_key.to_user_string(), "alpha")].tags[
                "dagster/data_version"], m.asset_key
        # the provenance Dagster's staleness reads: nothing built by the batch is stale
        from dagster._utils.test.data_versions import get_stale_status_resolver

        resolver = get_stale_status_resolver(instance, ASSETS)
        for asset in DATASET:
            assert resolver.get_status(dg.AssetKey(asset), "beta").value == "FRESH", asset

        # a new photo in beta: observed by the sensor, then automation rebuilds beta's chain only
        auto, requested = evaluate(auto.cursor)
        (data / "beta" / "coins.png").write_bytes(encode(photo("coins", (96, 80)), "PNG"))
        changed = tick(instance, data, storage.artifact_root, first.cursor)
        assert [e.partition for e in changed.asset_events] == ["beta"] and changed.run_requests == []
        auto, requested = evaluate(auto.cursor)
        assert requested == {asset: {"beta"} for asset in DATASET}


def test_a_concept_removed_before_its_batch_ran_fails_alone(tmp_path, built_models):
    from assets_pipeline.assets.batch import build_concepts_job
    from assets_pipeline.definitions import ASSETS, CHECKS, default_resources
    from assets_pipeline.resources import PipelineStorage
    from conftest import link_models

    data = tmp_path / "data"
    storage = PipelineStorage(data_root=str(data), artifact_root=str(link_models(built_models, tmp_path / "art")))
    write_concept(data, "alpha", photos(["astronaut", "chelsea", "coffee", "rocket"]), SPEC)
    defs = dg.Definitions(assets=ASSETS, asset_checks=CHECKS, jobs=[build_concepts_job],
                          resources={**default_resources(), "storage": storage})
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("concepts", ["alpha"])
        res = defs.resolve_job_def("build_concepts").execute_in_process(
            run_config={"ops": {"build_inputs": {"config": {"concepts": ["ghost", "alpha"]}}}}, instance=instance,
            raise_on_error=False)
    assert not res.success
    failure = next(e for e in res.all_events if e.event_type_value == "STEP_FAILURE")
    assert "1 of 2 concept(s) failed; the others are built: ghost: not a partition of 'concepts'" in \
        failure.step_failure_data.error.message
    built = {(e.materialization.asset_key.to_user_string(), e.materialization.partition)
             for e in res.get_asset_materialization_events()}
    assert ("vae_latents", "alpha") in built and not any(p == "ghost" for _, p in built)
