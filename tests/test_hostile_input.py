"""Hostile but fair input: partition keys that try to leave the artifact root, unfinished output folders, and
lineage questions about paths that do not exist. Each ends in a clear message with nothing written outside the
roots."""

from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path

import pytest

from assets_pipeline.concept import ConceptSpecError
from assets_pipeline.store import ArtifactLayout


@pytest.mark.parametrize("key", ["../../../other/artifacts/concepts/k4", "name/../name", "..", "a/b", "", "Upper"])
def test_asset_folders_refuse_keys_that_are_not_concept_names(tmp_path, key):
    with pytest.raises(ConceptSpecError, match="not a valid concept name"):
        ArtifactLayout(tmp_path / "artifacts").asset_dir(key, "captioned_images")


def test_asset_folders_refuse_a_concept_folder_linked_outside_the_root(tmp_path):
    root = tmp_path / "artifacts"
    (root / "concepts").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "concepts" / "evil").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="outside the artifact root"):
        ArtifactLayout(root).asset_dir("evil", "raw_images")
    assert ArtifactLayout(root).asset_dir("fine", "raw_images") == root / "concepts" / "fine" / "raw_images"


def test_materializing_a_traversal_partition_fails_before_touching_disk(tmp_path, storage):
    """The attack from the issue: captioned_images for '../../../other/artifacts/concepts/k4' rewrote another
    root's folder. Now the run fails with the reason and nothing is written anywhere."""
    import dagster as dg

    from assets_pipeline.definitions import ASSETS, default_resources

    key = "../../../other/artifacts/concepts/k4"
    before = sorted(p for p in tmp_path.rglob("*"))
    # As a context manager, so the instance's state storage is unset again for the tests that follow.
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("concepts", [key, "name/../name"])
        for partition in (key, "name/../name"):
            res = dg.materialize(ASSETS, selection="captioned_images", partition_key=partition, instance=instance,
                                 resources={**default_resources(), "storage": storage}, raise_on_error=False)
            assert not res.success
            failure = next(e for e in res.all_events if e.event_type_value == "STEP_FAILURE")
            assert "not a valid concept name" in str(failure.event_specific_data.error)
    assert sorted(p for p in tmp_path.rglob("*")) == before


def _manifest(folder: Path, concept: str, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "lineage.json").write_text(json.dumps({
        "concept": concept, "method": "lora", "created_at": folder.name, "run_id": folder.name,
        "training_images": [{"role": "instance", "caption": "c", **r} for r in rows]}))
    return folder


@pytest.fixture
def audit_world(tmp_path, monkeypatch):
    """Two finished outputs of concept 'dog' and one unfinished (.tmp) folder, photos under data/dog/."""
    data, artifacts = tmp_path / "data", tmp_path / "artifacts"
    (data / "dog").mkdir(parents=True)
    (data / "dog" / "a.jpg").write_bytes(b"new content of a")
    asset = artifacts / "concepts" / "dog" / "lora_adapter"
    old = _manifest(asset / "v1", "dog", [{"image_sha256": "1" * 64, "source_path": "a.jpg"},
                                          {"image_sha256": "2" * 64, "source_path": "gone.jpg"}])
    tmp = _manifest(asset / ".v2.tmp", "dog", [{"image_sha256": "1" * 64, "source_path": "a.jpg"}])
    monkeypatch.setenv("ASSETS_PIPELINE_DATA", str(data))
    monkeypatch.setenv("ASSETS_PIPELINE_ARTIFACTS", str(artifacts))
    return data, artifacts, old, tmp


def test_unfinished_output_folders_are_never_listed(audit_world):
    from assets_pipeline.lineage import iter_manifests, outputs_trained_on

    _, artifacts, old, _ = audit_world
    assert [folder for folder, _ in iter_manifests(artifacts)] == [old]
    assert list(outputs_trained_on(artifacts, "1" * 64)["output"]) == [str(old)]


