"""Every registered processor and sampler, built-in or plugin, passes the property suite."""

from __future__ import annotations

import pytest

from decodekit import get_registry
from decodekit.testing import check_processor, check_sampler

REGISTRY = get_registry()


@pytest.mark.parametrize("name", sorted(REGISTRY.processors))
def test_processor_keeps_distributions_valid(name: str) -> None:
    check_processor(REGISTRY.processors[name].cls)


@pytest.mark.parametrize("name", sorted(n for n, c in REGISTRY.samplers.items() if not getattr(c.cls, "drives_loop", False)))
def test_sampler_conforms(name: str) -> None:
    check_sampler(REGISTRY.samplers[name].cls)
