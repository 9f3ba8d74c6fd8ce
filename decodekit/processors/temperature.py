"""Temperature: sharpen or flatten the distribution."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from decodekit.processors.base import NEG_INF, LogitsProcessor, to_dtype
from decodekit.processors.rows import column, float_rows, is_row_list, row_values
from decodekit.validation import validate

_F32_MAX = float(torch.finfo(torch.float32).max)


class Temperature(LogitsProcessor):
    """Divide the logits by a temperature ``t``: ``x'_i = x_i / t``.

    ``t < 1`` sharpens, ``t > 1`` flattens, ``t = 1`` changes nothing (off); typical range 0.2
    to 1.5. ``t = 0`` means greedy: only the (first) most likely token is kept, so any sampler then
    picks the argmax; transformers refuses ``t = 0``, llama.cpp defines it the same way.

    The values are transformers' ``TemperatureLogitsWarper`` ones (``x / t``, computed in float32),
    not only its distribution, so a processor after it that looks at the sign of a logit
    (``RepetitionPenalty``) acts as in transformers' same list. Only a row whose scaled values would
    leave the dtype's range (where transformers gives ``inf`` or NaN) is computed as
    ``(x - max x) / t`` instead: the same distribution, without overflow. Takes one ``t`` per row.
    """

    name = "temperature"
    negative_padding = True  # never reads input_ids: other rows' padding cannot matter
    order = 200
    row_fields = ("temperature",)
    row_params = {"temperature": 1.0}

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False, description="softmax temperature; 0 = greedy, 1 = off")

    def __init__(self, temperature: Any = 1.0) -> None:
        def check(t: Any) -> float:
            return float(validate(self.Params, temperature=t).temperature)

        if is_row_list(temperature):
            values = row_values(temperature, check)
            self.temperature: float | torch.Tensor = float_rows(values)
            self.rows = len(values)
        else:
            self.temperature = check(temperature)
        self.active = self.any_row_on()

    def any_row_on(self) -> bool:
        t = self.temperature
        if not isinstance(t, torch.Tensor):
            return t != 1.0
        self._greedy_rows = bool((t == 0.0).any())  # host flags, read when the values are set
        return bool((t != 1.0).any())

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        if not isinstance(t, torch.Tensor):
            if t == 1.0:
                return logits
            if t == 0.0:
                return _greedy(logits)
            return _scale(logits, t, min(1.0 / t, _F32_MAX))
        self.check_batch(logits)
        t64 = column(t, logits, torch.float64)  # [B, 1]
        safe = torch.where(t64 == 0.0, 1.0, t64)
        # x / 1 is x exactly, so rows that are off come back bit for bit without a select
        scaled = _scale(logits, safe.float(), (1.0 / safe).clamp(max=_F32_MAX).float())
        if not getattr(self, "_greedy_rows", True):
            return scaled
        return torch.where(t64 == 0.0, _greedy(logits), scaled)


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    """Only each row's first maximum (the token ``argmax`` picks) kept."""
    best = logits.argmax(dim=-1, keepdim=True)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, best, True)
    return torch.where(keep, logits, NEG_INF)


def _scale(logits: torch.Tensor, t: float | torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``x / t``; rows whose values would overflow get ``(x - max x) * scale`` instead."""
    x = logits.float()
    scaled = (x / t).to(logits.dtype)
    fits = (torch.isfinite(scaled) | (x == NEG_INF)).all(dim=-1, keepdim=True)  # [B, 1]
    if logits.device.type == "cpu" and bool(fits.all()):  # the usual case; a sync is free on CPU
        return scaled
    shifted = to_dtype((x - x.amax(dim=-1, keepdim=True)).mul_(scale), logits)  # <= 0: cannot overflow
    return torch.where(fits, scaled, shifted)
