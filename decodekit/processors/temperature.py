"""Temperature: sharpen or flatten the distribution, by a fixed or an entropy-driven amount."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from decodekit.processors.base import NEG_INF, LogitsProcessor, to_dtype
from decodekit.processors.rows import column

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

    Dynamic temperature (``dynatemp_range = d > 0``, exponent ``e``): llama.cpp's entropy rule
    (``llama_sampler_temp_ext``). Over the ``n`` tokens left in the row (those not ``-inf``), with
    ``p = softmax(x)``, ``H = -sum p_i log p_i`` and ``H_max = log n``, the row's temperature is
    ``T = max(0, t - d) + (t + d - max(0, t - d)) * (H / H_max) ** e``: a confident step (low
    entropy) runs near ``t - d``, an uncertain one near ``t + d``. ``T = 0`` keeps the argmax; a
    row with one token left is returned as it is (llama.cpp does not scale it either). Typical:
    ``t = 0.8, d = 0.5, e = 1``; ``d = 0`` is plain temperature (off), ``e = 1`` is linear, ``e > 1``
    keeps the temperature low until the entropy is high. llama.cpp counts the candidates left by
    the samplers before it; decodekit removes tokens by ``-inf``, so the count is the same. The
    entropy is computed in float32, the temperature in float64. transformers has none. Every
    setting takes one value per row.
    """

    name = "temperature"
    negative_padding = True  # never reads input_ids: other rows' padding cannot matter
    order = 200
    row_fields = ("temperature", "dynatemp_range", "dynatemp_exponent")
    row_params = {"temperature": 1.0, "dynatemp_range": 0.0, "dynatemp_exponent": 1.0}

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False, description="softmax temperature; 0 = greedy, 1 = off")
        dynatemp_range: float = Field(
            0.0, ge=0.0, allow_inf_nan=False, description="dynamic temperature: t -/+ this, by entropy; 0 = off"
        )
        dynatemp_exponent: float = Field(
            1.0, ge=0.0, allow_inf_nan=False, description="dynamic temperature: exponent on the normalised entropy"
        )

    def __init__(self, temperature: Any = 1.0, dynatemp_range: Any = 0.0, dynatemp_exponent: Any = 1.0) -> None:
        self.init_setting("temperature", temperature)
        self.init_setting("dynatemp_range", dynatemp_range)
        self.init_setting("dynatemp_exponent", dynatemp_exponent)
        self.active = self.any_row_on()

    def any_row_on(self) -> bool:
        t, d = self.temperature, self.dynatemp_range
        self._greedy_rows = bool((t == 0.0).any()) if isinstance(t, torch.Tensor) else t == 0.0  # host flags
        self._dynamic_rows = bool((d > 0.0).any()) if isinstance(d, torch.Tensor) else d > 0.0
        return self._dynamic_rows or (bool((t != 1.0).any()) if isinstance(t, torch.Tensor) else t != 1.0)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        self.check_batch(logits)
        d = self.dynatemp_range
        if not isinstance(d, torch.Tensor) and d > 0.0:
            return self._dynamic(logits)
        plain = self._fixed(logits)
        if not getattr(self, "_dynamic_rows", False):
            return plain
        return torch.where(column(d, logits, torch.float64) > 0.0, self._dynamic(logits), plain)

    def _fixed(self, logits: torch.Tensor) -> torch.Tensor:
        """``x / t``, with ``t = 0`` greedy and ``t = 1`` the logits themselves."""
        t = self.temperature
        if not isinstance(t, torch.Tensor):
            if t == 1.0:
                return logits
            if t == 0.0:
                return _greedy(logits)
            return _scale(logits, t, min(1.0 / t, _F32_MAX))
        t64 = column(t, logits, torch.float64)  # [B, 1]
        safe = torch.where(t64 == 0.0, 1.0, t64)
        # x / 1 is x exactly, so rows that are off come back bit for bit without a select
        scaled = _scale(logits, safe.float(), (1.0 / safe).clamp(max=_F32_MAX).float())
        if not getattr(self, "_greedy_rows", True):
            return scaled
        return torch.where(t64 == 0.0, _greedy(logits), scaled)

    def _dynamic(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row divided by its entropy-driven temperature (class docstring)."""
        x = logits.float()
        left = (x > NEG_INF).sum(dim=-1, keepdim=True)  # [B, 1] tokens not removed
        logp = x.log_softmax(dim=-1)
        entropy = -torch.where(logp > NEG_INF, logp.exp() * logp, 0.0).sum(dim=-1, keepdim=True)  # [B, 1]
        most = left.clamp(min=2).float().log()  # log n; rows with one token are returned as they are, below
        normalised = (entropy / most).clamp(0.0, 1.0).double()
        t, d, e = (self._column(name, logits) for name in ("temperature", "dynatemp_range", "dynatemp_exponent"))
        low = (t - d).clamp(min=0.0)
        dyn = (low + (t + d - low) * normalised.pow(e)).clamp(max=_F32_MAX)  # [B, 1] float64
        greedy = dyn.float() == 0.0
        safe = torch.where(greedy, 1.0, dyn)
        out = _scale(logits, safe.float(), (1.0 / safe).clamp(max=_F32_MAX).float())
        out = torch.where(greedy, _greedy(logits), out)
        return torch.where(left <= 1, logits, out)

    def _column(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A setting as a ``[B, 1]`` float64 column (a scalar repeated)."""
        v = getattr(self, name)
        if isinstance(v, torch.Tensor):
            return column(v, like, torch.float64)
        return torch.full((like.shape[0], 1), v, dtype=torch.float64, device=like.device)

    def __repr__(self) -> str:
        if not self._dynamic_rows:
            return f"Temperature(temperature={self.temperature!r})"
        return super().__repr__()


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
