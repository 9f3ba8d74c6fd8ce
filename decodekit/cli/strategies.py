"""Strategies: named presets of settings, built-in (``conf/strategy/*.yaml``) or from plugins.

A strategy sets the sampler and some knobs; keys given on the command line win over it. When
``sampler=`` replaces the sampler of a strategy that was asked for, :func:`sampler_note` says what
the chain keeps (without a strategy, ``sampler=`` drops the default one: see
:func:`decodekit.cli.config.strategy_overrides`).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from decodekit.registry import Registry

if TYPE_CHECKING:
    from decodekit.cli.config import CommandConfig

BUILTIN_STRATEGIES = ("beam", "greedy", "min_p", "nucleus", "sampling", "top_k", "typical")


def strategy_preset(registry: Registry, name: Any) -> dict[str, Any]:
    """The settings strategy ``name`` presets (built-in YAML or a plugin's); empty if unknown."""
    if name in registry.strategies:
        return dict(registry.strategies[name])
    if name in BUILTIN_STRATEGIES:
        return dict(_builtin_preset(name))
    return {}


def sampler_note(config: CommandConfig, registry: Registry) -> str | None:
    """What happened when ``sampler=`` replaced the sampler of the strategy given (else None)."""
    preset = strategy_preset(registry, config.strategy)
    own = preset.get("sampler")
    if own is None or own == config.sampler:
        return None
    kept = " ".join(f"{k}={getattr(config, k)}" for k in preset if k != "sampler" and getattr(config, k, None) is not None)
    note = f"sampler={config.sampler} replaces strategy {config.strategy}'s sampler={own}"
    return note + (f"; the strategy's chain stays: {kept}" if kept else "")


@lru_cache(maxsize=None)
def _builtin_preset(name: str) -> dict[str, Any]:
    text = resources.files("decodekit.conf").joinpath("strategy", f"{name}.yaml").read_text(encoding="utf-8")
    preset = OmegaConf.to_container(OmegaConf.create(text))
    assert isinstance(preset, dict)
    return {str(k): v for k, v in preset.items() if k != "strategy"}


def strategy_hint(registry: Registry, sampler: str) -> str:
    """`` (use strategy=NAME)``: how to choose ``sampler`` (for a setting given without its sampler)."""
    if sampler == "beam":
        return " (use strategy=beam)"
    for name, preset in registry.strategies.items():
        if preset.get("sampler") == sampler:
            return f" (use strategy={name} or sampler={sampler})"
    return f" (set sampler={sampler})"
