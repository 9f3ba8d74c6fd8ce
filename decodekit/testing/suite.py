"""The property suite every processor and sampler must pass, built-in or plugin.

``check_processor(cls)`` and ``check_sampler(cls)`` run Hypothesis over parameters and awkward
logits (see :mod:`decodekit.testing.strategies`) and fail with a message that names the class
and what it did wrong. Besides each call's contract, they check what makes decoding reproducible:
a row's result does not depend on the other rows, and ``begin`` resets per-sequence state (a
sampler is run over several steps, so state such as Mirostat's ``mu`` is exercised).

A class that declares per-row values (``row_params``, see
:mod:`decodekit.processors.base`) is also held to the per-row promise of a request engine: each
row of a batch gets exactly its result alone (:mod:`decodekit.testing.rows`); one that names
other tests in ``row_checks_elsewhere`` is left to them.

Parameters come from the class's ``test_params`` (a list of constructor keyword dicts, or of
callables ``vocab_size -> dict``) when it has them, else they are drawn from its pydantic
``Params`` model's numeric bounds.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from annotated_types import Ge, Gt, Le, Lt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decodekit.processors.base import BanSkippedWarning
from decodekit.random import RowRandom
from decodekit.testing.strategies import Case, cases
from decodekit.testing.rows import check_row_processor, check_row_sampler

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
    """Run the processor property suite on ``cls`` (see the module docstring).

    Besides the contract of :func:`check_processor_output`: a row's output does not depend on the
    other rows of the batch, the same inputs give the same output again after a new ``begin``
    (per-sequence state is reset), and, for a class declared ``idempotent``, a second pass removes
    nothing more.
    """
    if idempotent is None:
        idempotent = bool(getattr(cls, "idempotent", False))
    name = cls.__qualname__

    @settings(max_examples=max_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(params=params_strategy(cls), case=cases())
    def run(params: ParamsFor, case: Case) -> None:
        with warnings.catch_warnings():  # drawn logits may leave a ban nothing else: that is allowed
            warnings.simplefilter("ignore", BanSkippedWarning)
            check_one(params, case)

    def check_one(params: ParamsFor, case: Case) -> None:
        def started(rows: slice) -> Any:
            processor = cls(**params(case.vocab_size))
            if hasattr(processor, "begin"):
                processor.begin(case.input_ids[rows, :1])
            return processor

        processor = started(slice(None))
        out = check_processor_output(processor, case)
        if hasattr(processor, "begin"):
            processor.begin(case.input_ids[:, :1])
            again = processor(case.input_ids, case.logits)
            _assert_same_logits(again, out, f"{name}: after a new begin(), the same inputs gave a different output")
        b = case.logits.shape[0]
        alone = torch.cat([started(slice(i, i + 1))(case.input_ids[i : i + 1], case.logits[i : i + 1]) for i in range(b)])
        _assert_same_logits(alone, out, f"{name}: a row's output changes with the rest of the batch")
        if idempotent:
            twice = processor(case.input_ids, out)
            assert torch.equal(twice == float("-inf"), out == float("-inf")), (
                f"{name} is declared idempotent but a second pass removed more tokens"
            )

    run()
    if declares_rows(cls):
        check_row_processor(cls, max_examples=max(10, max_examples * 2 // 3))


def declares_rows(cls: type) -> bool:
    """Whether ``cls`` declares per-row values (``row_params``), so the per-row checks apply.

    A class whose per-row values cannot be drawn here (they need more than a vocabulary size,
    such as structured output's tokenizer) names the tests that check them instead in
    ``row_checks_elsewhere``, and is left out.
    """
    return bool(getattr(cls, "row_params", None)) and not getattr(cls, "row_checks_elsewhere", "")


def _assert_same_logits(actual: torch.Tensor, expected: torch.Tensor, message: str) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, message
    assert torch.equal(actual == float("-inf"), expected == float("-inf")), f"{message} (removed tokens differ)"
    finite = expected > float("-inf")
    assert torch.allclose(actual[finite].float(), expected[finite].float(), rtol=1e-5, atol=1e-6), message


# --- samplers -------------------------------------------------------------------------------


def _step_logits(logits: torch.Tensor, step: int) -> torch.Tensor:
    """A different distribution per step, every row still valid: the vocabulary rolled."""
    return logits if step == 0 else logits.roll(step, dims=-1)


def _long_run_logits(step: int, batch: int = 4, vocab: int = 64) -> torch.Tensor:
    """``[batch, vocab]`` geometric distributions, a different decay per row, rolled per step.

    Neither peaked nor flat, so a sampler that truncates (and adapts how much, as Mirostat does)
    cuts tokens that would otherwise be drawn: state that leaks between sequences or rows shows.
    """
    rates = torch.tensor([0.05, 0.2, 0.5, 1.0])[:batch, None].repeat(-(-batch // 4), 1)[:batch]
    logits = -rates * torch.arange(vocab, dtype=torch.float32)
    shifts = [(step * 7 + r * 13) % vocab for r in range(batch)]
    return torch.stack([row.roll(k) for row, k in zip(logits, shifts)])


def check_sampler(cls: type, *, max_examples: int = 40, steps: int = 4, long_run: int = 24) -> None:
    """Run the sampler property suite on ``cls`` over sequences of several steps.

    Every token is in range and never a removed one; the same seeds give the same tokens; a row's
    tokens do not depend on the rest of the batch (so per-row state, such as Mirostat's ``mu``,
    must be kept per row); and ``begin`` resets per-sequence state: the same instance, started
    again on the same prompt, draws the same tokens again. Each example runs ``steps`` steps on
    drawn logits, then ``long_run`` steps on moderately spread ones, where state matters most.
    """
    name = cls.__qualname__

    @settings(max_examples=max_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(params=params_strategy(cls), case=cases(dtypes=(torch.float32,)), seed=st.integers(0, 2**31 - 1))
    def run(params: ParamsFor, case: Case, seed: int) -> None:
        b, v = case.logits.shape
        scenarios = [
            (case.input_ids, [_step_logits(case.logits, step) for step in range(steps)]),
            (case.input_ids[:1].expand(4, -1) % 64, [_long_run_logits(step) for step in range(long_run)]),
        ]
        for prompt, per_step in scenarios if long_run else scenarios[:1]:
            _check_sequences(cls, name, params, prompt, per_step, seed)

    run()
    if declares_rows(cls):
        check_row_sampler(cls, max_examples=max(8, max_examples * 2 // 3))


def _check_sequences(
    cls: type, name: str, params: ParamsFor, prompt: torch.Tensor, per_step: list[torch.Tensor], seed: int
) -> None:
    """Run ``per_step`` logits through fresh and reused samplers, whole batch and row by row."""
    b, v = per_step[0].shape
    seeds = torch.arange(b) + seed

    def sequence(sampler: Any, rows: slice) -> torch.Tensor:
        """``[rows, steps]`` tokens drawn one step at a time, each appended to the history."""
        ids = prompt[rows]
        if hasattr(sampler, "begin"):
            sampler.begin(ids)
        rng = RowRandom(seeds[rows])
        drawn = []
        for step, all_logits in enumerate(per_step):
            logits = all_logits[rows]
            tokens = sampler(ids, logits, rng)
            assert isinstance(tokens, torch.Tensor) and tokens.shape == logits.shape[:1], (
                f"{name} returned shape {getattr(tokens, 'shape', None)}, expected {tuple(logits.shape[:1])}"
            )
            assert tokens.dtype == torch.long, f"{name} returned dtype {tokens.dtype}, expected torch.int64"
            assert ((tokens >= 0) & (tokens < v)).all(), f"{name} returned a token outside [0, {v})"
            chosen = logits.gather(-1, tokens[:, None])
            assert torch.isfinite(chosen).all(), f"{name} chose a removed (-inf) token at step {step}"
            drawn.append(tokens)
            ids = torch.cat([ids, tokens[:, None]], dim=-1)
        return torch.stack(drawn, dim=-1)

    sampler = cls(**params(v))
    tokens = sequence(sampler, slice(None))
    assert torch.equal(tokens, sequence(cls(**params(v)), slice(None))), f"{name} is not reproducible for the same seeds"
    assert torch.equal(tokens, sequence(sampler, slice(None))), (
        f"{name}: begin() did not reset its state: the same sequence started again drew other tokens"
    )
    alone = torch.cat([sequence(cls(**params(v)), slice(i, i + 1)) for i in range(b)])
    assert torch.equal(tokens, alone), f"{name}: a row's tokens change with the rest of the batch"
