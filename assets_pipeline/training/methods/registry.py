"""Where fine-tuning methods register by name (each method module calls :func:`register` at its end). Look methods
up through the package (``training.methods.get_method``), which imports every built-in method first."""

from __future__ import annotations

from assets_pipeline.concept import config_section
from assets_pipeline.training.methods.base import Method

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Register ``method`` by name; its config dataclass becomes concept.toml's ``[<name>]`` section."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    config_section(method.name)(method.config_cls)
    _REGISTRY[method.name] = method
    return method


def registered() -> dict[str, Method]:
    return dict(_REGISTRY)
