"""The property suite every processor and sampler must pass, built-in or plugin.

``check_processor(cls)`` and ``check_sampler(cls)`` run Hypothesis over parameters and awkward
logits (see :mod:`decodekit.testing.strategies`) and fail with a message that names the class
and what it did wrong. Parameters come from the class's ``test_params`` (a list of constructor
keyword dicts, or of callables ``vocab_size -> dict``) when it has them, else they are drawn from
its pydantic ``Params`` model's numeric bounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from annotated_types import Ge, Gt, Le, Lt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decodekit.random import RowRandom
from decodekit.testing.strategies import Case, cases

ParamsFor = Callable[[int], dict[str, Any]]


# --- parameters -----------------------------------------------------------------------------


def _field_strategy(name: str, field: Any) -> st.SearchStrategy[Any] | None:
    lo = hi = None
    lo_open = hi_open = False
    for m in field.metadata:
        if isinstance(m, Ge):
            lo = m.ge
        elif isinstance(m, Gt):
            lo, lo_open = m.gt, True
        elif isinstance(m, Le):
            hi = m.le
        elif isinstance(m, Lt):
            hi, hi_open = m.lt, True
    annotation = field.annotation
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        low = (lo + 1 if lo_open else lo) if lo is not None else -5
        high = (hi - 1 if hi_open else hi) if hi is not None else low + 20
        return st.integers(int(math.ceil(low)), int(math.floor(high)))
    if annotation is float:
        low = lo if lo is not None else -10.0
        high = hi if hi is not None else max(low, 0.0) + 10.0
        return st.floats(low, high, exclude_min=lo_open, exclude_max=hi_open, allow_nan=False, allow_infinity=False)
    return None


def params_strategy(cls: type) -> st.SearchStrategy[ParamsFor]:
    """Constructor arguments for ``cls``, as functions of the vocabulary size."""
    declared = getattr(cls, "test_params", None)
    if declared:
        return st.sampled_from([p if callable(p) else (lambda v, p=p: dict(p)) for p in declared])
    fields = getattr(cls, "Params").model_fields
    drawn: dict[str, st.SearchStrategy[Any]] = {}
    for name, field in fields.items():
        strategy = _field_strategy(name, field)
        if strategy is None:
            if field.is_required():
                raise AssertionError(
                    f"{cls.__qualname__}: cannot draw setting {name!r} ({field.annotation}); "
                    "give the class a `test_params` list of constructor keyword dicts"
                )
            continue
        drawn[name] = strategy
    return st.fixed_dictionaries(drawn).map(lambda d: (lambda v: dict(d)))


# --- processors -----------------------------------------------------------------------------


def check_processor_output(processor: Any, case: Case) -> torch.Tensor:
    """Assert the processor contract on one call; returns the output."""
    name = type(processor).__qualname__
    ids, x = case.input_ids, case.logits
    before_ids, before_x = ids.clone(), x.clone()
    out = processor(ids, x)
    assert isinstance(out, torch.Tensor), f"{name} returned {type(out).__name__}, not a tensor"
    assert out.shape == x.shape, f"{name} changed the shape {tuple(x.shape)} -> {tuple(out.shape)}"
    assert out.dtype == x.dtype, f"{name} changed the dtype {x.dtype} -> {out.dtype}"
    assert torch.equal(ids, before_ids), f"{name} changed input_ids in place"
    assert torch.equal(x, before_x) or torch.equal(torch.isnan(x), torch.isnan(before_x)), f"{name} changed logits in place"
    assert not torch.isnan(out).any(), f"{name} returned NaN"
    assert not (out == float("inf")).any(), f"{name} returned +inf"
    assert torch.isfinite(out).any(dim=-1).all(), f"{name} left a row with no finite token"
    probs = out.float().softmax(dim=-1)
    assert torch.isfinite(probs).all(), f"{name}: softmax of the output is not finite"
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[0]), atol=1e-4), f"{name}: softmax does not sum to 1"
    assert (probs >= 0).all()
    return out


def check_processor(cls: type, *, max_examples: int = 60, idempotent: bool | None = None) -> None:
    """Run the processor property suite on ``cls`` (see the module docstring)."""
    if idempotent is None:
        idempotent = bool(getattr(cls, "idempotent", False))

    @settings(max_examples=max_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(params=params_strategy(cls), case=cases())
    def run(params: ParamsFor, case: Case) -> None:
        processor = cls(**params(case.vocab_size))
        if hasattr(processor, "begin"):
            processor.begin(case.input_ids[:, :1])
        out = check_processor_output(processor, case)
        if idempotent:
            again = processor(case.input_ids, out)
            assert torch.equal(again == float("-inf"), out == float("-inf")), (
                f"{cls.__qualname__} is declared idempotent but a second pass removed more tokens"
            )

    run()


# --- samplers -------------------------------------------------------------------------------


def check_sampler(cls: type, *, max_examples: int = 40) -> None:
    """Run the sampler property suite on ``cls``: shape, range, never a removed token,
    reproducible for the same seeds, and a row's token independent of the rest of the batch."""
    name = cls.__qualname__

    @settings(max_examples=max_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(params=params_strategy(cls), case=cases(dtypes=(torch.float32,)), seed=st.integers(0, 2**31 - 1))
    def run(params: ParamsFor, case: Case, seed: int) -> None:
        b, v = case.logits.shape
        seeds = torch.arange(b) + seed

        def draw(rows: slice) -> torch.Tensor:
            sampler = cls(**params(v))
            if hasattr(sampler, "begin"):
                sampler.begin(case.input_ids[rows])
            return sampler(case.input_ids[rows], case.logits[rows], RowRandom(seeds[rows]))

        tokens = draw(slice(None))
        assert isinstance(tokens, torch.Tensor) and tokens.shape == (b,), f"{name} returned shape {getattr(tokens, 'shape', None)}"
        assert tokens.dtype == torch.long, f"{name} returned dtype {tokens.dtype}, expected torch.int64"
        assert ((tokens >= 0) & (tokens < v)).all(), f"{name} returned a token outside [0, {v})"
        chosen = case.logits.gather(-1, tokens[:, None])
        assert torch.isfinite(chosen).all(), f"{name} chose a removed (-inf) token"
        assert torch.equal(tokens, draw(slice(None))), f"{name} is not reproducible for the same seeds"
        alone = torch.cat([draw(slice(i, i + 1)) for i in range(b)])
        assert torch.equal(tokens, alone), f"{name}: a row's token changes with the rest of the batch"

    run()
