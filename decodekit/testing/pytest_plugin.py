"""pytest plugin (entry point ``pytest11``): decodekit's conformance checks as fixtures.

pytest loads this module in every project of an environment where decodekit is installed, so it
imports nothing beyond pytest at load time: Hypothesis, which the checks run on, is imported when
a fixture is used, and a missing Hypothesis fails that test with one line saying what to install.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest


def _check(name: str) -> Callable[..., None]:
    import decodekit.testing as testing

    try:
        return getattr(testing, name)
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("hypothesis"):
            raise
    pytest.fail(testing.HYPOTHESIS_MISSING, pytrace=False)  # outside the except: no chained traceback


@pytest.fixture
def decodekit_check_processor() -> Callable[..., None]:
    """``decodekit_check_processor(MyProcessor)`` runs the processor property suite."""
    return _check("check_processor")


@pytest.fixture
def decodekit_check_sampler() -> Callable[..., None]:
    """``decodekit_check_sampler(MySampler)`` runs the sampler property suite."""
    return _check("check_sampler")
