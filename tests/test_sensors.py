"""sensors.py: concept folders become partitions; a folder that changed is reported once, as a new data version of
``concept_folders``, and automation rebuilds that concept's raw_images; the sensor's state is not in its cursor."""

from __future__ import annotations

import json
import os
import time

import dagster as dg
import pytest

from assets_pipeline import sensors
from assets_pipeline.partitions.discovery import FolderIndex, folder_digest, scan_concepts
from assets_pipeline.resources import PipelineStorage
from assets_pipeline.sensors import concept_folder_sensor, reported_versions
from helpers import encode, photo, write_concept


@pytest.fixture
def instance():
    with dg.DagsterInstance.ephemeral() as inst:
        yield inst


def tick(instance, data_root, artifact_root, cursor=None, store=True) -> dg.SensorResult:
    with dg.build_sensor_context(
        instance=instance, cursor=cursor,
        resources={"storage": PipelineStorage(data_root=str(data_root), artifact_root=str(artifact_root))},
    ) as ctx:
        result = concept_folder_sensor(ctx)
    # What the daemon does with the result: record its observations, register the partitions it asked for.
    if store:
        for event in result.asset_events:
            instance.report_runless_asset_event(event)
        for request in result.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def added(result) -> list[str]:
    return [k for r in result.dynamic_partitions_requests or [] for k in r.partition_keys]


def batch_ran(instance, data_root, result, ingest=False) -> None:
    """What the batch builds a tick requested do first, per concept: report its folder's version (and, with
    ``ingest``, a raw_images materialization standing in for the ingest)."""
    from assets_pipeline.assets.batch import observe_folder

    storage = PipelineStorage(data_root=str(data_root), artifact_root=str(data_root.parent / "unused"))
    for concepts in built(result):
        for concept in concepts:
            for event in observe_folder(instance, storage, concept):
                instance.report_runless_asset_event(event)
            if ingest:
                instance.report_runless_asset_event(dg.AssetMaterialization(
                    "raw_images", partition=concept, tags={"dagster/data_version": f"v-{concept}"}))


def built(result) -> list[list[str]]:
    """The concepts of each batch build the tick requested."""
    assert all(r.job_name == "build_concepts" for r in result.run_requests)
    return [r.run_config["ops"]["build_inputs"]["config"]["concepts"] for r in result.run_requests]


def observed(result) -> dict[str, str]:
    return {e.partition: e.tags["dagster/data_version"] for e in result.asset_events}


def age(folder, seconds=60):
    """Every file and folder under ``folder`` made ``seconds`` old: no longer within the index's racy window."""
    t = time.time() - seconds
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            os.utime(os.path.join(dirpath, name), (t, t))
        os.utime(dirpath, (t, t))


def test_new_concept_is_registered_and_built_in_a_batch_bad_names_are_not(instance, data_root, tmp_path, capfd):
    write_concept(data_root, "rusty", {"a.png": encode(photo("chelsea", (64, 64)), "PNG")})
    write_concept(data_root, "Bad Name!", {"a.png": encode(photo("coffee", (64, 64)), "PNG")})
    write_concept(data_root, "no-spec", {"a.png": encode(photo("coffee", (64, 64)), "PNG")}, spec=None)
    (data_root / ".hidden").mkdir()

    result = tick(instance, data_root, tmp_path / "art")
    log = capfd.readouterr().err  # the sensor's context.log goes to Dagster's console handler
    assert added(result) == ["rusty"] and built(result) == [["rusty"]]
    assert observed(result) == {}  # a new concept's first version is its batch's to report, with its ingest
    assert instance.get_dynamic_partitions("concepts") == ["rusty"]
    assert "ignoring folder 'Bad Name!'" in log and "ignoring folder 'no-spec'" in log  # reported, never a key
    assert json.loads(result.cursor) == {"_tick": 1, "_verify_from": "rusty"}  # no per-concept state

    scan = scan_concepts(data_root)
    assert set(scan.invalid) == {"Bad Name!", "no-spec"}
    assert "valid concept name" in scan.invalid["Bad Name!"]


def test_a_registered_concept_never_observed_and_in_no_pending_batch_is_observed(instance, data_root, tmp_path):
    """The batch build that would have reported it died first: the sensor reports it, and automation builds it.
    While its batch run is queued, it is left to the batch."""
    write_concept(data_root, "rusty", {"a.png": b"x"})
    first = tick(instance, data_root, tmp_path / "art")
    [request] = first.run_requests
    from assets_pipeline.assets.batch import build_concepts_job

    run = instance.create_run_for_job(build_concepts_job, run_config=request.run_config)  # not started yet
    assert tick(instance, data_root, tmp_path / "art", first.cursor).asset_events == []  # pending: the batch's
    instance.report_run_failed(run)
    assert observed(tick(instance, data_root, tmp_path / "art", first.cursor)) == {
        "rusty": folder_digest(data_root / "rusty")}
    assert reported_versions(instance, ["rusty"]) == {"rusty": folder_digest(data_root / "rusty")}


