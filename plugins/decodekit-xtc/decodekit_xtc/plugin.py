"""decodekit's entry point for this package: registers the XTC processor."""

from __future__ import annotations

from decodekit import hookimpl
from decodekit_xtc.xtc import XTC


@hookimpl
def decodekit_register_processors() -> list[type]:
    return [XTC]
