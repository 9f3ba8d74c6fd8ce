"""Mirostat v2: a sampler that keeps the surprise of each chosen token near a target."""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from decodekit.errors import ConfigError
from decodekit.processors.rows import float_rows, is_row_list, row_values
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

    Per row: ``tau`` and ``eta`` take one value per row (``Mirostat(tau=[3.0, 5.0])``), held
    as ``[B]`` tensors; ``reorder`` and ``assign`` move them with ``mu``, so each row draws
    exactly the tokens it would draw alone.
    """

    name = "mirostat"
    row_fields = ("tau", "eta", "_mu")
    row_params = {"tau": 5.0, "eta": 0.1}  # rows that set neither get the defaults
    rows: int | None = None  # the batch size when built with per-row values

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        tau: float = Field(default=5.0, gt=0.0, allow_inf_nan=False, description="target surprise in bits, > 0")
        eta: float = Field(default=0.1, ge=0.0, le=1.0, description="learning rate of mu, in [0, 1]")

    def __init__(self, tau: Any = 5.0, eta: Any = 0.1) -> None:
        self.tau = self._setting("tau", tau)
        self.eta = self._setting("eta", eta)
        if self.rows is not None:  # a scalar next to per-row values: one value per row
            self.tau, self.eta = (v if isinstance(v, torch.Tensor) else float_rows([v] * self.rows) for v in (self.tau, self.eta))
        self._mu: torch.Tensor | None = None

    def _setting(self, name: str, value: Any) -> Any:
        """A scalar or per-row value, each checked by ``Params`` (a bad row is named)."""

        def check(v: Any) -> float:
            return float(getattr(validate(self.Params, **{name: v}), name))

        if not is_row_list(value):
            return check(value)
        values = row_values(value, check)
        if self.rows is not None and len(values) != self.rows:
            raise ConfigError(f"mirostat: {name} has {len(values)} per-row values, another setting {self.rows}")
        self.rows = len(values)
        return float_rows(values)

    @classmethod
    def supports_rows(cls) -> bool:
        return True

    @classmethod
    def from_row_params(cls, values: dict[str, list[Any]], shared: dict[str, Any], context: Any) -> Mirostat:
        return cls(**values, **shared)

    def _value(self, name: str, like: torch.Tensor) -> Any:
        """A setting as a Python float, or per row as a ``[B]`` float32 tensor on ``like``'s device."""
        v = getattr(self, name)
        return v.to(device=like.device, dtype=torch.float32) if isinstance(v, torch.Tensor) else v

    @property
    def mu(self) -> torch.Tensor | None:
        """``[B]`` the current thresholds (``None`` before the first sequence)."""
        return self._mu

    def begin(self, input_ids: torch.Tensor) -> None:
        """Start new sequences: ``mu = 2 * tau`` for every row of ``input_ids``."""
        tau = self.tau
        if isinstance(tau, torch.Tensor):
            self._mu = (2.0 * tau).to(device=input_ids.device, dtype=torch.float32)
        else:
            self._mu = torch.full((input_ids.shape[0],), 2.0 * tau, dtype=torch.float32, device=input_ids.device)

    def reorder(self, index: torch.Tensor) -> None:
        for field in self.row_fields:
            value = getattr(self, field)
            if isinstance(value, torch.Tensor):
                setattr(self, field, value[index.to(value.device)])
        if self.rows is not None:
            self.rows = int(index.shape[0])

    def assign(self, rows: torch.Tensor, other: Mirostat) -> None:
        """Copy ``other``'s ``tau``, ``eta`` and ``mu`` (built and begun for ``len(rows)`` rows) into rows ``rows``."""
        if not isinstance(other, Mirostat):
            raise ConfigError(f"mirostat: assign needs a Mirostat, got {type(other).__name__}")
        for field in self.row_fields:
            mine, theirs = getattr(self, field), getattr(other, field)
            if not isinstance(mine, torch.Tensor):
                continue  # a scalar shared by every row, or no sequence begun yet
            if theirs is None:
                raise ConfigError("mirostat: assign: the new rows have no mu (call begin first)")
            updated = mine.clone()
            updated[rows.to(mine.device)] = torch.as_tensor(theirs).to(device=mine.device, dtype=mine.dtype)
            setattr(self, field, updated)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor, rng: RowRandom) -> torch.Tensor:
        x = logits.float()
        batch, vocab = x.shape
        if self.rows is not None and batch != self.rows:
            raise ConfigError(f"mirostat: built with per-row values for {self.rows} rows, called with a batch of {batch}")
        if self._mu is None or self._mu.shape[0] != batch or self._mu.device != x.device:
            self.begin(x)  # called without begin (outside the loop): a fresh sequence per row
        mu = self._mu  # [B]
        logp = x.log_softmax(dim=-1)  # [B, V]
        surprise = -logp / _LN2
        keep = ((surprise <= mu[:, None]) | (x == x.amax(dim=-1, keepdim=True))) & (x > float("-inf"))
        kept = logp.masked_fill(~keep, float("-inf")).log_softmax(dim=-1)  # renormalised
        token = (kept - rng.exponential(vocab).log()).argmax(dim=-1)  # exponential race: a draw from kept
        observed = -kept.gather(-1, token[:, None]).squeeze(-1) / _LN2  # [B]
        self._mu = mu - self._value("eta", x) * (observed - self._value("tau", x))
        return token
