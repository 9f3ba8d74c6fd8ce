"""Mirostat v2: a sampler that keeps the surprise of each chosen token near a target."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from decodekit.random import RowRandom
from decodekit.samplers.base import Sampler
from decodekit.validation import validate

_LN2 = math.log(2.0)


class Mirostat(Sampler):
    """Mirostat v2: truncate by surprise, sample, and steer the truncation toward ``tau``.

    Each row keeps a threshold ``mu`` (``2 * tau`` at the start of a sequence, reset by
    ``begin``). Per step, with ``s_i = -log2 p_i`` the surprise of token ``i``:

    1. keep the tokens with ``s_i <= mu`` (at least the most likely one), renormalise;
    2. draw a token ``k`` from what is left (the loop's per-row random streams);
    3. ``mu <- mu - eta * (s'_k - tau)``, where ``s'_k`` is the surprise of ``k`` under the
       renormalised distribution.

    ``tau`` is the target surprise in bits (typical 3 to 6; lower is more focused), ``eta`` the
    learning rate (typical 0.1). Basu et al. 2021, "Mirostat: A Neural Text Decoding Algorithm
    that Directly Controls Perplexity"; semantics of llama.cpp's ``llama_sampler_mirostat_v2``,
    except that where no token has ``s_i <= mu``, every token tied for most likely is kept
    (llama.cpp keeps one of them, chosen by its sort). All rows run at once: ``mu`` is a ``[B]``
    tensor and nothing syncs with the host.
    """

    name = "mirostat"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        tau: float = Field(default=5.0, gt=0.0, allow_inf_nan=False, description="target surprise in bits, > 0")
        eta: float = Field(default=0.1, ge=0.0, le=1.0, description="learning rate of mu, in [0, 1]")

    def __init__(self, tau: float = 5.0, eta: float = 0.1) -> None:
        p = validate(self.Params, tau=tau, eta=eta)
        self.tau = float(p.tau)
        self.eta = float(p.eta)
        self._mu: torch.Tensor | None = None

    @property
    def mu(self) -> torch.Tensor | None:
        """``[B]`` the current thresholds (``None`` before the first sequence)."""
        return self._mu

    def begin(self, input_ids: torch.Tensor) -> None:
        """Start new sequences: ``mu = 2 * tau`` for every row of ``input_ids``."""
        self._mu = torch.full((input_ids.shape[0],), 2.0 * self.tau, dtype=torch.float32, device=input_ids.device)

    def reorder(self, index: torch.Tensor) -> None:
        if self._mu is not None:
            self._mu = self._mu[index.to(self._mu.device)]

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor, rng: RowRandom) -> torch.Tensor:
        x = logits.float()
        batch, vocab = x.shape
        if self._mu is None or self._mu.shape[0] != batch or self._mu.device != x.device:
            self.begin(x)  # called without begin (outside the loop): a fresh sequence per row
        mu = self._mu  # [B]
        logp = x.log_softmax(dim=-1)  # [B, V]
        surprise = -logp / _LN2
        keep = ((surprise <= mu[:, None]) | (x == x.amax(dim=-1, keepdim=True))) & (x > float("-inf"))
        kept = logp.masked_fill(~keep, float("-inf")).log_softmax(dim=-1)  # renormalised
        token = (kept - rng.exponential(vocab).log()).argmax(dim=-1)  # exponential race: a draw from kept
        observed = -kept.gather(-1, token[:, None]).squeeze(-1) / _LN2  # [B]
        self._mu = mu - self.eta * (observed - self.tau)
        return token
