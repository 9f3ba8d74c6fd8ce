"""pytest plugin (entry point ``pytest11``): decodekit's conformance checks as fixtures."""

from __future__ import annotations

from collections.abc import Callable

import pytest


@pytest.fixture
def decodekit_check_processor() -> Callable[..., None]:
    """``decodekit_check_processor(MyProcessor)`` runs the processor property suite."""
    from decodekit.testing.suite import check_processor

    return check_processor


@pytest.fixture
def decodekit_check_sampler() -> Callable[..., None]:
    """``decodekit_check_sampler(MySampler)`` runs the sampler property suite."""
    from decodekit.testing.suite import check_sampler

    return check_sampler
