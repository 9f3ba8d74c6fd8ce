"""XTC, "Exclude Top Choices": now and then remove the most likely tokens, leaving the least likely
of them, to steer away from the obvious continuation (llama.cpp's semantics)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from decodekit.processors.base import NEG_INF, LogitsProcessor
from decodekit.processors.rows import prompt_lengths
from decodekit.random import hash32

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_FLOATS = ("xtc_probability", "xtc_threshold")


class XTC(LogitsProcessor):
    """With probability ``xtc_probability`` per step and row, remove every token whose probability
    is at least ``xtc_threshold`` except the least likely of them.

    Let ``A = {i : p_i >= threshold}`` (``p = softmax(x)``). If ``|A| >= 2`` and the step's draw
    ``u <= probability``, every ``i`` in ``A`` with ``x_i > min_{j in A} x_j`` is set to ``-inf``.
    With fewer than two tokens above the threshold nothing happens, so the result always keeps a
    token that was "good enough". A threshold above 0.5 therefore never acts. Typical: probability
    0.5, threshold 0.1. XTC was proposed by p-e-w (text-generation-webui #6335); semantics of
    llama.cpp's ``llama_sampler_xtc``, except that tokens tied with the least likely one in ``A``
    are all kept (llama.cpp keeps one of them, chosen by its sort). ``xtc_min_keep = m``
    (llama.cpp's ``min_keep``, default 0): a step that would leave fewer than ``m`` tokens
    (counting every token not ``-inf``) removes nothing.

    The draw: processors get no random generator, so ``u`` is a hash of ``xtc_seed`` and of the
    row's tokens from the last prompt token on (each row's prompt length comes from ``begin``;
    without a ``begin`` call, all of the row's tokens). It is reproducible, the same for a row
    whatever else is in the batch (negative padding ids are never hashed), and changes every
    step. Rows whose generated tokens agree draw alike; change ``xtc_seed`` to change the draws.

    Per row: each setting takes one value per row (``xtc_probability=[0.0, 0.5]``; 0 is off),
    and a row's draws come from its own seed and tokens, so it acts exactly as it would alone.
    """

    name = "xtc"
    order = 950  # after the other truncation filters
    negative_padding = True
    row_fields = ("xtc_probability", "xtc_threshold", "xtc_seed", "xtc_min_keep", "_prompt_lengths")
    row_params = {"xtc_probability": 0.0, "xtc_threshold": 0.1, "xtc_seed": 0, "xtc_min_keep": 0}

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        xtc_probability: float = Field(default=0.0, ge=0.0, le=1.0, description="chance per step to act; 0 = off")
        xtc_threshold: float = Field(default=0.1, ge=0.0, le=1.0, description="probability that makes a top choice")
        xtc_seed: int = Field(default=0, ge=0, le=_MASK32, description="seed of the per-step draws")
        xtc_min_keep: int = Field(default=0, ge=0, description="act only if at least this many tokens stay")

    def __init__(self, xtc_probability: Any, xtc_threshold: Any = 0.1, xtc_seed: Any = 0, xtc_min_keep: Any = 0) -> None:
        self.init_setting("xtc_probability", xtc_probability)
        self.init_setting("xtc_threshold", xtc_threshold)
        self.init_setting("xtc_seed", xtc_seed, int)
        self.init_setting("xtc_min_keep", xtc_min_keep, int)
        if self.rows is not None:  # a scalar setting next to per-row ones: one value per row
            for name in ("xtc_probability", "xtc_threshold", "xtc_seed", "xtc_min_keep"):
                value = getattr(self, name)
                if not isinstance(value, torch.Tensor):
                    self.init_setting(name, [value] * self.rows, float if name in _FLOATS else int)
        self._prompt_lengths: torch.Tensor | None = None
        self.active = self.any_row_on()

    def any_row_on(self) -> bool:
        p = self.xtc_probability
        return bool((p != 0.0).any()) if isinstance(p, torch.Tensor) else p != 0.0

    def begin(self, input_ids: torch.Tensor) -> None:
        self._prompt_lengths = prompt_lengths(input_ids)

    def draws(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B]`` float32 in (0, 1): this step's draw per row (see the class docstring)."""
        ids = input_ids.to(torch.int64)
        real = ids >= 0  # [B, T]
        count = real.sum(dim=-1)  # [B] tokens per row
        if self._prompt_lengths is None:
            n = count
        else:  # from the last prompt token on; at least the last token
            start = (self._prompt_lengths.to(ids.device) - 1).clamp(min=0)
            n = torch.maximum(count - start, count.clamp(max=1))
        rank = real.cumsum(dim=-1) - 1  # [B, T] index among the row's tokens
        where = rank - (count - n)[:, None]  # position in the hashed window; < 0 before it
        hashed = real & (where >= 0)
        mixed = hash32((hash32(ids.clamp(min=0) & _MASK32) + where.clamp(min=0) * _GOLDEN) & _MASK32)  # [B, T]
        row = torch.where(hashed, mixed, 0).sum(dim=-1) & _MASK32  # [B], order-sensitive through the positions
        seed = self.xtc_seed
        seed = seed.to(ids.device) if isinstance(seed, torch.Tensor) else torch.full_like(n, seed)
        salt = hash32(hash32(seed) ^ n)  # [B]
        bits = hash32(row ^ salt)
        return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return logits
        self.check_batch(logits)
        x = logits.float()
        probs = x.softmax(dim=-1)
        top = (probs >= self.value("xtc_threshold", logits)) & (x > NEG_INF)  # [B, V], the top choices
        least = torch.where(top, x, float("inf")).amin(dim=-1, keepdim=True)  # [B, 1]
        draws = self.draws(input_ids).to(logits.device)[:, None]  # [B, 1]
        removed = top & (x > least)  # [B, V]
        left = (x > NEG_INF).sum(dim=-1, keepdim=True) - removed.sum(dim=-1, keepdim=True)  # [B, 1]
        act = (top.sum(dim=-1, keepdim=True) >= 2) & (draws <= self.value("xtc_probability", logits))  # [B, 1]
        act = act & (left >= self.value("xtc_min_keep", logits))
        return logits.masked_fill(removed & act, NEG_INF)
