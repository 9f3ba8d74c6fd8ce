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

from decodekit.kernels import logits_ops
from decodekit.processors.base import NoParams
from decodekit.random import RowRandom


_REVERSED: dict[tuple[int, torch.device], torch.Tensor] = {}


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` for ``[B, V]`` float ``x``: the first index of each row's maximum.

    On CPU, ``argmax`` (and ``max`` with indices) run a scalar loop that costs ~10x a vectorised
    reduction; this finds the index with vectorised float ops instead (exact: ``x - max`` is 0
    only at the maximum), about twice as fast at GPT-2's vocabulary. Other devices use ``argmax``.
    Where this process has loaded decodekit's native CPU kernels (:mod:`decodekit.kernels`), float32
    rows take their one-operator argmax instead: the same indices, and fewer operators for a step
    that runs after the weights have flushed the caches.
    """
    n = x.shape[-1]
    if x.device.type != "cpu" or n >= 1 << 24 or not x.is_floating_point() or x.dim() != 2:
        return x.argmax(dim=-1)
    ops = logits_ops(x)
    if ops is not None:
        return ops.argmax_rows(x)  # the same indices in one operator
    reversed_ = _REVERSED.get((n, x.device))
    if reversed_ is None:  # n, n-1, ..., 1: the largest marks the first index of a tie
        reversed_ = _REVERSED[(n, x.device)] = torch.arange(n, 0, -1, dtype=torch.float32, device=x.device)
    x = x.float()
    peak = x - x.amax(dim=-1, keepdim=True)  # 0 at the maximum, < 0 elsewhere
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

    Drawn by inverse transform from two uniforms per row (:func:`sample_probs`): the law of
    ``torch.multinomial``, with no host sync, no sort, and no random number per vocabulary entry.
    Tokens at ``-inf`` are never drawn.
    """

    name = "multinomial"

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor, rng: RowRandom) -> torch.Tensor:
        return sample_probs(logits.float().softmax(dim=-1), rng.uniform(2))


BLOCK = 256  # tokens per block in sample_probs


def sample_probs(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One index per row, ``i`` with probability ``weights[b, i] / weights[b].sum()``. ``[B, V] -> [B]``.

    ``weights`` are ``>= 0`` with a positive sum per row; ``u`` is ``[B, 2]`` uniform in (0, 1).
    Inverse transform sampling in two levels: ``u[:, 0]`` picks a block of :data:`BLOCK`
    consecutive tokens by the blocks' masses, ``u[:, 1]`` a token within the block by its
    cumulative sum. That reads the vocabulary once (the block sums) instead of scanning it with a
    cumulative sum or drawing a random number per token. Intervals are half-open on the right,
    so a token of weight 0 is never picked.
    """
    batch, n = weights.shape
    full = n // BLOCK * BLOCK  # the columns in whole blocks; the rest is one shorter block
    sums = weights[:, :full].unflatten(-1, (full // BLOCK, BLOCK)).sum(dim=-1)  # a view: no copy
    if full < n:
        sums = torch.cat([sums, weights[:, full:].sum(dim=-1, keepdim=True)], dim=-1)
    block = _inverse_cdf(sums, u[:, :1])  # [B, 1]
    columns = block * BLOCK + torch.arange(BLOCK, device=weights.device)  # [B, BLOCK]
    inside = weights.gather(1, columns.clamp(max=n - 1))
    if full < n:  # the short block: columns past the end weigh nothing
        inside = inside * (columns < n)
    return (block * BLOCK + _inverse_cdf(inside, u[:, 1:])).squeeze(1).clamp_(max=n - 1)


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``[B, m]`` weights, ``[B, 1]`` uniforms -> ``[B, 1]``: the first ``i`` with ``cumsum_i > u * total``."""
    cumulative = weights.cumsum(dim=-1)
    total = cumulative[:, -1:]
    target = torch.minimum(u * total, total.nextafter(torch.zeros_like(total)))  # strictly below the total
    return torch.searchsorted(cumulative, target, right=True).clamp_(max=weights.shape[-1] - 1)
