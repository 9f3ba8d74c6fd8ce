"""decodekit's own components, registered through the same hooks as any plugin."""

from __future__ import annotations

from decodekit.hookspecs import hookimpl
from decodekit.processors import BUILTIN_PROCESSORS
from decodekit.samplers import BeamSearch, Greedy, Multinomial


@hookimpl
def decodekit_register_processors() -> list[type]:
    return list(BUILTIN_PROCESSORS)


@hookimpl
def decodekit_register_samplers() -> list[type]:
    return [Greedy, Multinomial, BeamSearch]
