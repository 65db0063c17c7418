"""Reading a concept folder's ``concept.toml``: what to teach, which methods to build, and per-concept overrides.

Example::

    token = "sks"
    class_noun = "dog"
    methods = ["lora", "dreambooth"]

    [quality]            # overrides of QualityConfig fields (see stages/curation.py)
    min_side = 384

    [scoring]            # overrides of ScoringConfig fields (see stages/scoring.py)
    top_fraction = 0.5

    [lora]               # per-method overrides, read by the trainers
    rank = 8

    [[lora.datasets]]    # other concepts trained into this LoRA, each with its repeats (methods/lora.py)
    concept = "tabby"
    repeats = 2

    [base_model]         # this concept's base model, instead of the deployment's (models/resolve.py)
    source = "embedded-sdxl"

Every section is checked when the concept is read, against the config dataclass that registered it
(``concept.config_section``), before any work.
"""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from assets_pipeline.concept import (
    SECTIONS, SPEC_FILE, ConceptSpec, ConceptSpecError, registered_sections, validate_concept_key,
)
from assets_pipeline.config_types import type_errors
from assets_pipeline.store import UnreadableFile, read_text


def section_configs() -> dict[str, type]:
    """Every concept.toml section's config dataclass, by section name. Importing the modules that define them
    registers them (``concept.config_section``)."""
    from assets_pipeline.models import resolve  # noqa: F401  [base_model]
    from assets_pipeline.stages import captions, class_images, conditioning, curation, latents, scoring  # noqa: F401
    from assets_pipeline.training import methods  # noqa: F401  each method registers its config with itself

    sections = registered_sections()
    if missing := [s for s in SECTIONS if s not in sections]:
        raise RuntimeError(f"concept.toml sections {missing} have no registered config dataclass")
    return sections


def parse_concept_toml(name: str, text: str) -> ConceptSpec:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConceptSpecError(f"concept {name!r}: {SPEC_FILE} is not valid TOML: {e}") from e
    known = {"token", "class_noun", "methods", *SECTIONS}
    extra = sorted(set(raw) - known)
    if extra:
        raise ConceptSpecError(f"concept {name!r}: unknown keys {extra} in {SPEC_FILE}; known keys: {sorted(known)}")
    if "token" not in raw:
        raise ConceptSpecError(f"concept {name!r}: {SPEC_FILE} needs a 'token' (e.g. token = \"sks\")")
    methods = raw.get("methods", [])
    if isinstance(methods, str) or not all(isinstance(m, str) for m in methods):
        raise ConceptSpecError(f"concept {name!r}: 'methods' must be a list of strings, e.g. [\"lora\"]")
    overrides = {k: raw[k] for k in SECTIONS if k in raw}
    for k, v in overrides.items():
        if not isinstance(v, dict):
            raise ConceptSpecError(f"concept {name!r}: [{k}] must be a table of overrides")
        check_section(k, v, f"{name}/{SPEC_FILE} [{k}]")
    if "base_model" in overrides:  # a missing model is found now, not when the first stage tries to load it
        from assets_pipeline.models.resolve import check_source

        try:
            check_source(overrides["base_model"].get("source", ""), overrides["base_model"].get("single_file_config"))
        except ValueError as e:
            raise ConceptSpecError(f"{name}/{SPEC_FILE} [base_model]: {e}") from e
    return ConceptSpec(
        name=name,
        token=str(raw["token"]),
        class_noun=str(raw.get("class_noun", "")),
        methods=tuple(methods),
        overrides=overrides,
    )


def load_concept_spec(concept_dir: Path) -> ConceptSpec:
    name = validate_concept_key(concept_dir.name)
    spec_path = concept_dir / SPEC_FILE
    if not spec_path.exists() and not spec_path.is_symlink():
        raise ConceptSpecError(f"concept {name!r}: missing {SPEC_FILE} in {concept_dir}")
    try:
        text = read_text(spec_path, "make it a regular file of UTF-8 text (re-save it as UTF-8); until then the "
                                    "concept is not built")
    except UnreadableFile as e:
        raise ConceptSpecError(f"concept {name!r}: {e}") from None
    return parse_concept_toml(name, text)


def check_section(section: str, overrides: dict[str, Any], where: str) -> None:
    """Keys and value types of one section against its config dataclass, then the dataclass's own checks
    (ranges, choices) on its defaults with these overrides: everything a later stage would reject, now."""
    cls = section_configs()[section]
    errors = type_errors(cls, overrides)
    if errors:
        raise ConceptSpecError(f"{where}: " + "; ".join(errors))
    try:
        replace(cls(), **overrides)
    except (ValueError, TypeError) as e:
        raise ConceptSpecError(f"{where}: {e}") from e
