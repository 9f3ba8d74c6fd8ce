"""Sorting-free nucleus (top-p) sampling by rejection, with the sort-based path as fallback.

Drawing from ``TopP(p)`` then ``Multinomial`` needs the nucleus, which the filter finds by sorting
the vocabulary. :func:`sample_top_p` draws the same distribution without a sort, as FlashInfer's
samplers do: take the best candidate of the exponential race; accept it if it is in the nucleus,
else every token no more likely than it is outside the nucleus too, so drop them and look again.

A token of probability ``q`` is in the nucleus (``TopP``'s rule, ties kept together) when
``L(q) + q > 1 - p``, where ``L(q)`` is the mass of tokens less likely than ``q``. ``L(q) + q``
grows with ``q``, so a rejected ``q`` rules out every token with probability ``<= q``. Conditioned
on acceptance, the draw is proportional to the probabilities within the nucleus: exactly the
distribution of the sort-based path (with the same race, the same token). Each round costs a few passes over the vocabulary;
usually one or two rounds suffice. Rows still undecided after ``rounds`` rounds take the
sort-based path. On CPU the loop stops as soon as every row is decided; on other devices it runs
all rounds and the fallback, so that it never waits for the device (no host sync).
"""

from __future__ import annotations

import torch

from decodekit.processors.truncation import TopP
from decodekit.random import RowRandom
from decodekit.samplers.base import argmax

ROUNDS = 8


def sample_top_p(logits: torch.Tensor, top_p: float, rng: RowRandom, *, rounds: int = ROUNDS) -> torch.Tensor:
    """One token per row from ``softmax(TopP(top_p)(logits))``, without sorting. ``[B, V] -> [B]``.

    Takes one exponential draw ``E``, as :class:`~decodekit.samplers.Multinomial` does, and
    returns ``argmax p_i / E_i`` over the nucleus: the very token ``Multinomial`` picks after
    ``TopP`` with the same draw (up to float rounding at the nucleus boundary). Every round looks
    at the best remaining candidate; if it is outside the nucleus, so is every token no more
    likely than it, and those are dropped.
    """
    probs = logits.float().softmax(dim=-1)  # [B, V]
    race = probs / rng.exponential(probs.shape[-1])  # the exponential race, as Multinomial
    low = torch.full_like(probs[:, :1], -1.0)  # candidates: probability > low
    token = torch.zeros(probs.shape[0], dtype=torch.long, device=probs.device)
    done = torch.zeros(probs.shape[0], dtype=torch.bool, device=probs.device)
    for r in range(rounds):
        # Masks as 0/1 floats (``sign`` of a clamped difference): exact, and on CPU several times
        # faster than comparisons to bool and ``where`` over [B, V].
        candidates = race if r == 0 else race * _indicator(probs - low)  # race >= 0: dropped ones get 0
        pick = argmax(candidates)[:, None]  # [B, 1]
        q = probs.gather(-1, pick)
        below = torch.linalg.vecdot(probs, _indicator(q - probs), dim=-1).unsqueeze(-1)  # L(q)
        accept = ((below + q) > 1.0 - top_p).squeeze(-1) & ~done
        token = torch.where(accept, pick.squeeze(-1), token)
        done = done | accept
        low = torch.where(accept[:, None], low, q)
        if probs.device.type == "cpu" and bool(done.all()):  # on CPU a sync is free; elsewhere no sync
            return token
    # fallback for undecided rows: the sort-based filter, the same race
    nucleus = TopP(top_p)(None, logits) > float("-inf")
    fallback = torch.where(nucleus, race, -1.0).argmax(dim=-1)
    return torch.where(done, token, fallback)


def _indicator(x: torch.Tensor) -> torch.Tensor:
    """``1.0`` where ``x > 0``, else ``0.0`` (``x`` is overwritten). Exact: ``a - b > 0`` iff ``a > b``
    in IEEE arithmetic with gradual underflow."""
    return x.clamp_(min=0).sign_()
