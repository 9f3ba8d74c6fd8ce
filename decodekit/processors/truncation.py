"""Truncation filters: keep a head of the distribution and set the rest to ``-inf``.

Every filter here keeps whole groups of tied values (a token tied with the last one kept is
kept too), so results never depend on how a sort orders equal values, and every filter is
idempotent. Each always keeps at least the most likely token.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from decodekit.validation import validate
from decodekit.processors.base import NEG_INF, LogitsProcessor


def _keep_top_n(logits: torch.Tensor, remove: torch.Tensor, n: int) -> torch.Tensor:
    """Un-remove the ``n`` largest logits of each row (and those tied with the n-th)."""
    if n <= 1:
        return remove & (logits < logits.amax(dim=-1, keepdim=True))
    nth = torch.topk(logits, min(n, logits.shape[-1]), dim=-1).values[..., -1:]
    return remove & (logits < nth)


class TopK(LogitsProcessor):
    """Keep the ``k`` most likely tokens: remove ``x_i < x_(k)``, the k-th largest logit.

    Tokens tied with the k-th are kept, as in transformers' ``TopKLogitsWarper``, whose
    semantics this has (``k`` is raised to ``min_tokens_to_keep`` and capped at the vocabulary).
    ``k = 0`` (transformers, llama.cpp) and ``k = -1`` (llama.cpp, vLLM) mean off: every token kept,
    the logits returned unchanged. Typical range 20 to 100. Fan et al. 2018, "Hierarchical Neural Story Generation".
    """

    name = "top_k"
    idempotent = True
    order = 300

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        top_k: int = Field(ge=-1, description="keep the k most likely tokens; 0 or -1 = off")

    def __init__(self, top_k: int, min_tokens_to_keep: int = 1) -> None:
        self.top_k = validate(self.Params, top_k=top_k).top_k
        self.min_tokens_to_keep = _min_keep(min_tokens_to_keep)

    def k_for(self, vocab_size: int) -> int:
        return min(max(self.top_k, self.min_tokens_to_keep), vocab_size)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.top_k <= 0:
            return logits
        k = self.k_for(logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        return torch.where(logits < kth, NEG_INF, logits)


class TopP(LogitsProcessor):
    """Nucleus filtering: keep the smallest set of most likely tokens whose mass reaches ``p``.

    Sort ascending, ``c_j`` = cumulative probability; tokens with ``c_j <= 1 - p`` are removed
    (transformers' ``TopPLogitsWarper`` rule), then every token whose logit is at least the
    smallest kept one is kept, so ties at the cut stay together (transformers leaves that to the
    sort order). ``p = 1`` is off (transformers and llama.cpp skip it): the logits come back
    unchanged, tokens of underflowing probability included. ``p = 0`` keeps only the most likely
    token (and its ties), as llama.cpp does. Typical range 0.8 to 0.95.
    Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration".
    """

    name = "top_p"
    order = 400

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        top_p: float = Field(ge=0.0, le=1.0, description="nucleus mass, in [0, 1]; 1 = off, 0 = most likely only")

    def __init__(self, top_p: float, min_tokens_to_keep: int = 1) -> None:
        self.top_p = float(validate(self.Params, top_p=top_p).top_p)
        self.min_tokens_to_keep = _min_keep(min_tokens_to_keep)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.top_p == 1.0:
            return logits
        if self.top_p == 0.0:
            return torch.where(_keep_top_n(logits, torch.ones_like(logits, dtype=torch.bool), self.min_tokens_to_keep), NEG_INF, logits)
        v = logits.shape[-1]
        ascending = torch.sort(logits, dim=-1).values  # [B, V]
        cum = ascending.float().softmax(dim=-1).cumsum(dim=-1)
        n_removed = (cum <= 1.0 - self.top_p).sum(dim=-1, keepdim=True)
        n_removed = n_removed.clamp(max=max(v - self.min_tokens_to_keep, 0))
        threshold = ascending.gather(-1, n_removed)  # smallest kept logit, [B, 1]
        return torch.where(logits < threshold, NEG_INF, logits)


class TopKTopP(LogitsProcessor):
    """``TopK`` then ``TopP``, fused: sorts only the ``k`` candidates, never the vocabulary.

    Gives the same tokens as running the two in turn; :class:`ProcessorChain` builds it for
    adjacent ``TopK | TopP``, so users never need to name it.
    """

    name = "top_k_top_p"

    def __init__(self, top_k: TopK, top_p: TopP) -> None:
        self.top_k = top_k
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        v = logits.shape[-1]
        k = self.top_k.k_for(v)
        top = torch.topk(logits, min(k + 1, v), dim=-1)  # one more, to see ties with the k-th
        descending = top.values[..., :k].float()  # [B, k]
        kth = descending[..., -1:]
        tied = top.values[..., k:] == top.values[..., k - 1 : k] if k < v else None  # [B, 0 or 1]
        if tied is None or (logits.device.type == "cpu" and not bool(tied.any())):
            # no token beyond the k-th ties with it: work on the k candidates alone
            threshold = self._threshold(descending, kth, torch.zeros_like(kth), k)
            kept = torch.where(descending >= threshold, descending, NEG_INF).to(logits.dtype)
            return torch.full_like(logits, NEG_INF).scatter_(-1, top.indices[..., :k], kept)
        # tokens tied with the k-th beyond the k returned (top-k keeps them): counted, not sorted
        n_extra = (logits >= kth.to(logits.dtype)).sum(dim=-1, keepdim=True) - k
        threshold = self._threshold(descending, kth, n_extra, k).to(logits.dtype)  # >= kth
        return torch.where(logits < threshold, NEG_INF, logits)

    def _threshold(self, descending: torch.Tensor, kth: torch.Tensor, n_extra: torch.Tensor, k: int) -> torch.Tensor:
        """The smallest logit top-p keeps among the top-k set (``[B, 1]``, float32)."""
        lse_k = torch.logsumexp(descending, dim=-1, keepdim=True)
        lse = lse_k + torch.log1p(n_extra * (kth - lse_k).exp())  # log of the kept mass
        ascending = descending.flip(-1)
        cum = n_extra * (kth - lse).exp() + (ascending - lse).exp().cumsum(dim=-1)
        n_removed = (cum <= 1.0 - self.top_p.top_p).sum(dim=-1, keepdim=True)
        n_removed = n_removed.clamp(max=max(k - self.top_p.min_tokens_to_keep, 0))
        return ascending.gather(-1, n_removed)


class MinP(LogitsProcessor):
    """Keep tokens with ``p_i >= min_p * max_j p_j``: a cut that scales with the model's confidence.

    transformers' ``MinPLogitsWarper`` semantics; ``min_p = 0`` is off (logits unchanged), as in
    llama.cpp. Typical range 0.01 to 0.2.
    Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling for Creative and Coherent LLM Outputs".
    """

    name = "min_p"
    idempotent = True
    order = 500

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        min_p: float = Field(ge=0.0, le=1.0, description="relative probability floor, in [0, 1]; 0 = off")

    def __init__(self, min_p: float, min_tokens_to_keep: int = 1) -> None:
        self.min_p = float(validate(self.Params, min_p=min_p).min_p)
        self.min_tokens_to_keep = _min_keep(min_tokens_to_keep)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.min_p == 0.0:
            return logits
        probs = logits.float().softmax(dim=-1)
        remove = probs < self.min_p * probs.amax(dim=-1, keepdim=True)
        remove = _keep_top_n(logits, remove, self.min_tokens_to_keep)
        return torch.where(remove, NEG_INF, logits)


class TypicalP(LogitsProcessor):
    """Locally typical filtering: keep the tokens whose surprise is closest to the entropy.

    With ``H = -sum p log p`` and ``d_i = |-log p_i - H|``, sort by ``d`` ascending and keep the
    first tokens until their mass reaches ``typical_p`` (plus any tied in ``d`` with the last).
    transformers' ``TypicalLogitsWarper`` semantics; ``typical_p = 1`` is off (logits unchanged),
    as transformers and llama.cpp skip it. Typical range 0.2 to 0.95.
    Meister et al. 2023, "Locally Typical Sampling".
    """

    name = "typical_p"
    order = 600

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        typical_p: float = Field(gt=0.0, le=1.0, description="typical mass, in (0, 1]; 1 = off")

    def __init__(self, typical_p: float, min_tokens_to_keep: int = 1) -> None:
        self.typical_p = float(validate(self.Params, typical_p=typical_p).typical_p)
        self.min_tokens_to_keep = _min_keep(min_tokens_to_keep)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.typical_p == 1.0:
            return logits
        x = logits.float()
        logp = torch.log_softmax(x, dim=-1)
        entropy = -(logp * logp.exp()).nansum(dim=-1, keepdim=True)
        distance = (-logp - entropy).abs()  # +inf for removed tokens
        ascending, order = torch.sort(distance, dim=-1)
        cum = x.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
        last = (cum < self.typical_p).sum(dim=-1, keepdim=True).clamp(max=x.shape[-1] - 1)
        threshold = ascending.gather(-1, last)
        floor = ascending[..., min(self.min_tokens_to_keep, x.shape[-1]) - 1 :][..., :1]
        remove = distance > torch.maximum(threshold, floor)
        return torch.where(remove, NEG_INF, logits)


class EpsilonCutoff(LogitsProcessor):
    """Remove tokens with ``p_i < epsilon`` (the most likely token always stays).

    transformers' ``EpsilonLogitsWarper`` semantics; ``epsilon_cutoff = 0`` is off (logits
    unchanged), as transformers skips it. Typical range 3e-4 to 9e-4.
    Hewitt et al. 2022, "Truncation Sampling as Language Model Desmoothing".
    """

    name = "epsilon_cutoff"
    idempotent = True
    order = 700

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        epsilon_cutoff: float = Field(ge=0.0, lt=1.0, description="absolute probability floor, in [0, 1); 0 = off")

    def __init__(self, epsilon_cutoff: float, min_tokens_to_keep: int = 1) -> None:
        self.epsilon_cutoff = float(validate(self.Params, epsilon_cutoff=epsilon_cutoff).epsilon_cutoff)
        self.min_tokens_to_keep = _min_keep(min_tokens_to_keep)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.epsilon_cutoff == 0.0:
            return logits
        remove = logits.float().softmax(dim=-1) < self.epsilon_cutoff
        remove = _keep_top_n(logits, remove, self.min_tokens_to_keep)
        return torch.where(remove, NEG_INF, logits)


class EtaCutoff(LogitsProcessor):
    """Remove tokens with ``p_i < eta``, ``eta = min(epsilon, sqrt(epsilon) * exp(-H))``.

    An entropy-dependent epsilon cut: permissive when the model is unsure. transformers'
    ``EtaLogitsWarper`` semantics; ``eta_cutoff = 0`` is off (logits unchanged), as transformers
    skips it. Typical range 3e-4 to 2e-3.
    Hewitt et al. 2022, "Truncation Sampling as Language Model Desmoothing".
    """

    name = "eta_cutoff"
    order = 800

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        eta_cutoff: float = Field(ge=0.0, lt=1.0, description="eta's epsilon, in [0, 1); 0 = off")

    def __init__(self, eta_cutoff: float, min_tokens_to_keep: int = 1) -> None:
        self.eta_cutoff = float(validate(self.Params, eta_cutoff=eta_cutoff).eta_cutoff)
        self.min_tokens_to_keep = _min_keep(min_tokens_to_keep)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.eta_cutoff == 0.0:
            return logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        probs = logp.exp()
        entropy = -(logp * probs).nansum(dim=-1, keepdim=True)
        eta = torch.clamp(math.sqrt(self.eta_cutoff) * torch.exp(-entropy), max=self.eta_cutoff)
        remove = _keep_top_n(logits, probs < eta, self.min_tokens_to_keep)
        return torch.where(remove, NEG_INF, logits)


class TopNSigma(LogitsProcessor):
    """Keep tokens with ``x_i >= max_j x_j - n * sigma``, sigma the std of the finite logits.

    Works on raw logits, so it is insensitive to temperature applied after it. llama.cpp's
    ``top_n_sigma`` semantics (population standard deviation over tokens not already removed);
    transformers has no counterpart. ``n <= 0`` is off (logits unchanged), as in llama.cpp, whose
    default is -1. Typical ``n`` 1.0 to 2.0.
    Tang et al. 2024, "Top-nσ: Not All Logits Are You Need".
    """

    name = "top_n_sigma"
    order = 900

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        top_n_sigma: float = Field(
            allow_inf_nan=False, description="how many standard deviations below the max to keep; <= 0 = off"
        )

    def __init__(self, top_n_sigma: float) -> None:
        self.top_n_sigma = float(validate(self.Params, top_n_sigma=top_n_sigma).top_n_sigma)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.top_n_sigma <= 0.0:
            return logits
        x = logits.float()
        finite = torch.isfinite(x)
        count = finite.sum(dim=-1, keepdim=True).clamp(min=1)
        zeroed = torch.where(finite, x, torch.zeros_like(x))
        row_max = torch.where(finite, x, NEG_INF).amax(dim=-1, keepdim=True)
        mean = zeroed.sum(dim=-1, keepdim=True) / count
        var = torch.where(finite, (x - mean) ** 2, torch.zeros_like(x)).sum(dim=-1, keepdim=True) / count
        threshold = row_max - self.top_n_sigma * var.sqrt()
        threshold = torch.where(torch.isnan(threshold), torch.full_like(threshold, NEG_INF), threshold)
        return torch.where(x < threshold, NEG_INF, logits)


def _min_keep(n: int) -> int:
    from decodekit.errors import ConfigError

    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"min_tokens_to_keep: {n!r} is not allowed; it must be an integer >= 1")
    return n
