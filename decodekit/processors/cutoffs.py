"""Probability cut-offs: remove tokens by their probability, surprise or distance from the maximum.

Min-p, locally typical, epsilon, eta and top-n-sigma. Each always keeps at least the most likely
token, and takes its setting as a scalar or one value per row (see
:mod:`decodekit.processors.base`); a row whose value is the "off" one gets its logits unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from decodekit.processors.base import NEG_INF, LogitsProcessor
from decodekit.processors.sorting import sort_with_order
from decodekit.processors.truncation import _keep_top_n, _min_keep


class _Cutoff(LogitsProcessor):
    """One float setting (``setting``), off at ``off``; ``_remove`` says what to cut."""

    setting: str = ""
    off: float = 0.0
    negative_padding = True  # never reads input_ids: other rows' padding cannot matter

    def __init__(self, value: Any, min_tokens_to_keep: int = 1) -> None:
        self.init_setting(self.setting, value)
        self.min_tokens_to_keep = _min_keep(min_tokens_to_keep)
        self.active = self.any_row_on()

    def _off(self, value: Any) -> Any:
        return value == self.off

    def any_row_on(self) -> bool:
        off = self._off(getattr(self, self.setting))
        return not bool(off.all()) if isinstance(off, torch.Tensor) else not off

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        value = getattr(self, self.setting)
        if not isinstance(value, torch.Tensor):
            return logits if self._off(value) else torch.where(self._remove(logits, value), NEG_INF, logits)
        self.check_batch(logits)
        value = self.value(self.setting, logits)  # [B, 1] float32, as a Python scalar would be cast
        off = self._off(getattr(self, self.setting)).to(logits.device)[:, None]
        return torch.where(self._remove(logits, value) & ~off, NEG_INF, logits)

    def _remove(self, logits: torch.Tensor, value: Any) -> torch.Tensor:
        raise NotImplementedError


class MinP(_Cutoff):
    """Keep tokens with ``p_i >= min_p * max_j p_j``: a cut that scales with the model's confidence.

    transformers' ``MinPLogitsWarper`` semantics; ``min_p = 0`` is off (logits unchanged), as in
    llama.cpp. Typical range 0.01 to 0.2.
    Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling for Creative and Coherent LLM Outputs".
    """

    name = "min_p"
    setting = "min_p"
    idempotent = True
    order = 500
    row_fields = ("min_p",)
    row_params = {"min_p": 0.0}

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        min_p: float = Field(ge=0.0, le=1.0, description="relative probability floor, in [0, 1]; 0 = off")

    def __init__(self, min_p: Any, min_tokens_to_keep: int = 1) -> None:
        super().__init__(min_p, min_tokens_to_keep)

    def _remove(self, logits: torch.Tensor, min_p: Any) -> torch.Tensor:
        probs = logits.float().softmax(dim=-1)
        remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
        return _keep_top_n(logits, remove, self.min_tokens_to_keep)


class TypicalP(_Cutoff):
    """Locally typical filtering: keep the tokens whose surprise is closest to the entropy.

    With ``H = -sum p log p`` and ``d_i = |-log p_i - H|``, sort by ``d`` ascending and keep the
    first tokens until their mass reaches ``typical_p`` (plus any tied in ``d`` with the last).
    transformers' ``TypicalLogitsWarper`` semantics; ``typical_p = 1`` is off (logits unchanged),
    as transformers and llama.cpp skip it. Typical range 0.2 to 0.95.
    Meister et al. 2023, "Locally Typical Sampling".
    """

    name = "typical_p"
    setting = "typical_p"
    off = 1.0
    order = 600
    row_fields = ("typical_p",)
    row_params = {"typical_p": 1.0}

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        typical_p: float = Field(gt=0.0, le=1.0, description="typical mass, in (0, 1]; 1 = off")

    def __init__(self, typical_p: Any, min_tokens_to_keep: int = 1) -> None:
        super().__init__(typical_p, min_tokens_to_keep)

    def _remove(self, logits: torch.Tensor, mass: Any) -> torch.Tensor:
        x = logits.float()
        logp = torch.log_softmax(x, dim=-1)
        entropy = -(logp * logp.exp()).nansum(dim=-1, keepdim=True)
        distance = (-logp - entropy).abs()  # +inf for removed tokens
        ascending, order = sort_with_order(distance)
        cum = x.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
        last = (cum < mass).sum(dim=-1, keepdim=True).clamp(max=x.shape[-1] - 1)
        threshold = ascending.gather(-1, last)
        floor = ascending[..., min(self.min_tokens_to_keep, x.shape[-1]) - 1 :][..., :1]
        return distance > torch.maximum(threshold, floor)


class EpsilonCutoff(_Cutoff):
    """Remove tokens with ``p_i < epsilon`` (the most likely token always stays).

    transformers' ``EpsilonLogitsWarper`` semantics; ``epsilon_cutoff = 0`` is off (logits
    unchanged), as transformers skips it. Typical range 3e-4 to 9e-4.
    Hewitt et al. 2022, "Truncation Sampling as Language Model Desmoothing".
    """

    name = "epsilon_cutoff"
    setting = "epsilon_cutoff"
    idempotent = True
    order = 700
    row_fields = ("epsilon_cutoff",)
    row_params = {"epsilon_cutoff": 0.0}

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        epsilon_cutoff: float = Field(ge=0.0, lt=1.0, description="absolute probability floor, in [0, 1); 0 = off")

    def __init__(self, epsilon_cutoff: Any, min_tokens_to_keep: int = 1) -> None:
        super().__init__(epsilon_cutoff, min_tokens_to_keep)

    def _remove(self, logits: torch.Tensor, epsilon: Any) -> torch.Tensor:
        return _keep_top_n(logits, logits.float().softmax(dim=-1) < epsilon, self.min_tokens_to_keep)


class EtaCutoff(_Cutoff):
    """Remove tokens with ``p_i < eta``, ``eta = min(epsilon, sqrt(epsilon) * exp(-H))``.

    An entropy-dependent epsilon cut: permissive when the model is unsure. transformers'
    ``EtaLogitsWarper`` semantics; ``eta_cutoff = 0`` is off (logits unchanged), as transformers
    skips it. Typical range 3e-4 to 2e-3.
    Hewitt et al. 2022, "Truncation Sampling as Language Model Desmoothing".
    """

    name = "eta_cutoff"
    setting = "eta_cutoff"
    order = 800
    row_fields = ("eta_cutoff",)
    row_params = {"eta_cutoff": 0.0}

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        eta_cutoff: float = Field(ge=0.0, lt=1.0, description="eta's epsilon, in [0, 1); 0 = off")

    def __init__(self, eta_cutoff: Any, min_tokens_to_keep: int = 1) -> None:
        super().__init__(eta_cutoff, min_tokens_to_keep)

    def _remove(self, logits: torch.Tensor, epsilon: Any) -> torch.Tensor:
        if isinstance(epsilon, torch.Tensor):  # sqrt of the exact (float64) value, as math.sqrt gives
            root = self.eta_cutoff.sqrt().to(device=logits.device, dtype=torch.float32)[:, None]
        else:
            root = math.sqrt(epsilon)
        logp = torch.log_softmax(logits.float(), dim=-1)
        probs = logp.exp()
        entropy = -(logp * probs).nansum(dim=-1, keepdim=True)
        eta = torch.minimum(root * torch.exp(-entropy), torch.as_tensor(epsilon, device=logits.device, dtype=torch.float32))
        return _keep_top_n(logits, probs < eta, self.min_tokens_to_keep)


class TopNSigma(_Cutoff):
    """Keep tokens with ``x_i >= max_j x_j - n * sigma``, sigma the std of the finite logits.

    Works on raw logits, so it is insensitive to temperature applied after it. llama.cpp's
    ``top_n_sigma`` semantics (population standard deviation over tokens not already removed);
    transformers has no counterpart. ``n <= 0`` is off (logits unchanged), as in llama.cpp, whose
    default is -1. Typical ``n`` 1.0 to 2.0.
    Tang et al. 2024, "Top-nσ: Not All Logits Are You Need".
    """

    name = "top_n_sigma"
    setting = "top_n_sigma"
    order = 900
    row_fields = ("top_n_sigma",)
    row_params = {"top_n_sigma": 0.0}

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        top_n_sigma: float = Field(
            allow_inf_nan=False, description="how many standard deviations below the max to keep; <= 0 = off"
        )

    def __init__(self, top_n_sigma: Any) -> None:
        super().__init__(top_n_sigma)

    def _off(self, value: Any) -> Any:
        return value <= 0.0

    def _remove(self, logits: torch.Tensor, n: Any) -> torch.Tensor:
        x = logits.float()
        finite = torch.isfinite(x)
        count = finite.sum(dim=-1, keepdim=True).clamp(min=1)
        zeroed = torch.where(finite, x, torch.zeros_like(x))
        row_max = torch.where(finite, x, NEG_INF).amax(dim=-1, keepdim=True)
        mean = zeroed.sum(dim=-1, keepdim=True) / count
        var = torch.where(finite, (x - mean) ** 2, torch.zeros_like(x)).sum(dim=-1, keepdim=True) / count
        threshold = row_max - n * var.sqrt()
        threshold = torch.where(torch.isnan(threshold), torch.full_like(threshold, NEG_INF), threshold)
        return x < threshold
