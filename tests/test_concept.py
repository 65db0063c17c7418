"""concept.py: the ground floor. The concept key rule, the spec record, overrides, and the registry of concept.toml
sections (each config dataclass registers itself; every section has one)."""

from __future__ import annotations

import dataclasses

import pytest

from assets_pipeline.concept import (
    METHODS, SECTIONS, ConceptSpec, ConceptSpecError, apply_overrides, config_section, is_valid_concept_key,
    registered_sections,
)
from assets_pipeline.partitions.concept_spec import section_configs
from assets_pipeline.stages.curation import QualityConfig


@pytest.mark.parametrize(("name", "valid"), [
    ("rusty", True), ("my_dog-2", True), ("0day", True), ("a" * 64, True),
    ("", False), ("Rusty", False), ("_x", False), ("-x", False), ("a b", False), ("../etc", False),
    ("a" * 65, False), ("bad name!", False), ("ü", False),
])
def test_concept_keys(name, valid):
    assert is_valid_concept_key(name) is valid


def test_unknown_override_fails_loudly():
    with pytest.raises(ConceptSpecError, match="min_sid"):
        apply_overrides(QualityConfig(), {"min_sid": 3}, "rusty/concept.toml [quality]")


def test_every_section_has_the_config_dataclass_its_module_registered():
    from assets_pipeline.models.resolve import ConceptBaseModelConfig
    from assets_pipeline.stages.latents import LatentConfig
    from assets_pipeline.training.methods import get_method

    sections = section_configs()
    assert set(sections) == set(SECTIONS) == set(registered_sections())
    assert sections["quality"] is QualityConfig and sections["latents"] is LatentConfig
    assert sections["base_model"] is ConceptBaseModelConfig
    for method in METHODS:  # a method's config is registered with the method
        assert sections[method] is get_method(method).config_cls
    assert all(dataclasses.is_dataclass(cls) for cls in sections.values())


def test_the_registry_fails_loudly_on_mistakes():
    with pytest.raises(ValueError, match="'colour' is not a concept.toml section"):
        config_section("colour")

    @dataclasses.dataclass(frozen=True)
    class Other:
        min_side: int = 1

    with pytest.raises(ValueError, match=r"section \[quality\] is already registered by .*QualityConfig"):
        config_section("quality")(Other)
    assert config_section("quality")(QualityConfig) is QualityConfig  # registering the same class again is harmless


def test_a_spec_reads_its_sections_and_round_trips_its_snapshot():
    spec = ConceptSpec(name="rusty", token="sks", class_noun="dog", methods=("lora",),
                       overrides={"quality": {"min_side": 384}})
    assert spec.config("quality", QualityConfig()).min_side == 384
    assert spec.config("scoring", QualityConfig()) == QualityConfig()  # no overrides: the default as given
    with pytest.raises(ConceptSpecError, match=r"rusty/concept.toml \[quality\]: unknown keys \['x'\]"):
        ConceptSpec(name="rusty", token="sks", overrides={"quality": {"x": 1}}).config("quality", QualityConfig())
    assert ConceptSpec.from_json(dataclasses.asdict(spec)) == spec
    with pytest.raises(ConceptSpecError, match="not a valid concept name"):
        ConceptSpec(name="../x", token="sks")