def test_unchanged_folder_reports_nothing_and_a_new_photo_reports_that_concept_only(instance, data_root, tmp_path):
    folder = write_concept(data_root, "rusty", {"a.png": encode(photo("chelsea", (64, 64)), "PNG")})
    write_concept(data_root, "tabby", {"a.png": encode(photo("coffee", (64, 64)), "PNG")})
    first = tick(instance, data_root, tmp_path / "art")
    assert built(first) == [["rusty", "tabby"]]  # one run for both
    batch_ran(instance, data_root, first)

    second = tick(instance, data_root, tmp_path / "art", first.cursor)
    assert second.asset_events == [] and added(second) == [] and second.run_requests == []
    assert "2 concept folder(s), none new or changed" in second.skip_reason.skip_message

    (folder / "b.jpg").write_bytes(encode(photo("astronaut", (64, 64)), "JPEG"))
    third = tick(instance, data_root, tmp_path / "art", second.cursor)
    assert observed(third) == {"rusty": folder_digest(folder)} and added(third) == [] and built(third) == []
    assert reported_versions(instance, ["rusty", "tabby"])["rusty"] == folder_digest(folder)
    assert tick(instance, data_root, tmp_path / "art", third.cursor).asset_events == []


def test_a_steady_tick_stats_folders_not_files_and_a_file_rewritten_in_place_is_found_by_verification(data_root):
    folders = [write_concept(data_root, f"c{i}", {"a.png": b"1", "sub/b.png": b"2"}) for i in range(4)]
    for f in folders:
        age(f)
    index = FolderIndex(data_root)
    first = index.scan(verify_budget_s=0)
    assert sorted(first.read) == ["c0", "c1", "c2", "c3"]  # new to the index: read in full
    digests = dict(first.concepts)
    second = index.scan(first.verify_from, verify_budget_s=0)
    assert len(second.read) == 1 and second.verified == 1  # only the folder the verification pass reached
    # c2/sub/b.png rewritten in place, its folders' mtimes put back: no stat of a folder shows it...
    target = data_root / "c2" / "sub" / "b.png"
    sub_mtime, root_mtime = os.stat(target.parent).st_mtime_ns, os.stat(data_root / "c2").st_mtime_ns
    target.write_bytes(b"22")
    os.utime(target.parent, ns=(sub_mtime, sub_mtime))
    os.utime(data_root / "c2", ns=(root_mtime, root_mtime))
    scans, position = [], second.verify_from
    for _ in range(4):  # ...the pass reads one folder a tick: within 4 ticks it reads c2 and finds it
        scans.append(index.scan(position, verify_budget_s=0))
        position = scans[-1].verify_from
    assert [s.concepts["c2"] != digests["c2"] for s in scans].count(True) >= 1
    assert scans[-1].concepts["c2"] == folder_digest(data_root / "c2")
    # a photo added in a sub-folder changes that sub-folder's mtime: found on the next tick, whatever the pass
    (data_root / "c1" / "sub" / "new.png").write_bytes(b"3")
    assert "c1" in index.scan(position, verify_budget_s=0).read


def test_reading_is_bounded_per_tick_and_the_rest_follows(data_root, tmp_path, instance, monkeypatch):
    names = [f"c{i:02d}" for i in range(5)]
    for name in names:
        write_concept(data_root, name, {"a.png": b"x"})
    monkeypatch.setattr(sensors, "READ_BUDGET_S", 0.0)  # spent after the first folder read
    seen, cursor = [], None
    for _ in range(5):
        result = tick(instance, data_root, tmp_path / "art", cursor)
        batch_ran(instance, data_root, result)
        seen += added(result)
        cursor = result.cursor
    assert sorted(seen) == names and len(set(seen)) == 5
    monkeypatch.setattr(sensors, "MAX_OBSERVATIONS_PER_TICK", 2)
    for name in names:
        (data_root / name / "b.png").write_bytes(b"y")
    monkeypatch.setattr(sensors, "READ_BUDGET_S", 60.0)
    first = tick(instance, data_root, tmp_path / "art", cursor)
    second = tick(instance, data_root, tmp_path / "art", first.cursor)
    third = tick(instance, data_root, tmp_path / "art", second.cursor)
    assert [len(r.asset_events) for r in (first, second, third)] == [2, 2, 1]
    assert sorted(observed(first) | observed(second) | observed(third)) == names


