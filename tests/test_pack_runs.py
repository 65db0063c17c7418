"""Pack runs through Dagster (issue 26, points 4-5): the nightly retraining launches one run per pack; each concept
gets its own materialization of its own partition, with the data version, metadata, files and checks of a solo
training, and Dagster sees it up to date afterwards; a concept that fails fails alone; the pack is a fact of the
lineage, not of the job identity."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import dagster as dg
import pytest

from dagster._core.definitions.data_version import StaleStatus

from assets_pipeline.training.reuse import current_output
from conftest import link_models
from helpers import encode, photo, photos, write_concept

pytestmark = pytest.mark.slow
SPEC = 'token = "sks"\nclass_noun = "dog"\nmethods = ["lora"]\n'
DATASET = dg.AssetSelection.groups("dataset", "priors", "latents")
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "coins"]
PACKED = ["a", "b", "c"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, built_models):
    from types import SimpleNamespace

    from assets_pipeline.assets.packs import train_packs_job
    from assets_pipeline.definitions import ASSETS, CHECKS, default_resources
    from assets_pipeline.resources import PipelineStorage

    root = tmp_path_factory.mktemp("packs")
    data = root / "data"
    storage = PipelineStorage(data_root=str(data), artifact_root=str(link_models(built_models, root / "art")))
    for i, concept in enumerate(PACKED):
        write_concept(data, concept, photos(PHOTOS[i:i + 4]), SPEC)
    # DoRA has no packed layer: it trains alone, and the schedule says why
    write_concept(data, "dora", photos(PHOTOS[:4]), SPEC + '[lora]\nvariant = "dora"\n')
    (root / "dagster_home").mkdir()
    instance = dg.DagsterInstance.local_temp(tempdir=str(root / "dagster_home"))
    concepts = [*PACKED, "dora"]
    instance.add_dynamic_partitions("concepts", concepts)
    resources = {**default_resources(), "storage": storage}
    defs = dg.Definitions(assets=ASSETS, asset_checks=CHECKS, jobs=[train_packs_job], resources=resources)
    for concept in concepts:
        assert dg.materialize([*ASSETS, *CHECKS], selection=DATASET, partition_key=concept, instance=instance,
                              resources=resources).success

    def run(request):  # a schedule's run request, launched as the daemon launches it
        return defs.resolve_job_def("train_packs").execute_in_process(
            instance=instance, run_config=request.run_config, tags=request.tags, raise_on_error=False)

    def pack(concepts, tags=None):
        return run(dg.RunRequest(run_config={"ops": {"train_pack": {"config": {"concepts": concepts}}}},
                                 tags=tags or {}))

    yield SimpleNamespace(storage=storage, data=data, instance=instance, resources=resources, defs=defs, run=run,
                          pack=pack, assets=ASSETS, checks=CHECKS)
    instance.dispose()


def tick(world):
    from assets_pipeline.schedules import retrain_schedule

    with dg.build_schedule_context(instance=world.instance, resources=world.resources,
                                   scheduled_execution_time=datetime(2026, 12, 6, 3, tzinfo=timezone.utc)) as ctx:
        return retrain_schedule(ctx)


def stale_status(world, concept: str):
    """What Dagster's UI and automation compute for the partition (its internal resolver: a Dagster that changes
    how provenance is recorded fails here)."""
    from dagster._utils.test.data_versions import get_stale_status_resolver

    return get_stale_status_resolver(world.instance, world.assets).get_status(dg.AssetKey("lora_adapter"), concept)


def test_the_nightly_retraining_is_one_run_per_pack_and_each_concept_materializes_its_own_partition(world):
    from assets_pipeline.assets.packs import PACK_TAG, UNPACKED_TAG
    from assets_pipeline.training.reuse import find_reusable

    requests = tick(world)
    configs = [r.run_config["ops"]["train_pack"]["config"] for r in requests]
    assert configs == [{"method": "lora", "concepts": ["dora"]}, {"method": "lora", "concepts": PACKED}]
    alone, packed = requests
    assert "[lora] variant = 'dora'" in alone.tags[UNPACKED_TAG] and packed.tags[PACK_TAG] == "lora x 3"
    assert UNPACKED_TAG not in packed.tags and "a: no trained output yet" in packed.tags["retrain/reason"]

    result = world.run(packed)
    assert result.success
    mats = {e.materialization.partition: e.materialization for e in result.get_asset_materialization_events()}
    assert set(mats) == set(PACKED)
    layout = world.storage.layout()
    for concept in PACKED:
        out = current_output(layout, concept, "lora_adapter")
        lineage = json.loads((out / "lineage.json").read_text())
        # a fact of how it was trained, in its lineage: the concepts of its pack (one line each in `lineage`)
        assert lineage["pack"] == {"concepts": PACKED, "size": 3} and lineage["run_id"] == result.run_id
        assert json.loads((out / "metrics.json").read_text())["training_speed"]["packed_with"] == [
            c for c in PACKED if c != concept]
        mat = mats[concept]
        assert mat.asset_key == dg.AssetKey("lora_adapter")
        # the data version a solo training reports: the digest of its weights' tensors (what reuse reads back)
        reuse, _ = find_reusable(out, _job(world, concept), _code_version())
        assert mat.tags["dagster/data_version"] == reuse.data_version
        assert mat.metadata["reused"].value is False and mat.metadata["steps"].value == lineage["steps"]
        assert {"method_config", "loss_curve", "training_images", "clip_t", "packed_with"} <= set(mat.metadata)
        # the materialization the UI shows on the concept's own partition page
        [latest] = world.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("lora_adapter"), asset_partitions=[concept]), limit=1).records
        assert latest.run_id == result.run_id
        assert stale_status(world, concept) == StaleStatus.FRESH  # provenance recorded as an asset step's
    checks = {(e.partition, e.check_name): e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {(c, n): True for c in PACKED
                      for n in ("weights_finite", "changes_base_output", "manifest_lists_training_images")}

    # the schedule and the assets see them up to date: the next tick trains only the DoRA concept
    assert [r.run_config["ops"]["train_pack"]["config"]["concepts"] for r in tick(world)] == [["dora"]]
    rerun = world.pack(["a"])  # a run of an up-to-date concept reuses, as the asset does
    [mat] = [e.materialization for e in rerun.get_asset_materialization_events()]
    assert rerun.success and mat.metadata["reused"].value is True
    assert mat.tags["dagster/data_version"] == mats["a"].tags["dagster/data_version"]

    # a changed input makes exactly that concept's partition stale, as for a solo materialization
    assert dg.materialize([*world.assets, *world.checks], selection=DATASET, partition_key="b",
                          instance=world.instance, resources=world.resources).success  # same photos: same versions
    assert stale_status(world, "b") == StaleStatus.FRESH
    (world.data / "b" / "extra.png").write_bytes(encode(photo("coins", (88, 72)).convert("RGB"), "PNG"))
    assert dg.materialize([*world.assets, *world.checks], selection=DATASET, partition_key="b",
                          instance=world.instance, resources=world.resources).success
    assert stale_status(world, "b") == StaleStatus.STALE and stale_status(world, "c") == StaleStatus.FRESH


def test_a_packed_output_equals_the_one_its_concept_trains_alone(world):
    """Issue 26, point 3 end to end: the solo asset step (forced) trains the same job; each tensor within 1e-5."""
    from safetensors.torch import load_file

    from assets_pipeline.training.reuse import FORCE_RETRAIN_TAG

    layout = world.storage.layout()
    packed = current_output(layout, "c", "lora_adapter")
    if packed is None or "pack" not in json.loads((packed / "lineage.json").read_text()):
        assert world.pack(PACKED, {FORCE_RETRAIN_TAG: "true"}).success
        packed = current_output(layout, "c", "lora_adapter")
    solo = dg.materialize([*world.assets, *world.checks], selection=dg.AssetSelection.assets("lora_adapter"),
                          partition_key="c", instance=world.instance, resources=world.resources,
                          tags={FORCE_RETRAIN_TAG: "true"})
    assert solo.success
    alone = current_output(layout, "c", "lora_adapter")
    assert alone != packed and "pack" not in json.loads((alone / "lineage.json").read_text())
    assert json.loads((alone / "lineage.json").read_text())["job_identity"] == \
        json.loads((packed / "lineage.json").read_text())["job_identity"]  # the pack is not part of the identity
    files = sorted(p.relative_to(packed) for p in packed.rglob("*.safetensors"))  # diffusers' and kohya's
    assert files == sorted(p.relative_to(alone) for p in alone.rglob("*.safetensors")) and len(files) == 2
    for weights in files:
        a, b = load_file(packed / weights), load_file(alone / weights)
        assert a.keys() == b.keys() and len(a) > 0
        worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        assert worst <= 1e-5, (weights, worst)


def test_a_concept_that_fails_fails_its_own_partition_and_its_pack_mates_materialize(world):
    from dagster._core.storage.partition_status_cache import get_and_update_asset_status_cache_value

    from assets_pipeline.partitions.definitions import concepts_partitions
    from assets_pipeline.training.reuse import FORCE_RETRAIN_TAG

    # 1e30 is a finite learning rate: the concept's first step sends its loss to NaN (training/loop.py)
    write_concept(world.data, "wild", photos(PHOTOS[2:6]), SPEC + "[lora]\nlearning_rate = 1e30\n")
    world.instance.add_dynamic_partitions("concepts", ["wild"])
    assert dg.materialize([*world.assets, *world.checks], selection=DATASET, partition_key="wild",
                          instance=world.instance, resources=world.resources).success
    before = current_output(world.storage.layout(), "a", "lora_adapter")
    result = world.pack(["a", "wild"], {FORCE_RETRAIN_TAG: "true"})
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    error = failure.event_specific_data.error.message  # the run's failure names the concept and its cause
    assert "1 of 2 concept(s) failed; the others are materialized: wild: DivergedTraining" in error
    assert "learning_rate in wild/concept.toml" in error
    assert [e.materialization.partition for e in result.get_asset_materialization_events()] == ["a"]
    after = current_output(world.storage.layout(), "a", "lora_adapter")
    assert after != before and json.loads((after / "lineage.json").read_text())["pack"]["concepts"] == ["a", "wild"]
    assert current_output(world.storage.layout(), "wild", "lora_adapter") is None  # nothing of it made current
    # Dagster's partition status: "a" materialized, "wild" failed (planned by a failed run, never materialized)
    status = get_and_update_asset_status_cache_value(world.instance, dg.AssetKey("lora_adapter"), concepts_partitions)
    assert "wild" in status.deserialize_failed_partition_subsets(concepts_partitions).get_partition_keys()
    failed = status.deserialize_failed_partition_subsets(concepts_partitions).get_partition_keys()
    assert "a" not in failed
    assert "a" in status.deserialize_materialized_partition_subsets(concepts_partitions).get_partition_keys()


def test_lineage_names_the_concepts_a_packed_output_trained_with(world, capsys, monkeypatch):
    from assets_pipeline import cli
    from assets_pipeline.paths import ARTIFACTS_ENV, DATA_ENV
    from assets_pipeline.training.reuse import FORCE_RETRAIN_TAG

    out = current_output(world.storage.layout(), "b", "lora_adapter")
    if out is None or "pack" not in json.loads((out / "lineage.json").read_text()):  # this test run alone
        assert world.pack(PACKED, {FORCE_RETRAIN_TAG: "true"}).success
        out = current_output(world.storage.layout(), "b", "lora_adapter")
    monkeypatch.setenv(DATA_ENV, world.storage.data_root)
    monkeypatch.setenv(ARTIFACTS_ENV, world.storage.artifact_root)
    assert cli.main(["lineage", "output", str(out)]) in (0, 1)
    err = capsys.readouterr().err
    assert "trained in a pack of 3" in err
    for concept in PACKED:
        assert f"\n  {concept}" in err


def _job(world, concept):
    from assets_pipeline.training.plan import plan_job

    layout = world.storage.layout()
    spec = layout.spec(concept)
    return plan_job(layout, world.resources["base_model"].resolve(layout.root, spec), spec, "lora", run_id="t",
                    data_root=world.storage.data_path(), launch=world.resources["trainer"].launch_settings(),
                    scorer=world.resources["clip_scorer"].settings())


def _code_version():
    from assets_pipeline.training.plan import CODE_VERSION

    return CODE_VERSION

