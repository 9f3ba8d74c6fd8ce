"""Hypothesis strategies for decoding inputs: logits with the awkward cases built in.

Shared by decodekit's own tests and by plugin authors' (through :mod:`decodekit.testing`). Logits
cover ordinary values, huge magnitudes, ``-inf`` sprinkled in (every row keeps a finite token),
rows of equal values, ``V = 1``, and float32, float16 and bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BOUND = {torch.float32: 2.0**100, torch.float16: 6e4, torch.bfloat16: 2.0**100}


@dataclass(frozen=True)
class Case:
    """One processor call's inputs: ``input_ids [B, T]`` and ``logits [B, V]``."""

    input_ids: torch.Tensor
    logits: torch.Tensor

    @property
    def vocab_size(self) -> int:
        return self.logits.shape[-1]

    def __repr__(self) -> str:  # Hypothesis prints this on failure
        return f"Case(input_ids={self.input_ids.tolist()}, logits={self.logits.tolist()}, dtype={self.logits.dtype})"


@st.composite
def logits(
    draw: st.DrawFn,
    *,
    batch: st.SearchStrategy[int] = st.integers(1, 4),
    vocab: st.SearchStrategy[int] = st.integers(1, 48),
    dtypes: tuple[torch.dtype, ...] = DTYPES,
    allow_neg_inf: bool = True,
) -> torch.Tensor:
    """A ``[B, V]`` logits tensor: finite or ``-inf``, at least one finite value per row."""
    b, v = draw(batch), draw(vocab)
    dtype = draw(st.sampled_from(dtypes))
    kind = draw(st.sampled_from(["normal", "normal", "wide", "huge", "equal", "few_values"]))
    n = b * v
    if kind == "normal":
        values = draw(st.lists(st.floats(-20, 20, width=32), min_size=n, max_size=n))
    elif kind == "wide":
        values = draw(st.lists(st.floats(-1e3, 1e3, width=32), min_size=n, max_size=n))
    elif kind == "huge":
        bound = _BOUND[dtype]
        values = draw(st.lists(st.floats(-bound, bound, width=32), min_size=n, max_size=n))
    elif kind == "equal":
        row = draw(st.lists(st.floats(-50, 50, width=32), min_size=b, max_size=b))
        values = [row[i // v] for i in range(n)]
    else:  # a few distinct values, many ties
        choices = draw(st.lists(st.floats(-10, 10, width=32), min_size=1, max_size=3))
        values = draw(st.lists(st.sampled_from(choices), min_size=n, max_size=n))
    x = torch.tensor(values, dtype=torch.float32).reshape(b, v)
    if allow_neg_inf and v > 1 and draw(st.booleans()):
        removed = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n))).reshape(b, v)
        keep = torch.tensor(draw(st.lists(st.integers(0, v - 1), min_size=b, max_size=b)))
        removed[torch.arange(b), keep] = False  # every row keeps at least one token
        x = x.masked_fill(removed, float("-inf"))
    return x.to(dtype)


@st.composite
def input_ids_for(draw: st.DrawFn, batch: int, vocab: int, length: st.SearchStrategy[int] = st.integers(1, 12)) -> torch.Tensor:
    """``[batch, T]`` token ids below ``vocab``, with repeats likely (so penalties have work)."""
    t = draw(length)
    alphabet = st.integers(0, min(vocab - 1, draw(st.sampled_from([1, 3, 7, 63]))))
    values = draw(st.lists(alphabet, min_size=batch * t, max_size=batch * t))
    return torch.tensor(values, dtype=torch.long).reshape(batch, t)


@st.composite
def cases(draw: st.DrawFn, **logits_kwargs: object) -> Case:
    """A :class:`Case`: logits from :func:`logits` and a history to go with them."""
    x = draw(logits(**logits_kwargs))
    ids = draw(input_ids_for(x.shape[0], x.shape[1]))
    return Case(ids, x)


@st.composite
def padded_history(draw: st.DrawFn, batch: int, vocab: int, *, padded: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompts [B, T0], history [B, T])``: prompts of different lengths right-aligned and
    left-padded with ``-1`` (as a request engine holds them), then the same number of generated
    tokens in every row. ``padded=False``: every prompt has length ``T0``, no padding."""
    lengths = draw(st.lists(st.integers(1, 6), min_size=batch, max_size=batch))
    if not padded:
        lengths = [max(lengths)] * batch
    t0 = max(lengths)
    new = draw(st.integers(0, 5))
    alphabet = st.integers(0, min(vocab - 1, draw(st.sampled_from([2, 5, 63]))))
    rows = [draw(st.lists(alphabet, min_size=n + new, max_size=n + new)) for n in lengths]
    history = torch.tensor([[-1] * (t0 - n) + r for n, r in zip(lengths, rows)], dtype=torch.long)
    return history[:, :t0], history
