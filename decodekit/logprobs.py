"""Per-token log-probabilities: the chosen token's and the top-n alternatives', gathered on the device.

Each step, :func:`step_logprobs` takes one ``[B, V]`` row of logits per sequence and gives the
chosen token's log-probability and the ``n`` most likely tokens with theirs, as
``logit - logsumexp(logits)``: one reduction and one top-k over the row, with no ``[B, V]``
log-softmax written out and no host sync. :class:`LogprobsRecorder` keeps the step results on the
device; they reach the host once, when the run (or, in the engine, the request) ends, as one
:class:`TokenLogprobs` per sequence.

Two modes, as vLLM's ``logprobs_mode``: ``"raw"``, the model's own distribution (log-softmax of
its logits, what a score of the text under the model is), and ``"processed"``, the distribution
the token was drawn from (after the processor chain: temperature, penalties, truncation; a token
the chain removed has ``-inf``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from decodekit.errors import ConfigError

MODES = ("raw", "processed")
MAX_LOGPROBS = 20  # the most alternatives per token (vLLM's default limit)


def check_logprobs(n: Any, mode: Any = "raw", *, name: str = "logprobs", prefix: str = "") -> None:
    """One line naming the setting for a bad ``n`` (top alternatives) or ``mode``."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_LOGPROBS):
        raise ConfigError(
            f"{prefix}{name}={n!r} is not allowed: must be an integer in [0, {MAX_LOGPROBS}] "
            "(alternatives per token; 0: the chosen token only) or None"
        )
    if mode not in MODES:
        raise ConfigError(f"{prefix}logprobs_mode={mode!r} is not allowed: must be one of {', '.join(MODES)}")


