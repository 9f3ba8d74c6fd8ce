"""Temperature: sharpen or flatten the distribution."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from decodekit.validation import validate

_F32_MAX = float(torch.finfo(torch.float32).max)
from decodekit.processors.base import NEG_INF, LogitsProcessor, to_dtype


class Temperature(LogitsProcessor):
    """Divide the logits by a temperature ``t``: ``x'_i = (x_i - max_j x_j) / t``.

    ``t < 1`` sharpens, ``t > 1`` flattens, ``t = 1`` changes nothing; typical range 0.2 to 1.5.
    ``t = 0`` means greedy: only the (first) most likely token is kept, so any sampler then picks
    the argmax. Subtracting the row maximum first leaves the distribution exactly as
    transformers' ``TemperatureLogitsWarper`` (``x / t``) gives it but cannot overflow; the raw
    values differ by that per-row constant. transformers refuses ``t = 0``; we define it.
    """

    name = "temperature"
    order = 200

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False, description="softmax temperature; 0 = greedy")

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = float(validate(self.Params, temperature=temperature).temperature)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature == 1.0:
            return logits
        if self.temperature == 0.0:
            best = logits.argmax(dim=-1, keepdim=True)
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, best, True)
            return torch.where(~keep, NEG_INF, logits)
        x = logits.float()
        scale = min(1.0 / self.temperature, _F32_MAX)  # a tiny t must not turn 0 / t into NaN
        shifted = (x - x.amax(dim=-1, keepdim=True)).mul_(scale)  # <= 0 everywhere: cannot overflow
        return shifted if logits.dtype == torch.float32 else to_dtype(shifted, logits)
