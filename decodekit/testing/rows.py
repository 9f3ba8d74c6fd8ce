"""The per-row part of the property suite: for classes that declare per-row values (``row_params``).

A request engine decodes many requests in one batch, each with its own settings, and promises
that a row's result is exactly the one it would get alone. For a processor or sampler whose
``supports_rows()`` is true, these checks hold it to that, with Hypothesis:

- per-row values give, row by row, exactly (bitwise) the result of that row alone, built from
  its scalar settings (``from_params``) and run without padding;
- a row whose every setting is off gets its logits back unchanged;
- ``reorder(index)`` gives the rows ``[index]`` of the result;
- ``assign(rows, other)``, with ``other`` built and begun for ``k`` newcomer rows, gives what
  building the whole batch per row gives;
- ``-1`` left padding in the history changes nothing (for a class with ``negative_padding``);
- a scalar build whose ``rows`` is set (as an engine runs one given chain for all its slots)
  takes newcomers' state by ``assign`` and keeps its scalar values.

Both sides are built from settings, as the engine builds them: ``cls.from_row_params`` with one
list per ``row_params`` name, and ``cls.from_params``. A row's values are drawn from the class's
``row_test_values`` (setting -> values a row may take) where given, else from its ``Params``
bounds, and the off value (``row_params``) often. Token ids in ``row_test_values`` must be below 8.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decodekit.processors.base import BanSkippedWarning, BuildContext
from decodekit.random import RowRandom
from decodekit.testing.strategies import logits, padded_history
from decodekit.validation import validate

_MIN_VOCAB = 8  # ids in row_test_values stay below this


def _context(vocab: int) -> BuildContext:
    """What building from settings may need: the last token as EOS, a byte tokenizer folded into the vocabulary."""
    return BuildContext(eos_token_id=[vocab - 1], encode=lambda text: [b % vocab for b in text.encode()], vocab_size=vocab)


def row_settings(cls: type) -> st.SearchStrategy[dict[str, Any]]:
    """One row's values of ``cls``'s per-row settings, each off about a third of the time."""
    from decodekit.testing.suite import _field_strategy

    drawn = {}
    for name, off in cls.row_params.items():
        declared = getattr(cls, "row_test_values", {}).get(name)
        if declared:
            values = st.sampled_from(list(declared))
        else:
            values = _field_strategy(name, cls.Params.model_fields[name])
            if values is None:
                raise AssertionError(
                    f"{cls.__qualname__}: cannot draw per-row setting {name!r}; give the class "
                    "`row_test_values = {name: [off value, other values...]}`"
                )
        drawn[name] = st.one_of(st.just(off), values, values)
    return st.fixed_dictionaries(drawn)


def _per_row(cls: type, rows: list[dict[str, Any]], context: BuildContext) -> Any:
    return cls.from_row_params({name: [row[name] for row in rows] for name in cls.row_params}, {}, context)


def _alone(cls: type, row: dict[str, Any], context: BuildContext) -> Any:
    return cls.from_params(validate(cls.Params, **row), context)


def _run(processor: Any, prompt: torch.Tensor, history: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if hasattr(processor, "begin"):
        processor.begin(prompt)
    return processor(history, x)


def _unpadded(ids: torch.Tensor, row: int) -> torch.Tensor:
    return ids[row][ids[row] >= 0][None]


def _is_off(cls: type, row: dict[str, Any]) -> bool:
    return all(row[name] == off for name, off in cls.row_params.items())


def check_row_processor(cls: type, *, max_examples: int = 40) -> None:
    """Run the per-row checks (module docstring) on processor class ``cls``."""
    name = cls.__qualname__
    padded = bool(getattr(cls, "negative_padding", False))

    @settings(max_examples=max_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        with warnings.catch_warnings():  # drawn logits may leave a ban nothing else: that is allowed
            warnings.simplefilter("ignore", BanSkippedWarning)
            check_one(data)

    def check_one(data: st.DataObject) -> None:
        x = data.draw(logits(batch=st.integers(1, 5), vocab=st.integers(_MIN_VOCAB, 40)), label="logits")
        b, v = x.shape
        context = _context(v)
        rows = data.draw(st.lists(row_settings(cls), min_size=b, max_size=b), label="rows")
        prompt, history = data.draw(padded_history(b, v, padded=padded), label="prompt, history")
        out = _run(_per_row(cls, rows, context), prompt, history, x)
        for i, row in enumerate(rows):
            alone = _run(_alone(cls, row, context), _unpadded(prompt, i), _unpadded(history, i), x[i : i + 1])
            assert torch.equal(out[i : i + 1], alone), f"{name}: row {i} {row} differs from that row alone"
            if _is_off(cls, row):
                assert torch.equal(out[i], x[i]), f"{name}: row {i} is off ({row}) but its logits changed"
        if padded:  # one more column of padding on the left changes nothing
            more = torch.full((b, 1), -1, dtype=torch.long)
            again = _run(_per_row(cls, rows, context), torch.cat([more, prompt], -1), torch.cat([more, history], -1), x)
            assert torch.equal(again, out), f"{name}: -1 padding in the history changed the result"

        index = torch.tensor(data.draw(st.lists(st.integers(0, b - 1), min_size=1, max_size=b + 1), label="index"))
        moved = _per_row(cls, rows, context)
        if hasattr(moved, "begin"):
            moved.begin(prompt)
        moved.reorder(index)
        assert torch.equal(moved(history[index], x[index]), out[index]), f"{name}: reorder({index.tolist()}) moved other rows"

        slots = data.draw(st.lists(st.integers(0, b - 1), min_size=1, max_size=b, unique=True), label="slots")
        before = data.draw(st.lists(row_settings(cls), min_size=b, max_size=b), label="rows before")
        old_prompt, _ = data.draw(padded_history(b, v, padded=padded), label="prompts before")
        old_prompt = _same_width(old_prompt, prompt.shape[-1])
        for i in range(b):  # the rows not replaced keep their prompts and values
            if i not in slots:
                before[i] = rows[i]
                old_prompt[i] = prompt[i]
        live = _per_row(cls, before, context)
        if hasattr(live, "begin"):
            live.begin(old_prompt)
        newcomers = _per_row(cls, [rows[i] for i in slots], context)
        if hasattr(newcomers, "begin"):
            newcomers.begin(_trimmed(prompt[slots]))
        live.assign(torch.tensor(slots), newcomers)
        whole = _per_row(cls, rows, context)
        expected = _run(whole, prompt, history, x)
        assert torch.equal(live(history, x), expected), f"{name}: assign into rows {slots} differs from building the batch"
        assert getattr(live, "active", True) == getattr(whole, "active", True), f"{name}: assign left `active` stale"

        # One scalar build for every slot, as an engine runs a given chain: `rows` set, then
        # newcomers' state (prompt lengths) assigned from scalar builds begun on their prompts.
        shared = _alone(cls, rows[0], context)
        shared.rows = b
        if hasattr(shared, "begin"):
            shared.begin(old_prompt)
        fresh = _alone(cls, rows[0], context)
        if hasattr(fresh, "begin"):
            fresh.begin(_trimmed(prompt[slots]))
        shared.assign(torch.tensor(slots), fresh)
        expected = _run(_alone(cls, rows[0], context), prompt, history, x)
        assert torch.equal(shared(history, x), expected), f"{name}: a scalar build with `rows` set mishandles assign"

    run()


def _same_width(ids: torch.Tensor, width: int) -> torch.Tensor:
    """``ids`` right-aligned in ``width`` columns (cut or left-padded with -1)."""
    if ids.shape[-1] >= width:
        return ids[:, ids.shape[-1] - width :].clone()
    return torch.cat([torch.full((ids.shape[0], width - ids.shape[-1]), -1, dtype=ids.dtype), ids], -1)


def _trimmed(ids: torch.Tensor) -> torch.Tensor:
    """``ids`` without the left columns that are padding in every row (newcomers come padded to their own width)."""
    real = (ids >= 0).any(dim=0).nonzero()
    return ids[:, int(real[0]) :] if real.numel() else ids


def check_row_sampler(cls: type, *, max_examples: int = 30, steps: int = 12) -> None:
    """Run the per-row checks on sampler class ``cls`` over several steps (tokens, not logits)."""
    from decodekit.testing.suite import _long_run_logits

    name = cls.__qualname__

    @settings(max_examples=max_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data(), seed=st.integers(0, 2**31 - 1))
    def run(data: st.DataObject, seed: int) -> None:
        x = data.draw(logits(batch=st.integers(1, 5), vocab=st.integers(_MIN_VOCAB, 40), dtypes=(torch.float32,)))
        b, v = x.shape
        context = _context(v)
        # drawn logits, then moderately spread ones, where a sampler's state (Mirostat's mu) matters most
        per_step = [x, x.roll(1, dims=-1)] + [_long_run_logits(s, b, v) for s in range(steps)]
        rows = data.draw(st.lists(row_settings(cls), min_size=b, max_size=b), label="rows")
        prompt, _ = data.draw(padded_history(b, v), label="prompt")
        seeds = torch.arange(b) + seed

        def tokens(sampler: Any, ids: torch.Tensor, row_seeds: torch.Tensor, rows_of: Any = slice(None), begin: bool = True) -> torch.Tensor:
            if begin and hasattr(sampler, "begin"):
                sampler.begin(ids)
            rng, drawn = RowRandom(row_seeds), []
            for logits_now in per_step:
                token = sampler(ids, logits_now[rows_of], rng)
                drawn.append(token)
                ids = torch.cat([ids, token[:, None]], dim=-1)
            return torch.stack(drawn, dim=-1)

        out = tokens(_per_row(cls, rows, context), prompt, seeds)
        for i, row in enumerate(rows):
            alone = tokens(_alone(cls, row, context), _unpadded(prompt, i), seeds[i : i + 1], slice(i, i + 1))
            assert torch.equal(out[i], alone[0]), f"{name}: row {i} {row} draws other tokens than alone"

        index = torch.tensor(data.draw(st.lists(st.integers(0, b - 1), min_size=1, max_size=b + 1), label="index"))
        moved = _per_row(cls, rows, context)
        if hasattr(moved, "begin"):
            moved.begin(prompt)
        moved.reorder(index)
        got = tokens(moved, prompt[index], seeds[index], index, begin=False)
        assert torch.equal(got, out[index]), f"{name}: reorder({index.tolist()}) moved other rows"

        slots = data.draw(st.lists(st.integers(0, b - 1), min_size=1, max_size=b, unique=True), label="slots")
        before = data.draw(st.lists(row_settings(cls), min_size=b, max_size=b), label="rows before")
        live = _per_row(cls, [rows[i] if i not in slots else before[i] for i in range(b)], context)
        if hasattr(live, "begin"):
            live.begin(prompt)
        newcomers = _per_row(cls, [rows[i] for i in slots], context)
        if hasattr(newcomers, "begin"):
            newcomers.begin(_trimmed(prompt[slots]))
        live.assign(torch.tensor(slots), newcomers)
        assert torch.equal(tokens(live, prompt, seeds, begin=False), out), f"{name}: assign into rows {slots} differs"

    run()
