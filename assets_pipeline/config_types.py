"""Type checks of config overrides against a config dataclass's field annotations (stdlib only).

TOML gives strings, integers, floats, booleans, arrays and tables; Python would happily take ``rank = "high"``
or ``center_crop = "false"`` (a true string) and fail far away, or not at all. Each override is checked against
its field's annotation where the concept is read, so the error names the file, section, key, value and type.
"""

from __future__ import annotations

import types
import typing
from dataclasses import fields
from typing import Any


def describe(annotation: Any) -> str:
    if annotation is type(None):
        return "none"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(annotation) if a is not type(None))
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return f"a list, each {describe(args[0])}" if args else "a list"
    if origin is dict or annotation is dict:
        return "a table"
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def matches(value: Any, annotation: Any) -> bool:
    """Whether a TOML value fits ``annotation`` (an int is a valid float; a bool is never an int)."""
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(matches(v, args[0]) for v in value) if args else \
            isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # an annotation this checker does not model: the dataclass's own validation decides


def type_errors(cls: type, overrides: dict[str, Any]) -> list[str]:
    """One message per override whose key is unknown to ``cls`` or whose value does not fit the field."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    errors = []
    unknown = sorted(set(overrides) - names)
    if unknown:
        errors.append(f"unknown keys {unknown}; known: {sorted(names)}")
    for key, value in overrides.items():
        if key in names and not matches(value, hints[key]):
            errors.append(f"{key} = {value!r} is {type(value).__name__}, expected {describe(hints[key])}")
    return errors