def step_logprobs(logits: torch.Tensor, token: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(chosen [B], top values [B, n], top ids [B, n])`` log-probabilities of one step.

    ``logits``: ``[B, V]`` float; ``token``: ``[B]`` ids (negative ids, free engine slots, read as 0).
    """
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [B, 1]
    chosen = (logits.gather(-1, token.clamp(min=0)[:, None]) - lse).squeeze(-1)
    return (chosen, *top_logprobs(logits, lse, n))


def nucleus_logprobs(
    logits: torch.Tensor, token: torch.Tensor, n: int, floor: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`step_logprobs` of ``logits`` cut to a top-p nucleus, from its bounds, never written out.

    ``floor``, ``lse`` (``[B, 1]``, from :func:`~decodekit.processors.truncation.nucleus_bounds`):
    the nucleus keeps ``logits >= floor`` and ``lse`` is its log-mass. The same values as
    ``step_logprobs(torch.where(logits >= floor, logits, -inf), token, n)`` up to rounding, without
    the ``[B, V]`` tensor whose ``-inf`` entries make ``exp`` and ``logsumexp`` slow on CPU.
    """
    picked = logits.gather(-1, token.clamp(min=0)[:, None])  # [B, 1]
    chosen = torch.where(picked >= floor, picked - lse, float("-inf")).squeeze(-1)
    if not n:
        empty = logits.new_empty((logits.shape[0], 0))
        return chosen, empty, empty.long()
    values, ids = blocked_topk(logits, n) if logits.device.type == "cpu" else logits.topk(n, dim=-1)
    kept = (values >= floor) & (values > float("-inf"))  # a floor of -inf (p = 1) keeps finite ones
    return chosen, torch.where(kept, values - lse, float("-inf")), ids.masked_fill(~kept, -1)


def top_logprobs(logits: torch.Tensor, lse: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [..., n], ids [..., n])``: the ``n`` largest ``logits - lse`` over the last dim."""
    if not n:
        empty = logits.new_empty((*logits.shape[:-1], 0))
        return empty, empty.long()
    values, ids = blocked_topk(logits, n) if logits.device.type == "cpu" else logits.topk(n, dim=-1)
    return values - lse, ids.masked_fill(values == float("-inf"), -1)  # fewer than n tokens left


BLOCK = 256  # vocabulary positions per block of :func:`blocked_topk`


def blocked_topk(logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits.topk(n)`` over the last dim, from the ``n`` blocks of ``BLOCK`` with the largest maxima.

    Each of the ``n`` largest values lies in one of those blocks (a block outside them has ``n``
    blocks whose maxima are at least its own), so the top-k of their ``n * BLOCK`` values, and of
    the tail that fills no block, is the top-k of the row. On CPU this is a fast vectorised max
    over blocks and a top-k of a few thousand values instead of a top-k over the vocabulary
    (about 4x faster at GPT-2's 50,257 tokens).
    """
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    blocks = vocab // BLOCK
    if blocks <= n:
        return logits.topk(n, dim=-1)
    split = blocks * BLOCK
    main = logits[..., :split].reshape(*lead, blocks, BLOCK)  # a view: [..., blocks, BLOCK]
    best = main.amax(-1).topk(n, dim=-1).indices  # [..., n] the blocks with the largest maxima
    offsets = torch.arange(BLOCK, device=logits.device)
    candidates = torch.cat([main.gather(-2, best[..., None].expand(*lead, n, BLOCK)).flatten(-2), logits[..., split:]], -1)
    ids = torch.cat([(best[..., None] * BLOCK + offsets).flatten(-2),
                     torch.arange(split, vocab, device=logits.device).expand(*lead, vocab - split)], -1)  # fmt: skip
    values, at = candidates.topk(n, dim=-1)
    return values, ids.gather(-1, at)


class LogprobsRecorder:
    """The loop's logprobs: one :func:`step_logprobs` per step, kept on the device."""

    def __init__(self, n: int, mode: str) -> None:
        check_logprobs(n, mode)
        self.n, self.mode = n, mode
        self.chosen: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []

    def record(self, raw: torch.Tensor, processed: torch.Tensor, token: torch.Tensor, nucleus: Any = None) -> None:
        """One step; ``nucleus``: ``(floor, lse)`` of a top-p nucleus the sampler drew from, which
        ``processed`` has not been cut to (see :func:`nucleus_logprobs`)."""
        if self.mode == "processed" and nucleus is not None:
            chosen, values, ids = nucleus_logprobs(processed, token, self.n, *nucleus)
        else:
            chosen, values, ids = step_logprobs(raw if self.mode == "raw" else processed, token, self.n)
        self.chosen.append(chosen)
        self.values.append(values)
        self.ids.append(ids)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(chosen [B, N], top values [B, N, n], top ids [B, N, n])``."""
        return torch.stack(self.chosen, 1), torch.stack(self.values, 1), torch.stack(self.ids, 1)


@dataclass
class TokenLogprobs:
    """The log-probabilities of one sequence's tokens.

    Attributes:
        tokens: the token ids scored (a continuation's new tokens, or a text's / prompt's tokens
            after the first).
        logprobs: each token's log-probability (natural log), given the tokens before it.
        top_ids, top_logprobs: per token, the ``n`` most likely tokens at that position and their
            log-probabilities, most likely first (empty lists with ``n = 0``). Where the processor
            chain left fewer than ``n`` tokens, the rest are id ``-1`` with ``-inf``.
        mode: ``"raw"`` (the model's distribution) or ``"processed"`` (after the processor chain).
    """

    tokens: list[int]
    logprobs: list[float]
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)
    mode: str = "raw"

    @property
    def total(self) -> float:
        """The sum of the tokens' log-probabilities: the sequence's log-likelihood."""
        return float(sum(self.logprobs))

    @property
    def perplexity(self) -> float:
        """``exp(-total / tokens)``; ``nan`` with no token."""
        return math.exp(-self.total / len(self.logprobs)) if self.logprobs else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """Plain lists for JSON and Parquet records; ``-inf`` (a token the chain removed) as ``None``."""
        return {
            "mode": self.mode, "tokens": self.tokens, "logprobs": _finite(self.logprobs),
            "top_ids": self.top_ids, "top_logprobs": [_finite(row) for row in self.top_logprobs],
        }  # fmt: skip


def _finite(values: list[float]) -> list[float | None]:
    return [None if v == float("-inf") else v for v in values]


def logprob_fields(logprobs: TokenLogprobs | None, prompt_logprobs: TokenLogprobs | None = None) -> dict[str, Any]:
    """The ``logprobs`` / ``prompt_logprobs`` keys of an output record, for those asked for."""
    fields = {}
    if logprobs is not None:
        fields["logprobs"] = logprobs.to_dict()
    if prompt_logprobs is not None:
        fields["prompt_logprobs"] = prompt_logprobs.to_dict()
    return fields


def to_host(
    chosen: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, tokens: list[list[int]], mode: str
) -> list[TokenLogprobs]:
    """One :class:`TokenLogprobs` per row of ``[B, N]`` / ``[B, N, n]`` tensors, each cut at its
    row's token count: one copy to the host for the whole batch."""
    chosen_l, values_l, ids_l = chosen.tolist(), values.tolist(), ids.tolist()
    return [
        TokenLogprobs(list(row), c[: len(row)], i[: len(row)], v[: len(row)], mode)
        for row, c, v, i in zip(tokens, chosen_l, values_l, ids_l)
    ]
