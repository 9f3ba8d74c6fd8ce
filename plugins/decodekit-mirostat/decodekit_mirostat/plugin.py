"""decodekit's entry point for this package: registers the Mirostat sampler and strategy."""

from __future__ import annotations

from typing import Any

from decodekit import hookimpl
from decodekit_mirostat.mirostat import Mirostat


@hookimpl
def decodekit_register_samplers() -> list[type]:
    return [Mirostat]


@hookimpl
def decodekit_register_strategies() -> dict[str, dict[str, Any]]:
    return {"mirostat": {"sampler": "mirostat", "tau": 5.0, "eta": 0.1}}