def test_a_tick_whose_result_was_not_stored_is_reported_again_and_a_restart_reports_only_changes(
        instance, data_root, tmp_path):
    folder = write_concept(data_root, "rusty", {"a.png": b"x"})
    write_concept(data_root, "tabby", {"a.png": b"x"})
    first = tick(instance, data_root, tmp_path / "art")
    batch_ran(instance, data_root, first)
    (folder / "b.png").write_bytes(b"y")
    lost = tick(instance, data_root, tmp_path / "art", first.cursor, store=False)  # the daemon died before storing
    assert set(observed(lost)) == {"rusty"}
    again = tick(instance, data_root, tmp_path / "art", lost.cursor)
    assert observed(again) == observed(lost)  # Dagster does not hold it: reported again
    # a code server restart empties the index: the folders are read again, and only a change is reported
    sensors._INDEXES.clear()
    assert tick(instance, data_root, tmp_path / "art", again.cursor).asset_events == []
    sensors._INDEXES.clear()
    (data_root / "tabby" / "c.png").write_bytes(b"z")
    assert set(observed(tick(instance, data_root, tmp_path / "art", again.cursor))) == {"tabby"}


def test_missing_data_root_is_not_an_error(instance, tmp_path):
    result = tick(instance, tmp_path / "nowhere", tmp_path / "art")
    assert result.asset_events == [] and added(result) == []


def test_folder_with_broken_concept_toml_is_reported_not_built(instance, data_root, tmp_path, capfd):
    folder = write_concept(data_root, "rusty", {"a.png": encode(photo("chelsea", (64, 64)), "PNG")})
    (folder / "concept.toml").write_text('token = "sks"\nmethods = ["lora", "hypernetwork"]\n')
    result = tick(instance, data_root, tmp_path / "art")
    assert added(result) == [] and result.asset_events == []
    assert "unknown methods ['hypernetwork']" in capfd.readouterr().err
    (folder / "concept.toml").write_text('token = "sks"\nmethods = ["lora"]\n')  # fixed: now it is built
    assert added(tick(instance, data_root, tmp_path / "art", result.cursor)) == ["rusty"]


def test_an_observed_change_makes_automation_rebuild_that_concepts_raw_images_only(instance, data_root, tmp_path):
    """The path from a folder to a build: a new concept is its batch's (automation requests nothing for it, even
    as the batch reports its first version); a changed folder's new version makes automation rebuild it."""
    from assets_pipeline.definitions import ASSETS, default_resources

    folder = write_concept(data_root, "rusty", {"a.png": b"x"})
    write_concept(data_root, "tabby", {"a.png": b"x"})
    defs = dg.Definitions(assets=ASSETS, resources={**default_resources(), "storage": PipelineStorage(
        data_root=str(data_root), artifact_root=str(tmp_path / "art"))})

    def evaluate(cursor):
        res = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor,
                                                asset_selection=sensors_target())
        return res, set(res.get_requested_partitions(dg.AssetKey("raw_images")))

    res, _ = evaluate(None)  # the automation's first tick, before any folder: records the state
    first = tick(instance, data_root, tmp_path / "art")
    res, raw = evaluate(res.cursor)
    assert raw == set()  # new concepts: their batch builds them
    batch_ran(instance, data_root, first, ingest=True)  # first version and ingest land together
    res, raw = evaluate(res.cursor)
    assert raw == set()
    (folder / "b.png").write_bytes(b"y")
    second = tick(instance, data_root, tmp_path / "art", first.cursor)
    assert set(observed(second)) == {"rusty"}
    res, raw = evaluate(res.cursor)
    assert raw == {"rusty"}
    instance.report_runless_asset_event(dg.AssetMaterialization("raw_images", partition="rusty",
                                                                tags={"dagster/data_version": "v2"}))
    assert evaluate(res.cursor)[1] == set()


def sensors_target():
    from assets_pipeline.automation import dataset_automation_sensor

    return dataset_automation_sensor.asset_selection


def test_a_mass_upload_is_registered_at_once_and_built_in_batches(instance, data_root, tmp_path, monkeypatch):
    from assets_pipeline.assets import batch

    monkeypatch.setattr(sensors, "BATCH_SIZE", 3)  # 100 in use
    names = [f"c{i:02d}" for i in range(7)]
    for name in names:
        write_concept(data_root, name, {"a.png": b"x"})
    lost = tick(instance, data_root, tmp_path / "art", store=False)  # a tick the daemon did not finish...
    first = tick(instance, data_root, tmp_path / "art")  # ...evaluated again: the same run keys (deduplicated)
    assert [r.run_key for r in lost.run_requests] == [r.run_key for r in first.run_requests]
    assert sorted(instance.get_dynamic_partitions("concepts")) == names  # registered in one tick
    assert built(first) == [names[0:3], names[3:6], names[6:]]
    assert [r.tags[batch.BATCH_TAG] for r in first.run_requests] == ["3", "3", "1"]
    assert len({r.run_key for r in first.run_requests}) == 3
    assert tick(instance, data_root, tmp_path / "art", first.cursor).run_requests == []
