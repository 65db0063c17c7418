"""A concept folder's ``concept.toml``: what to teach, which methods to build, and per-concept overrides.

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

    [base_model]         # this concept's base model, instead of the deployment's (base_model.ConceptBaseModelConfig)
    source = "embedded-sdxl"
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONCEPT_KEY = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
METHODS = ("lora", "dreambooth", "textual_inversion", "controlnet")
SPEC_FILE = "concept.toml"
_SECTIONS = ("base_model", "quality", "scoring", "captions", "latents", "control", "class_images", *METHODS)


class ConceptSpecError(ValueError):
    """A concept folder or its concept.toml is not usable; the message says what to fix."""


def is_valid_concept_key(name: str) -> bool:
    return CONCEPT_KEY.fullmatch(name) is not None


def validate_concept_key(name: str) -> str:
    if not is_valid_concept_key(name):
        raise ConceptSpecError(
            f"{name!r} is not a valid concept name: use 1-64 characters of a-z, 0-9, '_' or '-', "
            "starting with a letter or digit (rename the folder)."
        )
    return name


@dataclass(frozen=True)
class ConceptSpec:
    name: str
    token: str = field(metadata={"help": "Rare identifier token bound to the concept, e.g. 'sks'."})
    class_noun: str = field(default="", metadata={"help": "What the subject is, e.g. 'dog'; used for priors."})
    methods: tuple[str, ...] = field(default=(), metadata={"help": f"Subset of {METHODS} to build."})
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_concept_key(self.name)
        if not self.token or any(c.isspace() for c in self.token):
            raise ConceptSpecError(f"concept {self.name!r}: token must be one word without spaces, got {self.token!r}")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ConceptSpecError(f"concept {self.name!r}: unknown methods {unknown}; choose from {list(METHODS)}")

    def instance_prompt(self) -> str:
        """The template caption: 'a photo of sks dog' (DreamBooth's convention)."""
        subject = f"{self.token} {self.class_noun}".strip()
        return f"a photo of {subject}"

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.overrides.get(name, {}))


def parse_concept_toml(name: str, text: str) -> ConceptSpec:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConceptSpecError(f"concept {name!r}: {SPEC_FILE} is not valid TOML: {e}") from e
    known = {"token", "class_noun", "methods", *_SECTIONS}
    extra = sorted(set(raw) - known)
    if extra:
        raise ConceptSpecError(f"concept {name!r}: unknown keys {extra} in {SPEC_FILE}; known keys: {sorted(known)}")
    if "token" not in raw:
        raise ConceptSpecError(f"concept {name!r}: {SPEC_FILE} needs a 'token' (e.g. token = \"sks\")")
    methods = raw.get("methods", [])
    if isinstance(methods, str) or not all(isinstance(m, str) for m in methods):
        raise ConceptSpecError(f"concept {name!r}: 'methods' must be a list of strings, e.g. [\"lora\"]")
    overrides = {k: raw[k] for k in _SECTIONS if k in raw}
    for k, v in overrides.items():
        if not isinstance(v, dict):
            raise ConceptSpecError(f"concept {name!r}: [{k}] must be a table of overrides")
        check_section(k, v, f"{name}/{SPEC_FILE} [{k}]")
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
    if not spec_path.is_file():
        raise ConceptSpecError(f"concept {name!r}: missing {SPEC_FILE} in {concept_dir}")
    return parse_concept_toml(name, spec_path.read_text(encoding="utf-8"))


# Each section's config dataclass, imported only when a concept is read ("module:Class"; methods by name).
_SECTION_CONFIGS = {
    "base_model": "assets_pipeline.base_model:ConceptBaseModelConfig",
    "quality": "assets_pipeline.stages.curation:QualityConfig",
    "scoring": "assets_pipeline.stages.scoring:ScoringConfig",
    "captions": "assets_pipeline.stages.captions:CaptionConfig",
    "latents": "assets_pipeline.stages.latents:LatentConfig",
    "control": "assets_pipeline.stages.conditioning:ControlConfig",
    "class_images": "assets_pipeline.stages.class_images:ClassImageConfig",
}


def section_config(section: str) -> type:
    import importlib

    if section in METHODS:
        from assets_pipeline.training.methods import get_method

        return get_method(section).config_cls
    module, cls = _SECTION_CONFIGS[section].split(":")
    return getattr(importlib.import_module(module), cls)


def check_section(section: str, overrides: dict[str, Any], where: str) -> None:
    """Keys and value types of one section against its config dataclass, then the dataclass's own checks
    (ranges, choices) on its defaults with these overrides: everything a later stage would reject, now."""
    from dataclasses import replace

    from assets_pipeline.config_types import type_errors

    cls = section_config(section)
    errors = type_errors(cls, overrides)
    if errors:
        raise ConceptSpecError(f"{where}: " + "; ".join(errors))
    try:
        replace(cls(), **overrides)
    except (ValueError, TypeError) as e:
        raise ConceptSpecError(f"{where}: {e}") from e


def apply_overrides(config: Any, overrides: dict[str, Any], where: str) -> Any:
    """Return a copy of the dataclass ``config`` with ``overrides`` applied; unknown fields and values of the
    wrong type fail loudly, naming ``where``."""
    from dataclasses import replace

    from assets_pipeline.config_types import type_errors

    errors = type_errors(type(config), overrides)
    if errors:
        raise ConceptSpecError(f"{where}: " + "; ".join(errors))
    return replace(config, **overrides)
