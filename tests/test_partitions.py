"""partitions/: concept.toml parsing, concept keys, overrides, and folder discovery."""

from __future__ import annotations

import os

import pytest

from assets_pipeline.partitions.concept_spec import (
    ConceptSpecError, apply_overrides, is_valid_concept_key, load_concept_spec, parse_concept_toml,
)
from assets_pipeline.partitions.discovery import folder_digest, scan_concepts
from assets_pipeline.stages.curation import QualityConfig
from helpers import write_concept


@pytest.mark.parametrize(("name", "valid"), [
    ("rusty", True), ("my_dog-2", True), ("0day", True), ("a" * 64, True),
    ("", False), ("Rusty", False), ("_x", False), ("-x", False), ("a b", False), ("../etc", False),
    ("a" * 65, False), ("bad name!", False), ("ü", False),
])
def test_concept_keys(name, valid):
    assert is_valid_concept_key(name) is valid


def test_parse_full_spec():
    spec = parse_concept_toml("rusty", 'token = "sks"\nclass_noun = "dog"\nmethods = ["lora", "dreambooth"]\n'
                                       "[quality]\nmin_side = 384\n[lora]\nrank = 8\n")
    assert (spec.token, spec.class_noun, spec.methods) == ("sks", "dog", ("lora", "dreambooth"))
    assert spec.instance_prompt() == "a photo of sks dog"
    assert spec.section("quality") == {"min_side": 384}
    assert spec.section("scoring") == {}
    assert apply_overrides(QualityConfig(), spec.section("quality"), "rusty").min_side == 384


@pytest.mark.parametrize(("text", "message"), [
    ('class_noun = "dog"', "needs a 'token'"),
    ('token = "two words"', "one word"),
    ('token = "sks"\nmethods = ["lora", "hypernetwork"]', "unknown methods"),
    ('token = "sks"\nmethods = "lora"', "list of strings"),
    ('token = "sks"\ncolour = "red"', "unknown keys"),
    ('token = "sks"\nquality = 3', "must be a table"),
    ("token = ", "not valid TOML"),
])
def test_bad_specs_fail_with_a_message_that_teaches(text, message):
    with pytest.raises(ConceptSpecError, match=message):
        parse_concept_toml("rusty", text)


def test_unknown_override_fails_loudly():
    with pytest.raises(ConceptSpecError, match="min_sid"):
        apply_overrides(QualityConfig(), {"min_sid": 3}, "rusty/concept.toml [quality]")


def test_load_concept_spec_checks_folder_name_and_file(data_root):
    with pytest.raises(ConceptSpecError, match="missing concept.toml"):
        load_concept_spec(write_concept(data_root, "empty", {}, spec=None))
    with pytest.raises(ConceptSpecError, match="not a valid concept name"):
        load_concept_spec(write_concept(data_root, "Bad Name", {}))
    assert load_concept_spec(write_concept(data_root, "ok", {})).name == "ok"


def test_folder_digest_changes_with_content_not_with_reads(data_root):
    folder = write_concept(data_root, "rusty", {"a.png": b"1", "sub/b.png": b"2"})
    d0 = folder_digest(folder)
    (folder / "a.png").read_bytes()
    assert folder_digest(folder) == d0
    (folder / "c.png").write_bytes(b"3")
    d1 = folder_digest(folder)
    assert d1 != d0
    os.utime(folder / "c.png", ns=(1, 1))  # touched
    assert folder_digest(folder) != d1
    (folder / "c.png").unlink()
    assert folder_digest(folder) == d0


def test_scan_concepts(data_root):
    write_concept(data_root, "rusty", {})
    write_concept(data_root, "Nope", {})
    write_concept(data_root, "nospec", {}, spec=None)
    (data_root / "loose.jpg").write_bytes(b"x")
    scan = scan_concepts(data_root)
    assert list(scan.concepts) == ["rusty"]
    assert set(scan.invalid) == {"Nope", "nospec"}
