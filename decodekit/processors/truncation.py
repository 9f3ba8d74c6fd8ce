"""Truncation filters: keep a head of the distribution and set the rest to ``-inf``.

Every filter here keeps whole groups of tied values (a token tied with the last one kept is
kept too), so results never depend on how a sort orders equal values, and every filter is
idempotent. Each always keeps at least the most likely token. This module holds the rank and
mass filters (top-k, top-p, fused); :mod:`decodekit.processors.cutoffs` the probability cut-offs.
Each takes its setting as a scalar or one value per row (see :mod:`decodekit.processors.base`).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from decodekit.processors.base import NEG_INF, LogitsProcessor
from decodekit.processors.rows import column
from decodekit.processors.sorting import Workspace, nucleus_by_bins, sort_values


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
    negative_padding = True  # never reads input_ids: other rows' padding cannot matter
    idempotent = True
    order = 300
    row_fields = ("top_k",)
    row_params = {"top_k": 0}

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        top_k: int = Field(ge=-1, description="keep the k most likely tokens; 0 or -1 = off")

    def __init__(self, top_k: Any, min_tokens_to_keep: int = 1) -> None:
        self.init_setting("top_k", top_k, int)
        self.min_tokens_to_keep = _min_keep(min_tokens_to_keep)
        self.active = self.any_row_on()
        self._k_max = self._largest_k()

    def any_row_on(self) -> bool:
        k = self.top_k
        return bool((k > 0).any()) if isinstance(k, torch.Tensor) else k > 0

    def assign(self, rows: torch.Tensor, other: LogitsProcessor) -> None:
        super().assign(rows, other)
        self._k_max = self._largest_k()

    def _largest_k(self) -> int:
        """The largest k of any row (host value: one ``topk`` call serves every row)."""
        k = self.top_k
        return max(int(k.max()) if isinstance(k, torch.Tensor) else k, self.min_tokens_to_keep)

    def k_for(self, vocab_size: int) -> int:
        return min(max(self.top_k, self.min_tokens_to_keep), vocab_size)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.top_k, torch.Tensor):
            if self.top_k <= 0:
                return logits
            k = self.k_for(logits.shape[-1])
            kth = torch.topk(logits, k, dim=-1).values[..., -1:]
            return torch.where(logits < kth, NEG_INF, logits)
        self.check_batch(logits)
        v = logits.shape[-1]
        k = column(self.top_k, logits)  # [B, 1]
        top = torch.topk(logits, min(self._k_max, v), dim=-1).values  # [B, k_max]
        k_row = k.clamp(min=self.min_tokens_to_keep).clamp(max=top.shape[-1])
        kth = top.gather(-1, k_row - 1)  # each row's k-th largest
        return torch.where((logits < kth) & (k > 0), NEG_INF, logits)


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
    negative_padding = True  # never reads input_ids: other rows' padding cannot matter
    order = 400
    row_fields = ("top_p",)
    row_params = {"top_p": 1.0}

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        top_p: float = Field(ge=0.0, le=1.0, description="nucleus mass, in [0, 1]; 1 = off, 0 = most likely only")

    def __init__(self, top_p: Any, min_tokens_to_keep: int = 1) -> None:
        self.init_setting("top_p", top_p)
        self.min_tokens_to_keep = _min_keep(min_tokens_to_keep)
        self.active = self.any_row_on()
        self._workspace = Workspace()  # the sort's buffers, kept from step to step

    def any_row_on(self) -> bool:
        p = self.top_p
        return bool((p < 1.0).any()) if isinstance(p, torch.Tensor) else p < 1.0

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        p = self.top_p
        if not isinstance(p, torch.Tensor):
            if p == 1.0:
                return logits
            if p == 0.0:
                return self._most_likely(logits)
            return self._nucleus(logits, 1.0 - p)
        self.check_batch(logits)
        p = column(p, logits, torch.float64)  # [B, 1]
        out = torch.where(p == 0.0, self._most_likely(logits), self._nucleus(logits, (1.0 - p).float()))
        return torch.where(p == 1.0, logits, out)

    def _most_likely(self, logits: torch.Tensor) -> torch.Tensor:
        remove = _keep_top_n(logits, torch.ones_like(logits, dtype=torch.bool), self.min_tokens_to_keep)
        return torch.where(remove, NEG_INF, logits)

    def _nucleus(self, logits: torch.Tensor, tail: float | torch.Tensor) -> torch.Tensor:
        """Remove tokens whose ascending cumulative mass is ``<= tail`` (``1 - p``)."""
        floor, _ = nucleus_bounds(logits, tail, self.min_tokens_to_keep, self._workspace)
        return torch.where(logits < floor.to(logits.dtype), NEG_INF, logits)


BLOCK = 256  # tokens per block of :func:`nucleus_bounds`' cumulative sums


def nucleus_bounds(
    logits: torch.Tensor, tail: float | torch.Tensor, min_keep: int = 1, workspace: Workspace | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(floor, lse)``, both ``[B, 1]``: each row's top-p nucleus, found without writing it out.

    The nucleus is :class:`TopP`'s: sorted ascending, the tokens whose cumulative mass is at most
    ``tail`` (``1 - p``; a float or ``[B, 1]``) are removed, at most ``V - min_keep`` of them, and
    every token tied with the smallest kept stays. ``floor`` is the smallest kept logit (a row
    keeps exactly ``logits >= floor``; where ``tail`` is 0, ``p = 1``, the smallest logit: all kept);
    ``lse`` is the log of the kept mass, ``log sum exp`` over the kept logits: the normaliser of
    the processed log-softmax.

    On CPU, :func:`~decodekit.processors.sorting.nucleus_by_bins` finds it sorting only the logits
    near each row's cut. Elsewhere (or where it declines), :func:`nucleus_by_sort`: one sort
    (:func:`~decodekit.processors.sorting.sort_values`) and one ``exp``; the cumulative mass is
    never summed over the whole vocabulary: sums of blocks of ``BLOCK`` tokens, their running
    total, and a running total within the one block where the mass crosses ``tail``. A
    ``workspace`` (:class:`~decodekit.processors.sorting.Workspace`) keeps its two ``[B, V]``
    buffers from one call to the next.
    """
    x = logits.float()
    binned = nucleus_by_bins(x, torch.as_tensor(tail, dtype=torch.float64).expand(x.shape[0], 1), min_keep, workspace)
    if binned is not None:  # on CPU: only the logits near each row's cut are sorted
        return binned
    return nucleus_by_sort(x, tail, min_keep, workspace)


