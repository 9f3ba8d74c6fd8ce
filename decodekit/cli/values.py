"""Command-line values made consistent before validation: one string for a list, no true for a number.

- A single string given for a setting that takes a list is that one-element list, for every such
  setting alike: ``stop=best``, ``bad_words=damn``, ``must_include=cat``, ``processor_order=top_k``.
- ``true``/``false`` given for a number is refused in one line. pydantic's lax mode would read
  ``top_k=true`` as 1 and ``temperature=false`` as 0.0 and pass that on as if it had been written.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from decodekit.errors import ConfigError

_LISTS = (list, tuple, Sequence)
_MAPPINGS = (dict, Mapping)
_UNIONS = (Union, types.UnionType)


def normalize_values(values: Mapping[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """``values`` with single strings for list settings wrapped; :class:`ConfigError` for a bool as a number."""
    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    out = dict(values)
    for key, value in values.items():
        field = fields.get(key)
        if field is None or field.annotation is None:
            continue
        annotation = field.annotation
        if isinstance(value, str) and _takes_list(annotation) and not _takes_string(annotation):
            out[key] = [value]
        elif _bool_as_number(annotation, value):
            shown = str(value).lower() if isinstance(value, bool) else repr(value)
            raise ConfigError(f"{key}={shown} is not allowed: true and false are not numbers; give a number")
    return out


def _members(annotation: Any) -> list[Any]:
    """The types ``annotation`` admits at its top level (Annotated and unions unwrapped)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin in _UNIONS:
        return [m for arg in get_args(annotation) for m in _members(arg)]
    return [annotation]


def _takes_list(annotation: Any) -> bool:
    return any(get_origin(m) in _LISTS or m in _LISTS for m in _members(annotation))


def _takes_string(annotation: Any) -> bool:
    for m in _members(annotation):
        if m is str or m is Any or (get_origin(m) is Literal and any(isinstance(a, str) for a in get_args(m))):
            return True
    return False


def _bool_as_number(annotation: Any, value: Any) -> bool:
    """Whether ``value`` holds a bool where ``annotation`` wants a number and no bool."""
    members = _members(annotation)
    if isinstance(value, bool):
        return bool not in members and Any not in members and any(m in (int, float) for m in members)
    if isinstance(value, (list, tuple)):
        items = [get_args(m)[0] for m in members if get_origin(m) in _LISTS and get_args(m)]
        return any(all(_bool_as_number(item, v) for item in items) for v in value) if items else False
    if isinstance(value, dict):
        pairs = [get_args(m) for m in members if get_origin(m) in _MAPPINGS and len(get_args(m)) == 2]
        return any(
            all(_bool_as_number(k_type, k) or _bool_as_number(v_type, v) for k_type, v_type in pairs)
            for k, v in value.items()
        ) if pairs else False  # fmt: skip
    return False
