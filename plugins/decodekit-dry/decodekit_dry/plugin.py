"""decodekit's entry point for this package: registers the DRY processor."""

from __future__ import annotations

from decodekit import hookimpl
from decodekit_dry.dry import DRY


@hookimpl
def decodekit_register_processors() -> list[type]:
    return [DRY]