def test_lineage_cli_gives_one_line_errors_not_tracebacks(audit_world, capsys, tmp_path):
    from assets_pipeline.cli import main

    assert main(["lineage", "output", str(tmp_path / "no_such_output")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("assets-pipeline lineage:") and "not a trained output" in err and "\n" not in err
    assert main(["lineage", "image", str(tmp_path / "not_in_data_root.jpg")]) == 2
    err = capsys.readouterr().err.strip()
    assert "neither an existing file, a sha256, nor a path inside the data root" in err and "\n" not in err


def test_lineage_image_finds_outputs_of_a_paths_earlier_content_and_of_a_removed_path(audit_world, capsys):
    from assets_pipeline.cli import main

    data, _, old, _ = audit_world
    assert main(["lineage", "image", str(data / "dog" / "a.jpg"), "--format", "json"]) == 0
    out = capsys.readouterr()
    rows = json.loads(out.out)
    assert [(r["output"], r["match"]) for r in rows] == [(str(old), "path: content changed since")]
    assert "content changed since" in out.err
    assert main(["lineage", "image", str(data / "dog" / "gone.jpg"), "--format", "json"]) == 0
    out = capsys.readouterr()
    assert [(r["output"], r["match"]) for r in json.loads(out.out)] == [(str(old), "path: the file no longer exists")]
    assert "no longer exists" in out.err


@pytest.mark.parametrize("section, expected", [
    ('[lora]\nrank = "high"', "[lora]: rank = 'high' is str, expected an integer"),
    ("[lora]\nrank = 4.5", "[lora]: rank = 4.5 is float, expected an integer"),
    ('[lora]\ntrain_text_encoder = "no"', "train_text_encoder = 'no' is str, expected a boolean"),
    ('[latents]\ncenter_crop = "false"', "[latents]: center_crop = 'false' is str, expected a boolean"),
    ("[dreambooth]\nrnak = 4", "[dreambooth]: unknown keys ['rnak']"),
    ("[lora]\nrank = 0", "[lora]: rank must be an integer in 1..3072, got 0"),
    ('[class_images]\ndtype = "fp8"', "[class_images]: [class_images] dtype = 'fp8' is invalid"),
    # LoRA variants (test_lora_variants.py)
    ('[lora]\nvariant = "lycoris"', "[lora]: variant must be one of 'lora', 'dora', 'loha', 'lokr', got 'lycoris'"),
    ('[lora]\nvariant = "loha"\ndropout = 0.1', "dropout = 0.1 applies to variant 'lora'/'dora' only"),
    ("[lora]\nconv_rank = -1", "[lora]: conv_rank must be an integer in 0..3072, got -1"),
    ("[lora]\nvariant = 3", "[lora]: variant = 3 is int, expected a string"),
])
def test_concept_toml_values_are_type_checked_when_the_concept_is_read(data_root, section, expected):
    """The issue's cases: each used to fail (or pass) only at training time, after the whole dataset half."""
    from assets_pipeline.partitions.concept_spec import load_concept_spec

    folder = data_root / "dog"
    folder.mkdir()
    (folder / "concept.toml").write_text(f'token = "sks"\nclass_noun = "dog"\n{section}\n')
    with pytest.raises(ConceptSpecError) as e:
        load_concept_spec(folder)
    assert str(e.value).startswith("dog/concept.toml [") and expected in str(e.value)


def test_well_typed_overrides_pass_and_ints_are_valid_floats(data_root):
    from assets_pipeline.partitions.concept_spec import load_concept_spec

    folder = data_root / "dog"
    folder.mkdir()
    (folder / "concept.toml").write_text('token = "sks"\n[lora]\nrank = 8\nlearning_rate = 1\nalpha = 4\n'
                                         '[class_images]\nbatch_size = "auto"\ncompile = true\n')
    spec = load_concept_spec(folder)
    assert spec.section("lora") == {"rank": 8, "learning_rate": 1, "alpha": 4}


def _control_characters(text: str) -> list[str]:
    """The control characters (Unicode category Cc) of printed text, its line breaks aside."""
    return [c for c in text if unicodedata.category(c) == "Cc" and c != "\n"]


def test_lineage_never_prints_the_control_characters_of_a_caption_or_file_name(audit_world, capsys):
    """Issue 28, point 10: ESC, BEL and NUL in a sidecar caption were kept, and `lineage output` printed them raw
    (a caption could clear the screen or retitle the terminal of whoever audits it). Printed, they are escaped as
    repr escapes them; the manifest keeps them, and the JSON output reads back to the same text."""
    from assets_pipeline.cli import main

    _, _, old, _ = audit_world
    caption = "a photo of sks\x1b[2J\x1b]0;owned\x07 dog\x00\x7f\x9b"
    name = "gone\x1b[31m.jpg"
    manifest = json.loads((old / "lineage.json").read_text())
    manifest["training_images"][0]["caption"] = caption
    manifest["training_images"][1]["source_path"] = name
    (old / "lineage.json").write_text(json.dumps(manifest))

    assert main(["lineage", "output", str(old)]) == 0
    out = capsys.readouterr()
    assert _control_characters(out.out + out.err) == []
    assert "a photo of sks\\x1b[2J\\x1b]0;owned\\x07 dog\\x00\\x7f\\x9b" in out.out
    assert "gone\\x1b[31m.jpg" in out.out
    assert main(["lineage", "output", str(old), "--format", "json"]) == 0
    out = capsys.readouterr()
    assert _control_characters(out.out + out.err) == []
    rows = json.loads(out.out)
    assert (rows[0]["caption"], rows[1]["source_path"]) == (caption, name)
    assert main(["lineage", "image", "2" * 64]) == 0
    out = capsys.readouterr()
    assert _control_characters(out.out + out.err) == [] and "gone\\x1b[31m.jpg" in out.out
    assert json.loads((old / "lineage.json").read_text())["training_images"][0]["caption"] == caption


@pytest.mark.parametrize("damage, why", [
    (lambda text: text[: len(text) // 2], "not valid JSON, damaged or cut short"),
    (lambda text: "", "empty"),
    (lambda text: "[]", "holds an array, expected a JSON object"),
    (lambda text: '{"concept": "dog"}', "lacks the key(s) ['method', 'training_images']"),
], ids=["truncated", "empty", "a_list", "keys_missing"])
def test_a_damaged_lineage_json_is_skipped_with_a_warning_and_the_other_outputs_still_answer(
        audit_world, capsys, damage, why):
    """Issue 28, point 11: one truncated lineage.json broke `lineage image` for every photo (a traceback). It is
    now left out with a warning naming it and what to do, the others answer, and the exit status (1) says the
    answer may be incomplete; `lineage output` on the damaged output is a one-line error."""
    from assets_pipeline.cli import main

    _, _, old, _ = audit_world
    damaged = _manifest(old.parent / "v3", "dog", [{"image_sha256": "1" * 64, "source_path": "a.jpg"}])
    path = damaged / "lineage.json"
    path.write_text(damage(path.read_text()))
    assert main(["lineage", "image", "1" * 64, "--format", "json"]) == 1
    out = capsys.readouterr()
    assert [r["output"] for r in json.loads(out.out)] == [str(old)]
    warning, summary = out.err.strip().splitlines()
    assert warning.startswith(f"assets-pipeline lineage: warning: {path}: {why}")
    assert "restore it from a backup" in warning and "this output is left out" in warning
    assert "1 damaged record(s) skipped" in summary and "may be missing from this answer" in summary
    assert main(["lineage", "output", str(damaged)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"assets-pipeline lineage: {path}: {why}") and "\n" not in err


def test_a_damaged_current_json_leaves_current_unknown_in_lineage_image(audit_world, capsys):
    """Issue 28, point 11: a truncated current.json broke `lineage image` (a traceback). The outputs are listed,
    `current` is unknown (null) for that asset's, and a warning names the file and how to rewrite it."""
    from assets_pipeline.cli import main

    _, _, old, _ = audit_world
    pointer = old.parent / "current.json"
    pointer.write_text('{"path": "v')
    assert main(["lineage", "image", "1" * 64, "--format", "json"]) == 1
    out = capsys.readouterr()
    assert [(r["output"], r["current"]) for r in json.loads(out.out)] == [(str(old), None)]
    warning = out.err.splitlines()[0]
    assert warning.startswith(f"assets-pipeline lineage: warning: {pointer}: not valid JSON")
    assert "rematerialize lora_adapter for concept 'dog'" in warning and "which version of it is current" in warning
    pointer.write_text(json.dumps({"path": old.name}))
    assert main(["lineage", "image", "1" * 64, "--format", "json"]) == 0
    assert [r["current"] for r in json.loads(capsys.readouterr().out)] == [True]


def test_a_concept_toml_that_is_not_utf8_or_not_a_file_names_the_file_and_the_concept(data_root):
    """Issue 28, point 11: a concept.toml saved as Latin-1 gave a bare UnicodeDecodeError naming neither the file
    nor the concept; one that is a FIFO was reported missing. Both now say which file, what is wrong and what to
    do, where the concept is read (raw_images) and by the folder sensor's scan."""
    import os

    from assets_pipeline.partitions.concept_spec import load_concept_spec
    from assets_pipeline.partitions.discovery import scan_concepts

    folder = data_root / "dog"
    folder.mkdir()
    spec = folder / "concept.toml"
    text = 'token = "sks"\nclass_noun = "chien de berger fran\xe7ais"\n'
    spec.write_bytes(text.encode("latin-1"))
    offset = text.index("\xe7")
    with pytest.raises(ConceptSpecError) as e:
        load_concept_spec(folder)
    message = str(e.value)
    assert message.startswith(f"concept 'dog': {spec}: not UTF-8 text (byte 0xe7 at offset {offset})")
    assert "re-save it as UTF-8" in message
    assert scan_concepts(data_root).invalid == {"dog": f"concept.toml is not usable: {message}"}
    spec.unlink()
    os.mkfifo(spec)
    with pytest.raises(ConceptSpecError, match=r"concept.toml: a named pipe \(FIFO\), not a regular file; make it"):
        load_concept_spec(folder)


def test_raw_images_never_logs_the_control_characters_of_a_file_name(data_root, storage):
    """Issue 28, point 10, in the run log (printed to the terminal by `dagster asset materialize`): a rejected
    file's name is escaped as repr escapes it."""
    import dagster as dg

    from assets_pipeline.definitions import ASSETS, default_resources
    from helpers import encode, photo, write_concept

    name = "x\x1b]0;owned\x07\x1b[2J.jpg"
    write_concept(data_root, "esc", {"a.png": encode(photo("coffee", (64, 64)), "PNG"), name: b"not a photo"},
                  'token = "sks"\nmethods = ["lora"]\n')
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("concepts", ["esc"])
        res = dg.materialize(ASSETS, selection="raw_images", partition_key="esc", instance=instance,
                             resources={**default_resources(), "storage": storage})
        messages = [e.user_message for e in instance.all_logs(res.run_id)]
    rejected = [m for m in messages if m.startswith("rejected x")]
    assert rejected and all(_control_characters(m) == [] for m in rejected)
    assert "x\\x1b]0;owned\\x07\\x1b[2J.jpg" in rejected[0]


def test_a_file_name_that_is_not_utf8_is_a_reject_and_the_step_goes_on(data_root, storage):
    """A photo named in Latin-1 (or any bytes that are not UTF-8) failed the whole raw_images step: the name
    could not be written to the manifest (pyarrow: surrogates not allowed). Now it is a reject, its name shown
    with the bytes escaped, and the other photos are ingested."""
    import dagster as dg

    from assets_pipeline.definitions import ASSETS, default_resources
    from assets_pipeline.tables import read_asset_table
    from helpers import encode, photo, write_concept

    folder = write_concept(data_root, "latin", {"a.png": encode(photo("coffee", (64, 64)), "PNG")},
                           'token = "sks"\nmethods = ["lora"]\n')
    Path(os.fsdecode(os.fsencode(folder) + b"/caf\xe9.png")).write_bytes(encode(photo("chelsea", (64, 64)), "PNG"))
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("concepts", ["latin"])
        res = dg.materialize(ASSETS, selection="raw_images", partition_key="latin", instance=instance,
                             resources={**default_resources(), "storage": storage})
        messages = [e.user_message for e in instance.all_logs(res.run_id)]
    assert res.success
    layout = storage.layout()
    assert list(read_asset_table(layout, "latin", "raw_images", "manifest.parquet")["source_path"]) == ["a.png"]
    rejects = read_asset_table(layout, "latin", "raw_images", "rejects.parquet").set_index("source_path")
    assert rejects.loc["caf\\xe9.png", "code"] == "name_not_utf8"
    assert any(m.startswith("rejected caf\\xe9.png: the file name is not valid UTF-8") for m in messages)
