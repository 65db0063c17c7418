"""What a concept is, on the ground floor of the package: every other module may import this one, and it imports
nothing of the project but the config type checks.

- the concept key rule (a folder name is a partition key and a path segment, so it is validated before either);
- the methods a concept may request, and the fewest photos any of them trains on;
- the concept spec as ``concept.toml`` gives it (``partitions/concept_spec.py`` parses the file);
- the registry of ``concept.toml`` sections: each section's config dataclass registers itself with
  :func:`config_section` where it is defined (``[quality]`` in stages/curation.py, ``[lora]`` with its method, ...),
  so no module looks a section's class up by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from assets_pipeline.config_types import type_errors

CONCEPT_KEY = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
METHODS = ("lora", "dreambooth", "textual_inversion", "controlnet")
SPEC_FILE = "concept.toml"
# Below this many photos in the quality subset no method trains (the trainers refuse, the dataset checks fail).
MIN_IMAGES = 3
# concept.toml's sections, in the order the README lists them; each is registered by its config dataclass.
SECTIONS = ("base_model", "quality", "scoring", "captions", "latents", "control", "class_images", *METHODS)


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

    def config(self, section: str, default: Any) -> Any:
        """``default`` (a config dataclass) with this concept's ``[section]`` overrides applied."""
        return apply_overrides(default, self.section(section), f"{self.name}/{SPEC_FILE} [{section}]")

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ConceptSpec:
        """The spec from raw_images' snapshot (``concept.json``, its ``dataclasses.asdict``), which every asset of
        one build reads so that they agree on it."""
        return cls(name=raw["name"], token=raw["token"], class_noun=raw["class_noun"],
                   methods=tuple(raw["methods"]), overrides=raw["overrides"])


def apply_overrides(config: Any, overrides: dict[str, Any], where: str) -> Any:
    """Return a copy of the dataclass ``config`` with ``overrides`` applied; unknown fields and values of the
    wrong type fail loudly, naming ``where``."""
    errors = type_errors(type(config), overrides)
    if errors:
        raise ConceptSpecError(f"{where}: " + "; ".join(errors))
    return replace(config, **overrides)


_SECTION_CONFIGS: dict[str, type] = {}


def config_section(name: str):
    """Class decorator: ``cls`` is the config dataclass of concept.toml's ``[name]`` section."""
    if name not in SECTIONS:
        raise ValueError(f"{name!r} is not a concept.toml section; the sections are {list(SECTIONS)}")

    def register(cls: type) -> type:
        known = _SECTION_CONFIGS.get(name)
        if known is not None and known is not cls:
            raise ValueError(f"section [{name}] is already registered by {known.__module__}.{known.__qualname__}")
        _SECTION_CONFIGS[name] = cls
        return cls

    return register


def registered_sections() -> dict[str, type]:
    """The sections registered so far (their modules imported), by name."""
    return dict(_SECTION_CONFIGS)
