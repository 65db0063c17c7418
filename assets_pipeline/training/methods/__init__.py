"""The fine-tuning methods, by name: one module per method, each registering itself (``registry.py``).
Importing this package imports every built-in method, so the lookups below see them all."""

from __future__ import annotations

from assets_pipeline.training.methods import controlnet, dreambooth, lora, textual_inversion  # noqa: F401
from assets_pipeline.training.methods.base import Method
from assets_pipeline.training.methods.registry import registered


def get_method(name: str) -> Method:
    methods = registered()
    try:
        return methods[name]
    except KeyError:
        raise KeyError(f"unknown training method {name!r}; registered: {sorted(methods)}") from None


def method_names() -> list[str]:
    return sorted(registered())
