"""The sampler contract and the two basic samplers: greedy and multinomial.

A sampler turns processed logits ``[B, V]`` into one token per row ``[B]``. It is called as
``sampler(input_ids, logits, rng)`` where ``rng`` is the loop's :class:`~decodekit.random.RowRandom`
(per-row streams: use it for every random draw, so runs are reproducible and a row's tokens do
not depend on the rest of the batch). Optional: ``begin(input_ids)`` before the first step (reset
per-sequence state there) and ``reorder(index)`` when rows are re-ordered.

A sampler that drives its own loop (beam search) defines ``drives_loop = True`` and a ``generate``
method; :func:`decodekit.generate` hands it the whole job.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel

from decodekit.processors.base import NoParams
from decodekit.random import RowRandom


_REVERSED: dict[tuple[int, torch.device], torch.Tensor] = {}


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` for ``[B, V]`` float ``x``: the first index of each row's maximum.

    On CPU, ``argmax`` (and ``max`` with indices) run a scalar loop that costs ~10x a vectorised
    reduction; this finds the index with vectorised float ops instead (exact: ``x - max`` is 0
    only at the maximum), about twice as fast at GPT-2's vocabulary. Other devices use ``argmax``.
    """
    n = x.shape[-1]
    if x.device.type != "cpu" or n >= 1 << 24 or not x.is_floating_point() or x.dim() != 2:
        return x.argmax(dim=-1)
    reversed_ = _REVERSED.get((n, x.device))
    if reversed_ is None:  # n, n-1, ..., 1: the largest marks the first index of a tie
        reversed_ = _REVERSED[(n, x.device)] = torch.arange(n, 0, -1, dtype=torch.float32, device=x.device)
    peak = x.float() - x.float().amax(dim=-1, keepdim=True)  # 0 at the maximum, < 0 elsewhere
    first = peak.sign_().add_(1).mul_(reversed_).amax(dim=-1)  # NaN rows (invalid anyway) give NaN
    return (n - first.nan_to_num(nan=float(n))).long().clamp_(0, n - 1)


class Sampler:
    """Base class for samplers (optional for plugins: the call shape is what counts)."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    drives_loop: ClassVar[bool] = False

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor, rng: RowRandom) -> torch.Tensor:
        raise NotImplementedError

    def begin(self, input_ids: torch.Tensor) -> None:
        """Called once with the prompt ``[B, T0]`` before the first step. Default: nothing."""

    @classmethod
    def from_params(cls, params: BaseModel, context: object) -> Sampler:
        return cls(**params.model_dump())

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class Greedy(Sampler):
    """The most likely token: ``argmax_i x_i`` (the first one on ties). Uses no randomness."""

    name = "greedy"

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor, rng: RowRandom | None = None) -> torch.Tensor:
        return argmax(logits)


class Multinomial(Sampler):
    """Draw token ``i`` with probability ``softmax(x)_i``.

    Drawn as ``argmax_i p_i / E_i`` with ``E_i ~ Exp(1)`` (the exponential race, equal in law to
    ``torch.multinomial``), which needs no host sync and no sort. Tokens at ``-inf`` are never
    drawn.
    """

    name = "multinomial"

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor, rng: RowRandom) -> torch.Tensor:
        probs = logits.float().softmax(dim=-1)
        return argmax(probs / rng.exponential(logits.shape[-1]))
