"""partitions/concept_spec.py: reading concept.toml, every section checked against its registered config."""

from __future__ import annotations

import pytest

from assets_pipeline.concept import ConceptSpecError
from assets_pipeline.partitions.concept_spec import load_concept_spec, parse_concept_toml
from assets_pipeline.stages.curation import QualityConfig
from helpers import write_concept


def test_parse_full_spec():
    spec = parse_concept_toml("rusty", 'token = "sks"\nclass_noun = "dog"\nmethods = ["lora", "dreambooth"]\n'
                                       "[quality]\nmin_side = 384\n[lora]\nrank = 8\n")
    assert (spec.token, spec.class_noun, spec.methods) == ("sks", "dog", ("lora", "dreambooth"))
    assert spec.instance_prompt() == "a photo of sks dog"
    assert spec.section("quality") == {"min_side": 384}
    assert spec.section("scoring") == {}
    assert spec.config("quality", QualityConfig()).min_side == 384


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


def test_load_concept_spec_checks_folder_name_and_file(data_root):
    with pytest.raises(ConceptSpecError, match="missing concept.toml"):
        load_concept_spec(write_concept(data_root, "empty", {}, spec=None))
    with pytest.raises(ConceptSpecError, match="not a valid concept name"):
        load_concept_spec(write_concept(data_root, "Bad Name", {}))
    assert load_concept_spec(write_concept(data_root, "ok", {})).name == "ok"
