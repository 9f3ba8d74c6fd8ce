"""Penalties on tokens already in the sequence: repetition, presence, frequency, n-gram blocking.

Each reads ``input_ids`` and ignores negative ids there (left padding; see
:mod:`decodekit.processors.base`), and takes its setting as a scalar or one value per row.

Repetition, presence and frequency penalties share the setting ``penalty_last_n`` (llama.cpp's
``--repeat-last-n``): only the row's last ``n`` tokens are looked at; ``-1`` (the default) means
all of them, ``0`` none (the penalty is off). One value given as a setting reaches all three.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from decodekit.processors.base import NEG_INF, LogitsProcessor, keep_nonempty, to_dtype
from decodekit.processors.rows import column, generated_mask, prompt_lengths, real_tokens

_F32_MAX = float(torch.finfo(torch.float32).max)

PENALTY_LAST_N_DOC = "penalise only the last n tokens; -1 = all, 0 = none"


def penalty_last_n_field() -> Any:
    """The ``penalty_last_n`` field, the same in each penalty's ``Params`` (a shared setting)."""
    return Field(-1, ge=-1, description=PENALTY_LAST_N_DOC)


def in_window(input_ids: torch.Tensor, last_n: int | torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: the real tokens among each row's last ``n`` (``n = -1``: all; ``0``: none)."""
    real = real_tokens(input_ids)
    if not isinstance(last_n, torch.Tensor):
        if last_n < 0:
            return real
        if last_n == 0:
            return torch.zeros_like(real)
    n = column(last_n, input_ids) if isinstance(last_n, torch.Tensor) else last_n
    from_end = real.flip(-1).cumsum(dim=-1).flip(-1)  # [B, T] real tokens at or after each position
    return real & ((n < 0) | (from_end <= n))


class RepetitionPenalty(LogitsProcessor):
    """Discourage every token already in the sequence (prompt included), once each.

    For each token ``i`` present in ``input_ids``: ``x_i' = x_i / r`` if ``x_i > 0`` else
    ``x_i * r``. ``r > 1`` discourages repetition, ``r < 1`` encourages it, ``r = 1`` is off;
    typical 1.1 to 1.3. transformers' ``RepetitionPenaltyLogitsProcessor`` semantics (CTRL,
    Keskar et al. 2019). Non-negative left-padding ids count as present, as in transformers;
    negative ones are not tokens. ``penalty_last_n = n`` looks at the row's last ``n`` tokens only,
    prompt included, as llama.cpp's penalties sampler (whose default is 64; ours, ``-1``, is
    the whole sequence, as transformers).
    """

    name = "repetition_penalty"
    order = 10
    negative_padding = True
    row_fields = ("repetition_penalty", "penalty_last_n")
    row_params = {"repetition_penalty": 1.0, "penalty_last_n": -1}
    row_test_values = {"repetition_penalty": [1.0, 1.3, 0.7, 1e30], "penalty_last_n": [-1, 0, 1, 2, 4]}
    shared_settings = ("penalty_last_n",)

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        repetition_penalty: float = Field(gt=0.0, allow_inf_nan=False, description="> 1 discourages repeats; 1 = off")
        penalty_last_n: int = penalty_last_n_field()

    def __init__(self, repetition_penalty: Any, penalty_last_n: Any = -1) -> None:
        self.init_setting("repetition_penalty", repetition_penalty)
        self.init_setting("penalty_last_n", penalty_last_n, int)
        self.active = self.any_row_on()

    def any_row_on(self) -> bool:
        return _any_on(self.repetition_penalty, 1.0, self.penalty_last_n)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        r = self.repetition_penalty
        if input_ids.shape[-1] == 0 or not self.active:
            return logits
        if isinstance(r, torch.Tensor):
            self.check_batch(logits)
            r64 = column(r, logits, torch.float64)
            strength, inverse = r64.clamp(max=_F32_MAX).float(), (1.0 / r64).clamp(max=_F32_MAX).float()
        else:  # extreme r must not turn 0 * r into NaN
            strength, inverse = min(r, _F32_MAX), min(1.0 / r, _F32_MAX)
        # transformers' way: gather the logits of the tokens in the history, penalise, scatter back;
        # O(B x T), not O(B x V). Padding (negative ids) points at the row's last token, which is
        # present, and carries its penalised value, so duplicates always agree.
        # Tokens before the window (penalty_last_n) are treated as padding: the last token is in it.
        counted = in_window(input_ids, self.penalty_last_n)  # [B, T]
        last = input_ids[:, -1:]  # right-aligned rows: a row's last id is real unless all is padding
        ids = torch.where(counted, input_ids, last).clamp(min=0)  # [B, T]
        x = logits.gather(-1, ids).float()  # [B, T]
        penalised = torch.where(x < 0, x * strength, x * inverse)
        info = torch.finfo(logits.dtype)
        penalised = torch.where(torch.isinf(x), x, penalised.clamp(min=info.min, max=info.max)).to(logits.dtype)
        on = (last >= 0) if not isinstance(r, torch.Tensor) else (last >= 0) & (column(r, logits, torch.float64) != 1.0)
        if isinstance(self.penalty_last_n, torch.Tensor):  # rows with an empty window are off
            on = on & (column(self.penalty_last_n, logits) != 0)
        return logits.scatter(-1, ids, torch.where(on, penalised, logits.gather(-1, ids)))


def _any_on(value: float | torch.Tensor, off: float, last_n: int | torch.Tensor) -> bool:
    """Whether some row has a penalty that is not ``off`` and a window that is not empty (host values)."""
    if isinstance(value, torch.Tensor) or isinstance(last_n, torch.Tensor):
        on = torch.as_tensor(value, dtype=torch.float64) != off
        return bool((on & (torch.as_tensor(last_n) != 0)).any())
    return value != off and last_n != 0


def _counts(input_ids: torch.Tensor, logits: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """``[B, V]`` float32: how often each token occurs among the positions ``counted`` (``[B, T]``)."""
    ids = input_ids.to(logits.device)
    counts = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    return counts.scatter_add_(-1, ids.clamp(min=0), counted.to(logits.device, torch.float32))


class _GeneratedCounts(LogitsProcessor):
    """Shared by presence and frequency penalties: counts of each token among generated ones."""

    negative_padding = True
    setting = ""

    shared_settings = ("penalty_last_n",)

    def __init__(self, value: Any, penalty_last_n: Any = -1) -> None:
        self._prompt_length: torch.Tensor | None = None
        self.init_setting(self.setting, value)
        self.init_setting("penalty_last_n", penalty_last_n, int)
        self.active = self.any_row_on()

    def begin(self, input_ids: torch.Tensor) -> None:
        self._prompt_length = prompt_lengths(input_ids)

    def any_row_on(self) -> bool:
        return _any_on(getattr(self, self.setting), 0.0, self.penalty_last_n)

    def counts(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        counted = generated_mask(input_ids, self._prompt_length) & in_window(input_ids, self.penalty_last_n)
        return _counts(input_ids, logits, counted)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return logits
        self.check_batch(logits)
        alpha = self.value(self.setting, logits)
        out = to_dtype(logits.float() - alpha * self._amount(self.counts(input_ids, logits)), logits)
        off = None
        if isinstance(alpha, torch.Tensor):  # off rows: the exact value, not its float32 rounding (may be 0)
            off = column(getattr(self, self.setting), logits, torch.float64) == 0.0
        if isinstance(self.penalty_last_n, torch.Tensor):  # an empty window is off too
            empty = column(self.penalty_last_n, logits) == 0
            off = empty if off is None else off | empty
        return out if off is None else torch.where(off, logits, out)

    def _amount(self, counts: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PresencePenalty(_GeneratedCounts):
    """Subtract ``alpha`` once from every token already generated: ``x_i' = x_i - alpha * [c_i > 0]``.

    ``c_i`` counts token ``i`` among the *generated* tokens (OpenAI's and vLLM's semantics); when
    used outside :func:`decodekit.generate` (no ``begin`` call) it counts all of ``input_ids``.
    Range -2 to 2 as OpenAI allows; negative values encourage repeats; 0 is off. transformers has none.
    ``penalty_last_n = n``: only generated tokens among the row's last ``n`` count. llama.cpp
    counts the prompt's tokens in that window too; decodekit never counts the prompt here (the
    two agree once ``n`` tokens were generated).
    """

    name = "presence_penalty"
    setting = "presence_penalty"
    order = 20
    row_fields = ("presence_penalty", "penalty_last_n", "_prompt_length")
    row_params = {"presence_penalty": 0.0, "penalty_last_n": -1}
    row_test_values = {"presence_penalty": [0.0, 0.5, -2.0], "penalty_last_n": [-1, 0, 1, 2, 4]}

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        presence_penalty: float = Field(ge=-2.0, le=2.0, description="flat penalty on generated tokens, in [-2, 2]")
        penalty_last_n: int = penalty_last_n_field()

    def __init__(self, presence_penalty: Any, penalty_last_n: Any = -1) -> None:
        super().__init__(presence_penalty, penalty_last_n)

    def _amount(self, counts: torch.Tensor) -> torch.Tensor:
        return (counts > 0).float()


class FrequencyPenalty(_GeneratedCounts):
    """Subtract ``alpha`` per occurrence among generated tokens: ``x_i' = x_i - alpha * c_i``.

    OpenAI's semantics (``c_i`` counts generated tokens only; see :class:`PresencePenalty`, also
    for ``penalty_last_n``). Range -2 to 2; 0 is off. transformers has none.
    """

    name = "frequency_penalty"
    setting = "frequency_penalty"
    order = 30
    row_fields = ("frequency_penalty", "penalty_last_n", "_prompt_length")
    row_params = {"frequency_penalty": 0.0, "penalty_last_n": -1}
    row_test_values = {"frequency_penalty": [0.0, 0.5, -1.0], "penalty_last_n": [-1, 0, 1, 2, 4]}

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        frequency_penalty: float = Field(ge=-2.0, le=2.0, description="penalty per generated occurrence, in [-2, 2]")
        penalty_last_n: int = penalty_last_n_field()

    def __init__(self, frequency_penalty: Any, penalty_last_n: Any = -1) -> None:
        super().__init__(frequency_penalty, penalty_last_n)

    def _amount(self, counts: torch.Tensor) -> torch.Tensor:
        return counts


class NoRepeatNGram(LogitsProcessor):
    """Ban every token that would complete an n-gram already in the sequence (prompt included).

    With ``n = no_repeat_ngram_size``: for each earlier position where the last ``n - 1`` tokens
    occurred, the token that followed them is set to ``-inf``. ``n = 1`` bans every token seen.
    transformers' ``NoRepeatNGramLogitsProcessor`` semantics, vectorised (no loop over rows; per-row
    sizes take one pass per distinct size). ``n = 0`` is off, as in transformers. An n-gram holding
    a negative (padding) id is never one. A ban that would leave a row no token is not applied to
    that row. Paulus et al. 2017, "A Deep Reinforced Model for Abstractive Summarization".
    """

    name = "no_repeat_ngram"
    idempotent = True
    order = 40
    negative_padding = True
    row_fields = ("no_repeat_ngram_size",)
    row_params = {"no_repeat_ngram_size": 0}

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        no_repeat_ngram_size: int = Field(ge=0, description="ban repeating n-grams of this size; 0 = off")

    def __init__(self, no_repeat_ngram_size: Any) -> None:
        self.init_setting("no_repeat_ngram_size", no_repeat_ngram_size, int)
        self.active = self.any_row_on()
        self._sizes = self._distinct_sizes()

    def _distinct_sizes(self) -> list[int]:
        n = self.no_repeat_ngram_size
        return sorted({int(v) for v in n.tolist()} - {0}) if isinstance(n, torch.Tensor) else [n] if n else []

    def any_row_on(self) -> bool:
        n = self.no_repeat_ngram_size
        return bool((n > 0).any()) if isinstance(n, torch.Tensor) else n > 0

    def assign(self, rows: torch.Tensor, other: LogitsProcessor) -> None:
        super().assign(rows, other)
        self._sizes = self._distinct_sizes()

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        self.check_batch(logits)
        ids = input_ids.to(logits.device)
        banned = None
        per_row = isinstance(self.no_repeat_ngram_size, torch.Tensor)
        for n in self._sizes:  # one pass per distinct size, not per row
            if ids.shape[-1] < n:
                continue
            hits = _ngram_hits(ids, n, logits.shape)
            if per_row:
                hits = hits & (column(self.no_repeat_ngram_size, logits) == n)
            banned = hits if banned is None else banned | hits
        if banned is None:
            return logits
        return keep_nonempty(torch.where(banned, NEG_INF, logits), logits, "no_repeat_ngram_size")


def _ngram_hits(ids: torch.Tensor, n: int, shape: torch.Size) -> torch.Tensor:
    """``[B, V]`` bool: tokens that would complete an n-gram of ``ids`` (none holding a negative id)."""
    t = ids.shape[-1]
    windows = ids.unfold(-1, n, 1)  # [B, W, n], every n-gram so far
    prefix = ids[:, t - n + 1 :]  # [B, n-1], the n-gram being started now
    match = (windows[..., : n - 1] == prefix[:, None, :]).all(dim=-1) & (windows >= 0).all(dim=-1)  # [B, W]
    hits = torch.zeros(shape, dtype=torch.float32, device=ids.device)
    hits.scatter_add_(-1, windows[..., n - 1].clamp(min=0), match.float())
    return hits > 0
