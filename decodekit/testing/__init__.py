"""A conformance kit for processors and samplers: Hypothesis strategies and the property suite.

Plugin authors check their classes in one line each::

    from decodekit.testing import check_processor, check_sampler

    def test_xtc_conforms():
        check_processor(XTC)

The same checks are available as pytest fixtures (``decodekit_check_processor``,
``decodekit_check_sampler``) once decodekit is installed.

Hypothesis is a test dependency (``pip install decodekit[test]``), not a dependency of decodekit:
the names below are imported on first use, so importing this package (as pytest does for the
fixtures of :mod:`decodekit.testing.pytest_plugin`, in every project of the environment) never
needs it.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_HOMES = {
    "Case": "strategies",
    "cases": "strategies",
    "input_ids_for": "strategies",
    "logits": "strategies",
    "padded_history": "strategies",
    "check_row_processor": "rows",
    "check_row_sampler": "rows",
    "check_processor": "suite",
    "check_processor_output": "suite",
    "check_sampler": "suite",
    "params_strategy": "suite",
}

__all__ = sorted(_HOMES)

HYPOTHESIS_MISSING = "decodekit's conformance checks need Hypothesis: pip install hypothesis (or decodekit[test])"


def __getattr__(name: str) -> Any:
    """``check_processor`` and the rest, imported from their module when first asked for."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = import_module(f"{__name__}.{home}")
    except ModuleNotFoundError as e:
        if e.name != "hypothesis" and not (e.name or "").startswith("hypothesis."):
            raise
        raise ModuleNotFoundError(HYPOTHESIS_MISSING, name=e.name) from e
    return getattr(module, name)