def nucleus_by_sort(
    x: torch.Tensor, tail: float | torch.Tensor, min_keep: int = 1, workspace: Workspace | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nucleus_bounds` by sorting each whole row of float32 ``x``: on any device."""
    b, v = x.shape
    ascending = sort_values(x, workspace)  # [B, V]
    top = ascending[:, -1:]  # [B, 1] the largest logit (finite: every row keeps a token)
    pad = (-v) % BLOCK
    shape = (b, pad + v)  # [B, nb * BLOCK]: zeros in front, then exp(x - top) ascending
    mass = x.new_empty(shape) if workspace is None else workspace.buffer("mass", shape, x.dtype, x.device)
    mass[:, :pad] = 0.0
    torch.sub(ascending, top, out=mass[:, pad:]).exp_()
    blocks = mass.view(b, -1, BLOCK)  # [B, nb, BLOCK]
    sums = blocks.sum(-1)  # [B, nb]
    running = sums.cumsum(-1)  # [B, nb] the mass up to each block's end
    tail = torch.as_tensor(tail, dtype=x.dtype, device=x.device).expand(b, 1)
    cut = (tail * running[:, -1:]).masked_fill_(tail == 0, -1.0)  # [B, 1]; p = 1 removes none, keeps all
    j = torch.searchsorted(running, cut, right=True).clamp_(max=sums.shape[1] - 1)  # the block crossing the cut
    before = torch.where(j > 0, running.gather(-1, (j - 1).clamp(min=0)), 0.0)
    within = _block(blocks, j).cumsum(-1).add_(before)  # [B, BLOCK] running mass inside block j
    removed = j * BLOCK + torch.searchsorted(within, cut, right=True) - pad  # tokens at or under the cut
    removed = removed.clamp_(min=0, max=max(v - min_keep, 0))
    floor = ascending.gather(-1, removed)  # [B, 1]
    # the kept mass: every token >= floor (ties before the cut included), summed from the top
    first = torch.searchsorted(ascending, floor) + pad  # [B, 1] position of the first kept token
    jf, offset = first // BLOCK, first % BLOCK
    above = sums.flip(-1).cumsum(-1).flip(-1)  # [B, nb] the mass from each block to the end
    after = torch.where(jf + 1 < sums.shape[1], above.gather(-1, (jf + 1).clamp(max=sums.shape[1] - 1)), 0.0)
    part = _block(blocks, jf).masked_fill(torch.arange(BLOCK, device=x.device) < offset, 0.0).sum(-1, keepdim=True)
    return floor, top + (after + part).log()


def _block(blocks: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Block ``j[r]`` of each row ``r``: ``[B, nb, BLOCK]``, ``[B, 1]`` -> ``[B, BLOCK]``."""
    return blocks.gather(1, j[..., None].expand(-1, 1, blocks.shape[-1])).squeeze(1)


class TopKTopP(LogitsProcessor):
    """``TopK`` then ``TopP``, fused: sorts only the ``k`` candidates, never the vocabulary.

    Gives the same tokens as running the two in turn; :class:`ProcessorChain` builds it for
    adjacent ``TopK | TopP``, so users never need to name it.
    """

    name = "top_k_top_p"
    negative_padding = True  # never reads input_ids: other rows' padding cannot matter

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


def _min_keep(n: int) -> int:
    from decodekit.errors import ConfigError

    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"min_tokens_to_keep: {n!r} is not allowed; it must be an integer >= 1")
    return n
