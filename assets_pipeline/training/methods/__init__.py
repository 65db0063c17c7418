"""The method registry: every fine-tuning method registers here by name."""

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


def get_method(name: str) -> Method:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown training method {name!r}; registered: {sorted(_REGISTRY)}") from None


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    # Every time, not only while the registry is empty: a method module imported directly (``from ...methods.lora
    # import LoraConfig``) registers itself alone, and the others must still load. Imports run once per process.
    from assets_pipeline.training.methods import controlnet, dreambooth, lora, textual_inversion  # noqa: F401
