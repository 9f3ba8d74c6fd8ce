"""Sorting-free nucleus (top-p) sampling by rejection, with the sort-based path as fallback.

Drawing from ``TopP(p)`` then ``Multinomial`` needs the nucleus, which the filter finds by sorting
the vocabulary. :func:`sample_top_p` draws the same distribution without a sort, as FlashInfer's
samplers do: draw a token from the whole distribution; accept it if it is in the nucleus, else
every token no more likely than it is outside the nucleus too, so drop them and draw again.

A token of probability ``q`` is in the nucleus (``TopP``'s rule, ties kept together) when
``L(q) + q > 1 - p``, where ``L(q)`` is the mass of tokens less likely than ``q``. ``L(q) + q``
grows with ``q``, so a rejected ``q`` rules out every token with probability ``<= q``. Each round
draws with fresh uniforms from the tokens still in play, so an accepted token is distributed as
the probabilities within the nucleus: exactly the law of the sort-based path (tests compare the
frequencies). A round costs a few passes over the vocabulary; usually one round suffices (a
draw lands outside the nucleus with probability ``1 - p`` at most). Rows still undecided after
``rounds`` rounds take the sort-based path. On CPU each round after the first works on the
undecided rows only and the loop stops as soon as every row is decided; on other devices it runs
all rounds and the fallback on every row, so that it never waits for the device (no host sync).
Every call takes one draw of the row streams (:meth:`~decodekit.random.RowRandom.next_draw`);
round ``r`` uses its sub-draw ``r`` and the fallback sub-draw ``rounds``. Round 0 is the plain
draw, so a row whose nucleus is everything (``top_p = 1``) gets exactly the token
:class:`~decodekit.samplers.Multinomial` draws, and what follows never depends on how many rounds
were needed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from decodekit.processors.base import ProcessorChain
from decodekit.processors.rows import column
from decodekit.processors.sorting import Workspace
from decodekit.processors.truncation import TopK, TopP, nucleus_bounds
from decodekit.random import RowRandom
from decodekit.samplers.base import Multinomial, Sampler, sample_probs

ROUNDS = 8


def sample_top_p(logits: torch.Tensor, top_p: float | torch.Tensor, rng: RowRandom, *, rounds: int = ROUNDS) -> torch.Tensor:
    """One token per row from ``softmax(TopP(top_p)(logits))``, without sorting. ``[B, V] -> [B]``.

    ``top_p``: one value, or one per row (``[B]``; 1 = the whole distribution, as ``Multinomial``).
    """
    probs = logits.float().softmax(dim=-1)  # [B, V]
    draw = rng.next_draw()  # round r uses sub-draw r of this draw; the fallback sub-draw `rounds`
    rounds_on = _rounds_shrinking if probs.device.type == "cpu" else _rounds_all_rows
    return rounds_on(logits, probs, lambda r: rng.uniform(2, draw=draw, sub=r), top_p, rounds)


class NucleusMultinomial(Sampler):
    """``TopP(p)`` then :class:`~decodekit.samplers.Multinomial`, fused: draws by rejection, no sort.

    Built by :func:`fuse`, never by name. ``recorded_filter`` is the ``TopP`` it stands for, so a
    caller that records processed logits (``output_scores``) can apply it for the record.
    """

    name = "nucleus_multinomial"

    def __init__(self, top_p: TopP) -> None:
        self.recorded_filter = top_p
        self._workspace = Workspace()  # the record's sort buffers, kept from step to step

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor, rng: RowRandom) -> torch.Tensor:
        return sample_top_p(logits, self.recorded_filter.top_p, rng)

    def nucleus(self, logits: torch.Tensor, token: torch.Tensor, whole: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(floor, lse)`` ``[B, 1]`` of the nucleus each row's ``token`` was drawn from (see
        :func:`~decodekit.processors.truncation.nucleus_bounds`), for processed logprobs without
        a cut ``[B, V]`` tensor. Rows where ``whole`` is set take the whole distribution. The
        drawn token is always in it: where rounding put it under the floor, the floor is lowered
        to it and its mass added.
        """
        p = self.recorded_filter.top_p
        if isinstance(p, torch.Tensor):
            p = column(p, logits, torch.float64)  # [B, 1]
        tail = torch.full_like(logits[:, :1], 1.0, dtype=torch.float64) - p
        if whole is not None:
            tail = tail.masked_fill(whole[:, None], 0.0)
        floor, lse = nucleus_bounds(logits, tail.float(), workspace=self._workspace)
        picked = logits.gather(-1, token.clamp(min=0)[:, None]).float()
        under = picked < floor
        return torch.where(under, picked, floor), torch.where(under, torch.logaddexp(lse, picked), lse)

    def reorder(self, index: torch.Tensor) -> None:
        reorder = getattr(self.recorded_filter, "reorder", None)
        if reorder is not None:
            reorder(index)

    def assign(self, rows: torch.Tensor, other: NucleusMultinomial) -> None:
        assign = getattr(self.recorded_filter, "assign", None)
        if assign is not None:
            assign(rows, other.recorded_filter)


