"""Penalties on tokens already in the sequence: repetition, presence, frequency, n-gram blocking."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from decodekit.processors.base import NEG_INF, LogitsProcessor, keep_nonempty, to_dtype
from decodekit.validation import validate

_F32_MAX = float(torch.finfo(torch.float32).max)


class RepetitionPenalty(LogitsProcessor):
    """Discourage every token already in the sequence (prompt included), once each.

    For each token ``i`` present in ``input_ids``: ``x_i' = x_i / r`` if ``x_i > 0`` else
    ``x_i * r``. ``r > 1`` discourages repetition, ``r < 1`` encourages it, ``r = 1`` is off;
    typical 1.1 to 1.3.
    transformers' ``RepetitionPenaltyLogitsProcessor`` semantics (CTRL, Keskar et al. 2019).
    Left-padding tokens count as present, as in transformers.
    """

    name = "repetition_penalty"
    order = 10

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        repetition_penalty: float = Field(gt=0.0, allow_inf_nan=False, description="> 1 discourages repeats; 1 = off")

    def __init__(self, repetition_penalty: float) -> None:
        self.repetition_penalty = float(validate(self.Params, repetition_penalty=repetition_penalty).repetition_penalty)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] == 0 or self.repetition_penalty == 1.0:
            return logits
        ids = input_ids.to(logits.device)
        seen = logits.gather(-1, ids).float()  # [B, T]: only the history's logits change
        r = min(self.repetition_penalty, _F32_MAX)
        inv = min(1.0 / self.repetition_penalty, _F32_MAX)  # extreme r must not turn 0 * r into NaN
        penalised = torch.where(seen < 0, seen * r, seen * inv)
        info = torch.finfo(logits.dtype)
        penalised = torch.where(torch.isinf(seen), seen, penalised.clamp(min=info.min, max=info.max))
        return logits.scatter(-1, ids, penalised.to(logits.dtype))


class _GeneratedCounts(LogitsProcessor):
    """Shared by presence and frequency penalties: counts of each token among generated ones."""

    def __init__(self) -> None:
        self._prompt_length: int | None = None

    def begin(self, input_ids: torch.Tensor) -> None:
        self._prompt_length = input_ids.shape[-1]

    def counts(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        start = self._prompt_length or 0
        generated = input_ids[:, start:].to(logits.device)
        counts = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        return counts.scatter_add_(-1, generated, torch.ones_like(generated, dtype=torch.float32))


class PresencePenalty(_GeneratedCounts):
    """Subtract ``alpha`` once from every token already generated: ``x_i' = x_i - alpha * [c_i > 0]``.

    ``c_i`` counts token ``i`` among the *generated* tokens (OpenAI's and vLLM's semantics); when
    used outside :func:`decodekit.generate` (no ``begin`` call) it counts all of ``input_ids``.
    Range -2 to 2 as OpenAI allows; negative values encourage repeats. transformers has none.
    """

    name = "presence_penalty"
    order = 20

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        presence_penalty: float = Field(ge=-2.0, le=2.0, description="flat penalty on generated tokens, in [-2, 2]")

    def __init__(self, presence_penalty: float) -> None:
        super().__init__()
        self.presence_penalty = float(validate(self.Params, presence_penalty=presence_penalty).presence_penalty)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.presence_penalty == 0.0:
            return logits
        c = self.counts(input_ids, logits)
        out = logits.float() - self.presence_penalty * (c > 0).float()
        return to_dtype(out, logits)


class FrequencyPenalty(_GeneratedCounts):
    """Subtract ``alpha`` per occurrence among generated tokens: ``x_i' = x_i - alpha * c_i``.

    OpenAI's semantics (``c_i`` counts generated tokens only; see :class:`PresencePenalty`).
    Range -2 to 2. transformers has none.
    """

    name = "frequency_penalty"
    order = 30

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        frequency_penalty: float = Field(ge=-2.0, le=2.0, description="penalty per generated occurrence, in [-2, 2]")

    def __init__(self, frequency_penalty: float) -> None:
        super().__init__()
        self.frequency_penalty = float(validate(self.Params, frequency_penalty=frequency_penalty).frequency_penalty)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.frequency_penalty == 0.0:
            return logits
        c = self.counts(input_ids, logits)
        return to_dtype(logits.float() - self.frequency_penalty * c, logits)


class NoRepeatNGram(LogitsProcessor):
    """Ban every token that would complete an n-gram already in the sequence (prompt included).

    With ``n = no_repeat_ngram_size``: for each earlier position where the last ``n - 1`` tokens
    occurred, the token that followed them is set to ``-inf``. ``n = 1`` bans every token seen.
    transformers' ``NoRepeatNGramLogitsProcessor`` semantics, vectorised (no loop over rows).
    ``n = 0`` is off, as in transformers. A ban that would leave a row no token is not applied to
    that row. Paulus et al. 2017, "A Deep Reinforced Model for Abstractive Summarization".
    """

    name = "no_repeat_ngram"
    idempotent = True
    order = 40

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        no_repeat_ngram_size: int = Field(ge=0, description="ban repeating n-grams of this size; 0 = off")

    def __init__(self, no_repeat_ngram_size: int) -> None:
        self.no_repeat_ngram_size = validate(self.Params, no_repeat_ngram_size=no_repeat_ngram_size).no_repeat_ngram_size

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        n = self.no_repeat_ngram_size
        t = input_ids.shape[-1]
        if n == 0 or t < n:
            return logits
        ids = input_ids.to(logits.device)
        windows = ids.unfold(-1, n, 1)  # [B, W, n], every n-gram so far
        prefix = ids[:, t - n + 1 :]  # [B, n-1], the n-gram being started now
        match = (windows[..., : n - 1] == prefix[:, None, :]).all(dim=-1)  # [B, W]
        hits = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        hits.scatter_add_(-1, windows[..., n - 1], match.float())
        return keep_nonempty(torch.where(hits > 0, NEG_INF, logits), logits, "no_repeat_ngram_size")
