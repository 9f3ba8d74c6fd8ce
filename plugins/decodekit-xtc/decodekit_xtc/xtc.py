"""XTC, "Exclude Top Choices": now and then remove the most likely tokens, leaving the least likely
of them, to steer away from the obvious continuation (llama.cpp's semantics)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from decodekit.processors.base import NEG_INF, LogitsProcessor
from decodekit.random import hash32
from decodekit.validation import validate

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


class XTC(LogitsProcessor):
    """With probability ``xtc_probability`` per step and row, remove every token whose probability
    is at least ``xtc_threshold`` except the least likely of them.

    Let ``A = {i : p_i >= threshold}`` (``p = softmax(x)``). If ``|A| >= 2`` and the step's draw
    ``u <= probability``, every ``i`` in ``A`` with ``x_i > min_{j in A} x_j`` is set to ``-inf``.
    With fewer than two tokens above the threshold nothing happens, so the result always keeps a
    token that was "good enough". A threshold above 0.5 therefore never acts. Typical: probability
    0.5, threshold 0.1. XTC was proposed by p-e-w (text-generation-webui #6335); semantics of
    llama.cpp's ``llama_sampler_xtc``, except that tokens tied with the least likely one in ``A``
    are all kept (llama.cpp keeps one of them, chosen by its sort).

    The draw: processors get no random generator, so ``u`` is a hash of ``xtc_seed`` and of the
    row's tokens from the last prompt token on (the prompt length comes from ``begin``; without a
    ``begin`` call, all of ``input_ids``). It is reproducible, the same for a row whatever else is
    in the batch (left padding is never hashed), and changes every step. Rows whose generated
    tokens agree draw alike; change ``xtc_seed`` to change the draws.
    """

    name = "xtc"
    order = 950  # after the other truncation filters

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        xtc_probability: float = Field(default=0.0, ge=0.0, le=1.0, description="chance per step to act; 0 = off")
        xtc_threshold: float = Field(default=0.1, ge=0.0, le=1.0, description="probability that makes a top choice")
        xtc_seed: int = Field(default=0, ge=0, le=_MASK32, description="seed of the per-step draws")

    def __init__(self, xtc_probability: float, xtc_threshold: float = 0.1, xtc_seed: int = 0) -> None:
        p = validate(self.Params, xtc_probability=xtc_probability, xtc_threshold=xtc_threshold, xtc_seed=xtc_seed)
        self.xtc_probability = float(p.xtc_probability)
        self.xtc_threshold = float(p.xtc_threshold)
        self.xtc_seed = p.xtc_seed
        self._prompt_length: int | None = None

    def begin(self, input_ids: torch.Tensor) -> None:
        self._prompt_length = input_ids.shape[-1]

    def draws(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B]`` float32 in (0, 1): this step's draw per row (see the class docstring)."""
        start = max((self._prompt_length or 0) - 1, 0)
        tokens = input_ids[:, min(start, max(input_ids.shape[-1] - 1, 0)) :].to(torch.int64)  # [B, n]
        n = tokens.shape[-1]
        where = torch.arange(n, dtype=torch.int64, device=tokens.device) * _GOLDEN
        mixed = hash32((hash32(tokens & _MASK32) + where) & _MASK32)  # [B, n]
        row = mixed.sum(dim=-1) & _MASK32  # [B], order-sensitive through the positions
        key = torch.tensor([self.xtc_seed, n], dtype=torch.int64, device=tokens.device)
        salt = hash32(hash32(key[:1]) ^ key[1:])  # [1]
        bits = hash32(row ^ salt)
        return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.xtc_probability == 0.0:
            return logits
        x = logits.float()
        probs = x.softmax(dim=-1)
        top = (probs >= self.xtc_threshold) & (x > NEG_INF)  # [B, V], the top choices
        least = torch.where(top, x, float("inf")).amin(dim=-1, keepdim=True)  # [B, 1]
        act = (top.sum(dim=-1) >= 2) & (self.draws(input_ids).to(logits.device) <= self.xtc_probability)  # [B]
        remove = top & (x > least) & act[:, None]
        return logits.masked_fill(remove, NEG_INF)