def fuse(chain: ProcessorChain, sampler: Any) -> tuple[ProcessorChain, Any]:
    """The chain and sampler to run for ``chain`` then ``sampler``: the same law, maybe faster.

    A chain ending in ``TopP`` (keeping at least one token) before plain ``Multinomial`` hands
    the filter to :class:`NucleusMultinomial`, which samples the nucleus without sorting (processors
    that are off, ``active = False``, do nothing and are left out first). A
    ``TopK | TopP`` pair is fused in the chain already (``TopKTopP``) and stays there. Anything
    else is returned as it is.
    """
    steps = [p for p in chain.processors if getattr(p, "active", True)]  # "off" processors do nothing
    last = steps[-1] if steps else None
    after_top_k = len(steps) > 1 and type(steps[-2]) is TopK
    if type(sampler) is Multinomial and type(last) is TopP and last.min_tokens_to_keep == 1 and not after_top_k:
        p = last.top_p
        if isinstance(p, torch.Tensor) or 0.0 < p < 1.0:  # p = 1 is off and p = 0 is argmax: no rounds
            return ProcessorChain(steps[:-1]), NucleusMultinomial(last)
    return chain, sampler


def _round(probs: torch.Tensor, weights: torch.Tensor, u: torch.Tensor, top_p: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A draw from ``weights`` per row ``[B]`` and whether it is in the nucleus of ``probs`` ``[B]`` bool."""
    pick = sample_probs(weights, u)  # [B]
    q = probs.gather(-1, pick[:, None])  # [B, 1]
    # L(q), the mass of less likely tokens; the mask as a 0/1 float (``sign`` of a clamped
    # difference): exact, and on CPU several times faster than a comparison to bool and ``where``.
    below = torch.linalg.vecdot(probs, _indicator(q - probs), dim=-1)
    if isinstance(top_p, torch.Tensor):  # one value per row: the same comparison TopP makes
        return pick, (below + q.squeeze(-1)) > (1.0 - top_p.to(probs.device, torch.float64)).float()
    return pick, (below + q.squeeze(-1)) > 1.0 - top_p


def _rounds_all_rows(
    logits: torch.Tensor, probs: torch.Tensor, uniform: Callable[[int], torch.Tensor], top_p: Any, rounds: int
) -> torch.Tensor:
    """The rounds on an accelerator: all of them on every row, then the fallback; no host sync."""
    low = torch.full_like(probs[:, :1], -1.0)  # in play: probability > low
    token = torch.zeros(probs.shape[0], dtype=torch.long, device=probs.device)
    done = torch.zeros(probs.shape[0], dtype=torch.bool, device=probs.device)
    for r in range(rounds):
        weights = probs if r == 0 else probs * _indicator(probs - low)
        pick, accept = _round(probs, weights, uniform(r), top_p)
        accept &= ~done
        token = torch.where(accept, pick, token)
        done = done | accept
        low = torch.where(accept[:, None], low, probs.gather(-1, pick[:, None]))
    fallback = sample_probs(_nucleus(logits, probs, top_p), uniform(rounds))
    return torch.where(done, token, fallback)


def _rounds_shrinking(
    logits: torch.Tensor, probs: torch.Tensor, uniform: Callable[[int], torch.Tensor], top_p: Any, rounds: int
) -> torch.Tensor:
    """The rounds on CPU, where looking at the result is free: each round after the first works
    on the rows still undecided only (usually one or two of a batch), and stops when none is."""
    token = torch.zeros(probs.shape[0], dtype=torch.long)
    rows = torch.arange(probs.shape[0])
    weights = probs
    for r in range(rounds):
        pick, accept = _round(probs, weights, uniform(r)[rows], top_p)
        token[rows[accept]] = pick[accept]
        if bool(accept.all()):
            return token
        keep = ~accept
        rows, probs, logits, pick = rows[keep], probs[keep], logits[keep], pick[keep]
        if isinstance(top_p, torch.Tensor):
            top_p = top_p[keep]
        low = probs.gather(-1, pick[:, None])  # rejected: so is every token no more likely
        weights = probs * _indicator(probs - low)
    token[rows] = sample_probs(_nucleus(logits, probs, top_p), uniform(rounds)[rows])
    return token


def _nucleus(logits: torch.Tensor, probs: torch.Tensor, top_p: Any) -> torch.Tensor:
    """``probs`` outside the nucleus set to 0, the nucleus found by the sort-based filter."""
    return torch.where(TopP(top_p)(None, logits) > float("-inf"), probs, 0.0)


def _indicator(x: torch.Tensor) -> torch.Tensor:
    """``1.0`` where ``x > 0``, else ``0.0`` (``x`` is overwritten). Exact: ``a - b > 0`` iff ``a > b``
    in IEEE arithmetic with gradual underflow."""
    return x.clamp_(min=0).sign_()
