"""A concept whose folder is gone: the sensor says so and deletes nothing; ``assets-pipeline concept remove``
removes its partition and dataset artifacts (trained outputs only when asked), and nothing else."""

from __future__ import annotations

import json
import shutil

import dagster as dg
import pytest

from assets_pipeline.assets.models import MODEL_ASSETS
from assets_pipeline.cli import main
from assets_pipeline.definitions import ASSETS
from assets_pipeline.sensors import VANISHED
from helpers import snapshot, write_concept
from test_sensors import batch_ran, built, tick

TRAINED = [a.key.to_user_string() for a in MODEL_ASSETS]
DATASET = [a.key.to_user_string() for a in ASSETS if a.key.to_user_string() not in TRAINED]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A Dagster home, data root and artifact root as the CLI finds them: rusty's folder is gone, its
    partition and every asset's output are still there; 'other' is a live concept; the caches are shared."""
    roots = {"data": tmp_path / "data", "art": tmp_path / "art", "dagster": tmp_path / "dagster_home"}
    env = {"ASSETS_PIPELINE_DATA": "data", "ASSETS_PIPELINE_ARTIFACTS": "art", "DAGSTER_HOME": "dagster"}
    for var, key in env.items():
        roots[key].mkdir()
        monkeypatch.setenv(var, str(roots[key]))
    (roots["dagster"] / "dagster.yaml").write_text("")  # as dagster_home/ has one: the defaults, said quietly
    write_concept(roots["data"], "other", {"a.png": b"x"})
    for concept in ("rusty", "other"):
        for asset in DATASET + TRAINED:
            out = roots["art"] / "concepts" / concept / asset
            (out / "v1").mkdir(parents=True)
            (out / "v1" / "part.bin").write_bytes(b"\0" * 1000)
    (roots["art"] / "concepts" / "rusty" / f".raw_images.{'a' * 32}.tmp").mkdir()  # a crashed write's leftover
    (roots["art"] / "cache" / "images" / "ab").mkdir(parents=True)
    (roots["art"] / "cache" / "images" / "ab" / "abc.png").write_bytes(b"png")
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("concepts", ["rusty", "other"])
    return roots


def partitions() -> list[str]:
    with dg.DagsterInstance.get() as instance:
        return sorted(instance.get_dynamic_partitions("concepts"))


def remove(*argv: str) -> int:
    return main(["concept", "remove", *argv])


def test_sensor_warns_once_about_a_vanished_folder_and_deletes_nothing(data_root, tmp_path, capfd):
    art = tmp_path / "art"
    write_concept(data_root, "rusty", {"a.png": b"x"})
    with dg.DagsterInstance.ephemeral() as instance:
        first = tick(instance, data_root, art)
        batch_ran(instance, data_root, first)  # its batch build reported its folder
        (art / "concepts" / "rusty" / "raw_images").mkdir(parents=True)
        shutil.move(data_root / "rusty", tmp_path / "away")  # keeps mtimes: put back, it is the same folder
        capfd.readouterr()

        second = tick(instance, data_root, art, first.cursor)
        log = capfd.readouterr().err
        assert "'rusty' is registered but its folder" in log and "assets-pipeline concept remove rusty" in log
        assert "rusty" in second.skip_reason.skip_message and second.asset_events == []
        assert instance.get_dynamic_partitions("concepts") == ["rusty"]
        assert (art / "concepts" / "rusty" / "raw_images").is_dir()

        third = tick(instance, data_root, art, second.cursor)
        assert "rusty" not in capfd.readouterr().err  # warned once...
        assert "rusty" in third.skip_reason.skip_message  # ...and still visible on every tick

        shutil.move(tmp_path / "away", data_root / "rusty")
        back = tick(instance, data_root, art, third.cursor)
        assert back.asset_events == [] and "without a folder" not in back.skip_reason.skip_message  # unchanged
        assert VANISHED not in json.loads(back.cursor)


def test_missing_data_root_is_not_reported_as_removed_concepts(tmp_path, capfd):
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("concepts", ["rusty"])
        result = tick(instance, tmp_path / "unmounted", tmp_path / "art")
    assert "does not exist: 1 registered concept(s) not checked" in result.skip_reason.skip_message
    assert "concept remove" not in capfd.readouterr().err


def test_remove_keeps_trained_outputs_unless_asked(home, capsys):
    concept = home["art"] / "concepts" / "rusty"
    assert remove("rusty") == 0
    out = capsys.readouterr().out.splitlines()
    assert sorted(p.name for p in concept.iterdir()) == sorted(TRAINED)
    assert [line.split()[0] for line in out].count("removed") == len(DATASET) + 2  # + the temporary, the partition
    assert [line.split()[0] for line in out].count("kept") == len(TRAINED) + 1  # + the caches
    assert any(line.startswith("removed") and f"{concept / 'raw_images'}  (1 file, 1000 B)" in line for line in out)
    assert all("--with-trained-outputs" in line for line in out if "_model" in line or "lora_adapter" in line)
    assert partitions() == ["other"]
    assert (home["art"] / "cache" / "images" / "ab" / "abc.png").is_file()
    assert len(list((home["art"] / "concepts" / "other").iterdir())) == len(DATASET + TRAINED)

    # Later, the trained outputs too: the concept is still known by its artifact folder.
    assert remove("rusty", "--with-trained-outputs") == 0
    assert not concept.exists() and partitions() == ["other"]


