"""decodekit's plugin hooks: the one place a plugin author needs to read.

decodekit's own processors and samplers are registered through these very hooks (see
:mod:`decodekit.builtins`); a third-party package does the same from a module named by an entry
point in the ``decodekit`` group::

    # pyproject.toml
    [project.entry-points.decodekit]
    xtc = "decodekit_xtc.plugin"

    # decodekit_xtc/plugin.py
    from decodekit import hookimpl

    @hookimpl
    def decodekit_register_processors():
        return [XTC]

Every hook returns a value; decodekit collects the results of all plugins.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("decodekit")
hookimpl = pluggy.HookimplMarker("decodekit")


# --- components -------------------------------------------------------------------------


@hookspec
def decodekit_register_processors() -> list[type]:
    """Return logits-processor classes to add to the registry.

    Each class has a unique ``name`` (its registry name, used by ``processor_order``), a pydantic
    ``Params`` model whose field names are the settings users write (``top_p=0.9``; unique across
    the registry), and an ``order`` (default position in a chain; built-ins use 10-900: penalties
    and bans below 100, temperature 200, truncation 300-900). Instances are called as
    ``processor(input_ids, logits) -> logits``; see :mod:`decodekit.processors.base`.

    :return: a list of classes (may be empty).
    """


@hookspec
def decodekit_register_samplers() -> list[type]:
    """Return sampler classes to add to the registry.

    Each class has a unique ``name`` (``sampler=NAME`` selects it) and a pydantic ``Params`` model
    whose field names are its settings. Instances are called as
    ``sampler(input_ids, logits, rng) -> tokens``; see :mod:`decodekit.samplers.base`.

    :return: a list of classes (may be empty).
    """


# --- presets ----------------------------------------------------------------------------


@hookspec
def decodekit_register_strategies() -> dict[str, dict[str, Any]]:
    """Return named strategies: presets of settings, selectable with ``strategy=NAME``.

    A strategy is a flat mapping of settings, e.g. ``{"mirostat": {"sampler": "mirostat",
    "tau": 5.0}}``. The command line offers each as an option of its ``strategy`` group, so a
    plugin needs no YAML of its own.

    :return: a mapping from strategy name to its settings (may be empty).
    """
