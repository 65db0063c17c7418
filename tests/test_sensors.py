"""sensors.py: concept folders become partitions; a run is requested when a concept's content changes."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from assets_pipeline.partitions.discovery import folder_digest, scan_concepts
from assets_pipeline.resources import PipelineStorage
from assets_pipeline.sensors import MAX_RUNS_PER_TICK, concept_folder_sensor
from helpers import encode, photo, write_concept


@pytest.fixture
def instance():
    with dg.DagsterInstance.ephemeral() as inst:
        yield inst


def tick(instance, data_root, artifact_root, cursor=None) -> dg.SensorResult:
    with dg.build_sensor_context(
        instance=instance, cursor=cursor,
        resources={"storage": PipelineStorage(data_root=str(data_root), artifact_root=str(artifact_root))},
    ) as ctx:
        result = concept_folder_sensor(ctx)
    # What the daemon does with the result: register the partitions it asked for.
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def added(result) -> list[str]:
    return [k for r in result.dynamic_partitions_requests or [] for k in r.partition_keys]


def test_new_concept_is_registered_and_built_bad_names_are_not(instance, data_root, tmp_path, capfd):
    write_concept(data_root, "rusty", {"a.png": encode(photo("chelsea", (64, 64)), "PNG")})
    write_concept(data_root, "Bad Name!", {"a.png": encode(photo("coffee", (64, 64)), "PNG")})
    write_concept(data_root, "no-spec", {"a.png": encode(photo("coffee", (64, 64)), "PNG")}, spec=None)
    (data_root / ".hidden").mkdir()

    result = tick(instance, data_root, tmp_path / "art")
    log = capfd.readouterr().err  # the sensor's context.log goes to Dagster's console handler
    assert added(result) == ["rusty"]
    assert [r.partition_key for r in result.run_requests] == ["rusty"]
    assert instance.get_dynamic_partitions("concepts") == ["rusty"]
    assert "ignoring folder 'Bad Name!'" in log and "ignoring folder 'no-spec'" in log  # reported, never a key
    assert json.loads(result.cursor) == {"rusty": folder_digest(data_root / "rusty")}

    scan = scan_concepts(data_root)
    assert set(scan.invalid) == {"Bad Name!", "no-spec"}
    assert "valid concept name" in scan.invalid["Bad Name!"]


def test_unchanged_folder_requests_nothing_and_a_new_photo_requests_again(instance, data_root, tmp_path):
    folder = write_concept(data_root, "rusty", {"a.png": encode(photo("chelsea", (64, 64)), "PNG")})
    first = tick(instance, data_root, tmp_path / "art")
    assert len(first.run_requests) == 1

    second = tick(instance, data_root, tmp_path / "art", first.cursor)
    assert second.run_requests == [] and added(second) == []
    assert json.loads(second.cursor) == json.loads(first.cursor)

    (folder / "b.jpg").write_bytes(encode(photo("astronaut", (64, 64)), "JPEG"))
    third = tick(instance, data_root, tmp_path / "art", second.cursor)
    assert [r.partition_key for r in third.run_requests] == ["rusty"]
    assert third.run_requests[0].run_key != first.run_requests[0].run_key  # a new run, not deduplicated away
    assert added(third) == []  # already a partition


def test_work_per_tick_is_bounded(instance, data_root, tmp_path):
    names = [f"c{i:02d}" for i in range(MAX_RUNS_PER_TICK + 3)]
    for name in names:
        write_concept(data_root, name, {"a.png": b"x"})
    first = tick(instance, data_root, tmp_path / "art")
    assert sorted(added(first)) == names
    assert len(first.run_requests) == MAX_RUNS_PER_TICK
    second = tick(instance, data_root, tmp_path / "art", first.cursor)
    assert sorted(r.partition_key for r in second.run_requests) == names[MAX_RUNS_PER_TICK:]
    third = tick(instance, data_root, tmp_path / "art", second.cursor)
    assert third.run_requests == []


def test_missing_data_root_is_not_an_error(instance, tmp_path):
    result = tick(instance, tmp_path / "nowhere", tmp_path / "art")
    assert result.run_requests == [] and added(result) == []


def test_folder_with_broken_concept_toml_is_reported_not_built(instance, data_root, tmp_path, capfd):
    folder = write_concept(data_root, "rusty", {"a.png": encode(photo("chelsea", (64, 64)), "PNG")})
    (folder / "concept.toml").write_text('token = "sks"\nmethods = ["lora", "hypernetwork"]\n')
    result = tick(instance, data_root, tmp_path / "art")
    assert added(result) == [] and result.run_requests == []
    assert "unknown methods ['hypernetwork']" in capfd.readouterr().err
    (folder / "concept.toml").write_text('token = "sks"\nmethods = ["lora"]\n')  # fixed: now it is built
    assert [r.partition_key for r in tick(instance, data_root, tmp_path / "art").run_requests] == ["rusty"]