def test_remove_with_trained_outputs_removes_the_whole_concept_folder(home, capsys):
    assert remove("rusty", "--with-trained-outputs") == 0
    assert not (home["art"] / "concepts" / "rusty").exists()
    assert partitions() == ["other"]
    kept = [line for line in capsys.readouterr().out.splitlines() if line.startswith("kept")]
    assert len(kept) == 1 and f"{home['art'] / 'cache'}: content-addressed caches are shared" in kept[0]


def test_removing_a_concept_another_lora_lists_says_so(home, capsys):
    snapshot = {"name": "other", "token": "zwx", "class_noun": "", "methods": ["lora"],
                "overrides": {"lora": {"datasets": [{"concept": "rusty", "repeats": 2}]}}}
    (home["art"] / "concepts" / "other" / "raw_images" / "concept.json").write_text(json.dumps(snapshot))
    assert remove("rusty", "--dry-run") == 0
    err = capsys.readouterr().err
    assert "concept 'other' trains 'rusty' into its LoRA ([[lora.datasets]] in other/concept.toml)" in err


def test_a_damaged_snapshot_of_another_concept_is_a_warning_after_the_removal(home, capsys):
    """Issue 28, point 11: whether another concept's LoRA lists the removed one is read from its raw_images
    snapshot; a damaged one is a warning naming it (and what to do), not a traceback after the removal."""
    snapshot_path = home["art"] / "concepts" / "other" / "raw_images" / "concept.json"
    snapshot_path.write_text('{"name": "other", "tok')
    assert remove("rusty") == 0
    assert partitions() == ["other"]
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"assets-pipeline concept remove: warning: {snapshot_path}: not valid JSON")
    assert "rematerialize raw_images for concept 'other'" in err and "\n" not in err


def test_dry_run_removes_nothing(home, capsys):
    before = snapshot(home["art"])
    assert remove("rusty", "--with-trained-outputs", "--dry-run") == 0
    out = capsys.readouterr().out
    assert snapshot(home["art"]) == before and partitions() == ["other", "rusty"]
    assert "would remove  partition 'rusty'" in out and out.rstrip().endswith("dry run: nothing was removed")


@pytest.mark.parametrize("name, error", [
    ("nobody", "unknown concept 'nobody'"),
    ("other", "still exists: move or delete it first"),
    ("../other", "not a valid concept name"),
    ("rusty/../other", "not a valid concept name"),
])
def test_refusals_are_one_line_and_touch_nothing(home, capsys, name, error):
    before = snapshot(home["art"])
    assert remove(name, "--with-trained-outputs") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and error in err
    assert snapshot(home["art"]) == before and partitions() == ["other", "rusty"]


def test_refuses_while_a_run_of_the_concept_is_in_progress(home, capsys):
    with dg.DagsterInstance.get() as instance:
        instance.add_run(dg.DagsterRun(job_name="build_concept", run_id="0" * 36, status=dg.DagsterRunStatus.STARTED,
                                       tags={"dagster/partition": "rusty"}))
    before = snapshot(home["art"])
    assert remove("rusty") == 2
    assert "is started: wait for it or terminate it first" in capsys.readouterr().err
    assert snapshot(home["art"]) == before and partitions() == ["other", "rusty"]


def test_links_out_of_the_artifact_root_are_never_followed(home, tmp_path, capsys):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    concept = home["art"] / "concepts" / "rusty"
    shutil.rmtree(concept / "raw_images")
    (concept / "raw_images").symlink_to(outside)
    assert remove("rusty", "--with-trained-outputs") == 0
    assert (outside / "keep.txt").read_text() == "mine"
    assert (concept / "raw_images").is_symlink() and sorted(p.name for p in concept.iterdir()) == ["raw_images"]
    assert "a symbolic link: not removed" in capsys.readouterr().out


def test_a_removed_concept_put_back_is_registered_and_ingested_again(home, tmp_path):
    """The whole flow on one instance: folder gone, `concept remove`, folder put back as it was: registered again
    and built again (its dataset outputs were removed), as a new concept is: a batch build."""
    write_concept(home["data"], "rusty", {"a.png": b"x"})
    with dg.DagsterInstance.get() as instance:
        first = tick(instance, home["data"], home["art"])
        assert built(first) == []  # both registered already (the fixture)
        shutil.move(home["data"] / "rusty", tmp_path / "away")
        gone = tick(instance, home["data"], home["art"], first.cursor)
        assert remove("rusty") == 0
        shutil.move(tmp_path / "away", home["data"] / "rusty")  # same files, same mtimes: the same digest
        back = tick(instance, home["data"], home["art"], gone.cursor)
        assert sorted(instance.get_dynamic_partitions("concepts")) == ["other", "rusty"]
    assert built(back) == [["rusty"]] and back.asset_events == []  # Dagster holds this folder's version already
    assert back.run_requests[0].run_key not in {r.run_key for r in first.run_requests}  # not skipped as used
