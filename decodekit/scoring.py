"""Scoring text: every token's log-probability under the model, the total and the perplexity.

:func:`score` tokenizes texts, runs them through the model in right-padded batches (causal
attention: no real position ever sees the padding after it) and reads each token's raw
log-probability given the tokens before it, with the top-n alternatives if asked.
:func:`sequence_logprobs` does the same for token ids; it gives prompt logprobs
(``prompt_logprobs``) and beam search's logprobs.

The logits of every position come from one forward pass: ``GPT.forward`` for the native GPT,
the wrapped model's own forward for :class:`~decodekit.models.hf.HFCausalLM`; any other
:class:`~decodekit.models.protocol.CausalLM` is stepped one position at a time through its cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from decodekit.errors import ConfigError
from decodekit.logprobs import TokenLogprobs, check_logprobs, to_host, top_logprobs
from decodekit.tokenization import Tokenizer, check_vocab


@dataclass
class ScoreResult:
    """One scored text.

    Attributes:
        text: the text as given.
        tokens: its token ids, the start token first when one was put there (``start_token``).
        logprobs: the log-probability of each token after the first (``tokens[1:]``).
        total: their sum (the text's log-likelihood); ``num_tokens``: how many were scored.
        perplexity: ``exp(-total / num_tokens)``.
    """

    text: str
    tokens: list[int]
    logprobs: TokenLogprobs
    total: float
    num_tokens: int
    perplexity: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text, "token_ids": self.tokens, "num_tokens": self.num_tokens, "total_logprob": self.total,
            "perplexity": self.perplexity, "logprobs": self.logprobs.to_dict(),
        }  # fmt: skip


def position_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token logits at every position of right-padded ``ids`` ``[B, T]``: ``[B, T, V]`` float32."""
    from decodekit.models.gpt import GPT
    from decodekit.models.hf import HFCausalLM

    context = getattr(model, "max_context", None)
    if context is not None and ids.shape[1] > context:
        raise ConfigError(f"a sequence of {ids.shape[1]} tokens is longer than the model's context of {context}; shorten it")
    with torch.inference_mode():
        if isinstance(model, GPT):
            return model(ids).float()
        if isinstance(model, HFCausalLM):
            return model.model(input_ids=ids, attention_mask=mask.long()).logits.float()
        cache = model.new_cache(ids.shape[0], ids.shape[1])  # any CausalLM: one position per step
        steps = []
        for t in range(ids.shape[1]):
            pos = torch.full_like(ids[:, :1], t)
            logits, cache = model.step(ids[:, t : t + 1], position_ids=pos, attention_mask=torch.ones_like(mask[:, : t + 1]), cache=cache)
            steps.append(logits.float())
        return torch.stack(steps, 1)


def sequence_logprobs(
    model: Any, sequences: Sequence[Sequence[int]], *, top: int = 0, batch_size: int = 8
) -> list[TokenLogprobs]:
    """Raw logprobs of ``seq[1:]`` given what comes before, for each token sequence.

    ``top``: alternatives per token. Sequences run ``batch_size`` at a time, right-padded.
    """
    check_logprobs(top, name="top")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} is not allowed: must be an integer >= 1")
    results: list[TokenLogprobs] = []
    device = model.device
    for start in range(0, len(sequences), batch_size):
        batch = [list(s) for s in sequences[start : start + batch_size]]
        width = max(len(s) for s in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, seq in enumerate(batch):  # host-side packing, once per batch
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = True
        ids, mask = ids.to(device), mask.to(device)
        logits = position_logits(model, ids, mask)[:, :-1]  # [B, T - 1, V]: predicts ids[:, 1:]
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        chosen = (logits.gather(-1, ids[:, 1:, None]) - lse).squeeze(-1)  # [B, T - 1]
        values, top_ids = top_logprobs(logits, lse, top)
        results.extend(to_host(chosen, values, top_ids, [s[1:] for s in batch], "raw"))
    return results


def score(
    model: Any,
    tokenizer: Tokenizer,
    texts: str | Sequence[str],
    *,
    top_logprobs: int = 0,
    batch_size: int = 8,
    start_token: bool = True,
) -> list[ScoreResult]:
    """Score each text under ``model``: per-token logprobs, total, perplexity; one result per text.

    Args:
        texts: one text or a list; scored ``batch_size`` at a time.
        top_logprobs: also the ``n`` most likely tokens at each position (0 to 20).
        start_token: put the tokenizer's BOS (else EOS, as GPT-2 does) first, unless its encoding
            already starts with it, so the text's first token is scored too; ``False``: score from
            the second token.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise ConfigError("texts: give at least one text")
    check_vocab(tokenizer, model)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start_token and start is None:
        raise ConfigError("start_token=True: the tokenizer has no BOS or EOS token; pass start_token=False")
    encoded = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ConfigError(f"texts[{i}]: expected text, got {type(text).__name__}")
        ids = tokenizer.encode(text)
        if start_token and (not ids or ids[0] != start):
            ids = [start, *ids]
        if len(ids) < 2:
            need = "is empty: nothing to score" if start_token else "needs at least 2 tokens to score (or start_token=True)"
            raise ConfigError(f"texts[{i}]={text!r}: {need}")
        encoded.append(ids)
    scored = sequence_logprobs(model, encoded, top=top_logprobs, batch_size=batch_size)
    return [
        ScoreResult(text, ids, lp, lp.total, len(lp.logprobs), lp.perplexity)
        for text, ids, lp in zip(texts, encoded, scored)
    ]
