"""Temperature: sharpen or flatten the distribution."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from decodekit.processors.base import NEG_INF, LogitsProcessor, to_dtype
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
    ``(x - max x) / t`` instead: the same distribution, without overflow.
    """

    name = "temperature"
    order = 200

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False, description="softmax temperature; 0 = greedy, 1 = off")

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
        scaled = (x / self.temperature).to(logits.dtype)
        fits = (torch.isfinite(scaled) | (x == NEG_INF)).all(dim=-1, keepdim=True)  # [B, 1]
        if logits.device.type == "cpu" and bool(fits.all()):  # the usual case; a sync is free on CPU
            return scaled
        scale = min(1.0 / self.temperature, _F32_MAX)  # a tiny t must not turn 0 / t into NaN
        shifted = to_dtype((x - x.amax(dim=-1, keepdim=True)).mul_(scale), logits)  # <= 0: cannot overflow
        return torch.where(fits, scaled, shifted)
