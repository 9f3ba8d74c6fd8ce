"""Turn pydantic's validation errors into one clear line: the setting, the value, what is allowed."""

from __future__ import annotations

import functools
import typing
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from decodekit.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

_ALLOWED = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "finite_number": "must be a finite number",
    "literal_error": "must be one of {expected}",
    "enum": "must be one of {expected}",
    "extra_forbidden": "is not a known setting",
    "missing": "is required",
}


def describe(error: ValidationError, prefix: str = "") -> str:
    """One line naming each bad setting, its value and what is allowed."""
    parts = []
    for e in error.errors():
        loc = ".".join(str(p) for p in e["loc"])
        key = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "value"
        template = _ALLOWED.get(e["type"])
        ctx = e.get("ctx") or {}
        if template:
            try:
                allowed = template.format(**ctx)
            except (KeyError, IndexError):
                allowed = e["msg"]
        else:
            allowed = e["msg"][0].lower() + e["msg"][1:]
        if e["type"] == "missing":
            parts.append(f"{key}: {allowed}")
        else:
            parts.append(f"{key}={e.get('input')!r} is not allowed: {allowed}")
    return "; ".join(parts)


def validate(model: type[M], prefix: str = "", /, **values: Any) -> M:
    """``model(**values)``, raising :class:`ConfigError` with a one-line message on bad input.

    A boolean given for a setting that is not a boolean is refused (pydantic would read ``True``
    as 1: ``top_k=True`` would mean ``top_k=1``).
    """
    for name, value in values.items():
        field = model.model_fields.get(name)
        if field is not None and holds_bool(value) and not mentions_bool(field.annotation):
            what = "a number, not a boolean" if isinstance(value, bool) else "numbers, not booleans"
            raise ConfigError(f"{prefix}{name}={value!r} is not allowed: must be {what}")
    try:
        return model(**values)
    except ValidationError as exc:
        raise ConfigError(describe(exc, prefix)) from None


def mentions_bool(annotation: Any) -> bool:
    """Whether a field's type takes booleans anywhere: ``bool``, ``Any``, or a type holding one."""
    if annotation is bool or annotation is Any:
        return True
    return any(mentions_bool(a) for a in typing.get_args(annotation))


def holds_bool(value: Any) -> bool:
    """Whether ``value`` is a boolean or a list, tuple or dict holding one (keys included)."""
    if isinstance(value, bool):
        return True
    if isinstance(value, (list, tuple)):
        return any(holds_bool(v) for v in value)
    if isinstance(value, dict):
        return any(holds_bool(k) or holds_bool(v) for k, v in value.items())
    return False


def token_sequences(value: list[Any]) -> list[Any]:
    """Check a setting that lists strings or token-id sequences: no empty entry, no negative id.

    For pydantic field validators of settings such as ``bad_words`` (raise ``ValueError``, which
    pydantic reports against the setting).
    """
    for item in value:
        if len(item) == 0:
            raise ValueError("an entry is empty")
        if isinstance(item, list) and any(i < 0 for i in item):
            raise ValueError("token ids must be >= 0")
    return value


@functools.cache
def field_model(params: type[BaseModel], name: str) -> type[BaseModel]:
    """A model of ``params``'s field ``name`` alone: one setting checked without the others (its
    type and bounds; not ``params``'s validators)."""
    f = params.model_fields[name]
    return create_model(f"{params.__qualname__}.{name}", __config__=ConfigDict(extra="forbid"), **{name: (f.annotation, f)})
