"""Bans and biases: bad words, per-token logit bias, holding back EOS until a minimum length."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from decodekit.errors import ConfigError
from decodekit.processors.base import NEG_INF, BuildContext, LogitsProcessor, keep_nonempty, to_dtype
from decodekit.processors.rows import (
    generated_count,
    is_sequences_per_row,
    padded_sequences,
    prompt_lengths,
    row_values,
)
from decodekit.validation import token_sequences, validate


class BadWords(LogitsProcessor):
    """Never generate the given token sequences.

    A one-token sequence is always banned. For a longer one, its last token is banned whenever
    the sequence so far ends with the rest of it (its prefix), so the whole sequence can never
    be completed. transformers' ``NoBadWordsLogitsProcessor`` semantics. Sequences are grouped by
    length and matched as tensors: the cost per step grows with the number of distinct lengths,
    not with the number of sequences or rows. A ban that would leave a row no token is not
    applied to that row (on CPU a :class:`BanSkippedWarning` says so), and a set of one-token
    sequences that covers the whole vocabulary is refused. An empty list is off. A prefix never
    matches negative (padding) ids.

    Per row: one list of sequences per row (``[[[5]], [], [[1, 2]]]``; ``[]`` is off). The rows'
    sequences are held padded, ``[B, K, L]`` ids (``-1`` past each sequence's end) and ``[B, K]``
    lengths (0: no sequence), and matched for all rows at once, one pass per distinct length.
    ``sequences`` keeps what the constructor was given; ``reorder`` and ``assign`` move the tensors.

    From settings, strings are tokenized (``bad_words=[" damn"]``; with BPE tokenizers ``"damn"``
    and ``" damn"`` are different sequences); a string whose tokens do not decode back to it
    (characters the tokenizer drops or maps to an unknown token) is refused, and so is an entry
    that is exactly the end-of-sequence token: banning it would let no sequence end (transformers
    drops such an entry silently; to hold EOS back for a while use ``min_new_tokens``).
    """

    name = "bad_words"
    idempotent = True
    test_params = [
        lambda v: {"sequences": [[v - 1]] if v > 1 else [[0, 0]]},
        lambda v: {"sequences": [[0, v - 1], [v // 2]] if v > 1 else [[0, 0]]},
        lambda v: {"sequences": [[0, 0, 0], [1 % v, 0], [v - 1, v - 1]]},
    ]
    row_test_values = {"bad_words": [[], [[0, 0]], [[1, 0], [2]], [[0, 1, 0], [3, 3]], [[2], [4, 1], [1, 1, 1, 1]]]}
    order = 50
    negative_padding = True
    row_fields = ("_words", "_lengths")
    row_params = {"bad_words": []}
    row_padding = {"_words": -1, "_lengths": 0}

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        bad_words: list[str | list[int]] = Field(
            description="strings or token-id sequences that must never be generated; [] = off"
        )

        @field_validator("bad_words")
        @classmethod
        def _non_empty(cls, value: list[Any]) -> list[Any]:
            return token_sequences(value)

    def __init__(self, sequences: list[list[int]] | list[list[list[int]]]) -> None:
        if is_sequences_per_row(sequences):
            rows = row_values(sequences, _checked_ids)
            self.sequences = rows
            self.rows = len(rows)
            self._by_row = True
            self._words, self._lengths = padded_sequences(rows)
            self._host_checks(rows)
            self.active = any(rows)
            return
        self.sequences = _checked_ids(sequences)
        self._by_row = False  # one set for every row (an engine may still set `rows`)
        single = sorted({s[0] for s in self.sequences if len(s) == 1})
        self._single = torch.tensor(single, dtype=torch.long)
        by_len: dict[int, list[list[int]]] = {}
        for s in self.sequences:
            if len(s) > 1:
                by_len.setdefault(len(s), []).append(s)
        # length -> (prefixes [N, L-1], last tokens [N])
        self._groups = {
            n: (torch.tensor([s[:-1] for s in seqs]), torch.tensor([s[-1] for s in seqs]))
            for n, seqs in sorted(by_len.items())
        }
        self._cache: dict[tuple[int, torch.device], tuple[torch.Tensor, dict]] = {}

    def _host_checks(self, rows: list[list[list[int]]]) -> None:
        """Host facts about per-row sequences, checked against the vocabulary at a call (no sync)."""
        self._biggest = max((t for row in rows for s in row for t in s), default=-1)
        self._most_singles = max(len({s[0] for s in row if len(s) == 1}) for row in rows)
        self._sizes = sorted({len(s) for row in rows for s in row})

    @classmethod
    def from_params(cls, params: BaseModel, context: BuildContext) -> BadWords:
        return cls(_token_ids(params.bad_words, context))

    @classmethod
    def from_row_params(cls, values: dict[str, list[Any]], shared: dict[str, Any], context: BuildContext) -> BadWords:
        return cls(row_values(values["bad_words"], lambda words: _token_ids(words, context)))

    def assign(self, rows: torch.Tensor, other: LogitsProcessor) -> None:
        super().assign(rows, other)  # re-pads to the longer lists
        if isinstance(other, BadWords) and self._by_row and other._by_row:
            self._biggest = max(self._biggest, other._biggest)
            self._most_singles = max(self._most_singles, other._most_singles)
            self._sizes = sorted(set(self._sizes) | set(other._sizes))

    def any_row_on(self) -> bool:
        return bool((self._lengths > 0).any()) if self._by_row else bool(self.sequences)

    def _on(self, vocab_size: int, device: torch.device) -> tuple[torch.Tensor, dict]:
        key = (vocab_size, device)
        if key not in self._cache:
            biggest = max(max(s) for s in self.sequences)
            if biggest >= vocab_size:
                raise ConfigError(f"bad_words: token id {biggest} is outside the vocabulary (size {vocab_size})")
            _refuse_whole_vocabulary(self.sequences, vocab_size)
            always = torch.zeros(vocab_size, dtype=torch.bool)
            always[self._single] = True
            groups = {n: (p.to(device), last.to(device)) for n, (p, last) in self._groups.items()}
            self._cache[key] = (always.to(device), groups)
        return self._cache[key]

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self._by_row:
            return self._per_row_call(input_ids, logits)
        if not self.sequences:
            return logits
        batch, vocab = logits.shape
        always, groups = self._on(vocab, logits.device)
        t = input_ids.shape[-1]
        ids = input_ids.to(logits.device)
        banned = always.to(torch.uint8).expand(batch, vocab).clone()  # [B, V], one buffer for every group
        for n, (prefixes, last) in groups.items():
            if t < n - 1:
                continue
            tail = ids[:, t - (n - 1) :]  # [B, n-1]
            match = (tail[:, None, :] == prefixes[None, :, :]).all(dim=-1)  # [B, N]
            banned.scatter_reduce_(-1, last.expand(batch, -1), match.to(torch.uint8), reduce="amax")
        return keep_nonempty(logits.masked_fill(banned.bool(), NEG_INF), logits, "bad_words")

    def _per_row_call(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Every row's own sequences, all rows at once: one pass per distinct sequence length."""
        if not self.active:
            return logits
        self.check_batch(logits)
        vocab = logits.shape[-1]
        if self._biggest >= vocab:
            raise ConfigError(f"bad_words: token id {self._biggest} is outside the vocabulary (size {vocab})")
        if self._most_singles >= vocab:
            _refuse_whole_vocabulary([[t] for t in range(vocab)], vocab)
        words, lengths = self._words.to(logits.device), self._lengths.to(logits.device)  # [B, K, L], [B, K]
        ids = input_ids.to(logits.device)
        t = ids.shape[-1]
        banned = torch.zeros(logits.shape, dtype=torch.uint8, device=logits.device)  # [B, V]
        for n in self._sizes:  # distinct lengths over all rows, from host values
            if t < n - 1:
                continue
            tail = ids[:, t - (n - 1) :]  # [B, n-1]
            match = (words[:, :, : n - 1] == tail[:, None, :]).all(dim=-1) & (lengths == n)  # [B, K]
            banned.scatter_reduce_(-1, words[:, :, n - 1].clamp(min=0), match.to(torch.uint8), reduce="amax")
        return keep_nonempty(logits.masked_fill(banned.bool(), NEG_INF), logits, "bad_words")


def _checked_ids(sequences: Any) -> list[list[int]]:
    """Token-id sequences as lists: none empty, every id an integer >= 0 (else one line)."""
    if not isinstance(sequences, (list, tuple)) or any(not isinstance(s, (list, tuple)) for s in sequences):
        raise ConfigError(f"bad_words: {sequences!r} is not allowed: give a list of token-id sequences")
    if any(not s for s in sequences):
        raise ConfigError(f"bad_words: {list(sequences)!r} holds an empty token sequence")
    if any((not isinstance(t, int)) or isinstance(t, bool) or t < 0 for s in sequences for t in s):
        raise ConfigError(f"bad_words: token ids must be integers >= 0, got {sequences!r}")
    return [list(s) for s in sequences]


def _token_ids(words: list[Any], context: BuildContext) -> list[list[int]]:
    """A ``bad_words`` setting as token ids: strings tokenized, the EOS token and ids outside the
    vocabulary refused, and a set of bans covering the whole vocabulary refused."""
    seqs = [context.tokens("bad_words", w) if isinstance(w, str) else list(w) for w in words]
    eos = [] if context.eos_token_id is None else context.eos_ids("bad_words")
    for word, s in zip(words, seqs):
        if len(s) == 1 and s[0] in eos:
            raise ConfigError(
                f"bad_words: {word!r} is the end-of-sequence token {s[0]}; banning it would let no sequence "
                "end (to hold it back for a while, use min_new_tokens)"
            )
    if context.vocab_size is not None:
        for s in seqs:
            if max(s) >= context.vocab_size:
                raise ConfigError(f"bad_words: token id {max(s)} is outside the vocabulary (size {context.vocab_size})")
        _refuse_whole_vocabulary(seqs, context.vocab_size)
    return seqs


def _refuse_whole_vocabulary(sequences: list[list[int]], vocab_size: int) -> None:
    """A set of one-token bans that covers every token would leave nothing to generate."""
    if len({s[0] for s in sequences if len(s) == 1 and s[0] < vocab_size}) >= vocab_size:
        raise ConfigError(
            f"bad_words: bans every token of the vocabulary (size {vocab_size}); nothing would be left to generate"
        )


class LogitBias(LogitsProcessor):
    """Add a fixed bias to chosen tokens: ``x_i' = x_i + b_i``.

    OpenAI's ``logit_bias`` (range -100 to 100; -100 all but bans a token, 100 all but forces
    it). To ban a token outright use :class:`BadWords`. transformers' ``SequenceBiasLogitsProcessor``
    with one-token sequences does the same. ``{}`` is off. Per row: one dict per row, held as
    padded ``[B, K]`` token ids (``-1`` past a row's entries) and biases (``logit_bias`` keeps
    what the constructor was given; ``reorder`` and ``assign`` move the tensors).
    """

    name = "logit_bias"
    test_params = [
        lambda v: {"logit_bias": {0: 5.0, v - 1: -100.0}},
        {"logit_bias": {0: 100.0}},
    ]
    row_test_values = {"logit_bias": [{}, {0: 5.0}, {1: -100.0, 4: 2.5}, {0: 0.0}, {2: 100.0, 3: -0.5, 0: 1e-3}]}
    order = 60
    negative_padding = True  # never reads input_ids: other rows' padding cannot matter
    row_fields = ("_ids", "_biases")
    row_params = {"logit_bias": {}}
    row_padding = {"_ids": -1, "_biases": 0.0}

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        logit_bias: dict[int, float] = Field(description="token id -> bias in [-100, 100]; {} = off")

        @field_validator("logit_bias")
        @classmethod
        def _range(cls, value: dict[int, float]) -> dict[int, float]:
            for token, bias in value.items():
                if token < 0:
                    raise ValueError(f"token id {token} must be >= 0")
                if not -100.0 <= bias <= 100.0:
                    raise ValueError(f"bias {bias} for token {token} must be in [-100, 100]")
            return value

    def __init__(self, logit_bias: dict[int, float] | list[dict[int, float]]) -> None:
        self._dense: dict[tuple[int, torch.device], torch.Tensor] = {}
        if isinstance(logit_bias, (list, tuple)):
            rows = row_values(logit_bias, lambda d: dict(validate(self.Params, logit_bias=d).logit_bias))
            self.logit_bias = rows
            self.rows = len(rows)
            self._by_row = True
            width = max(1, max(len(d) for d in rows))
            self._ids = torch.full((len(rows), width), -1, dtype=torch.long)
            self._biases = torch.zeros((len(rows), width), dtype=torch.float32)  # float32, as the scalar build
            for b, d in enumerate(rows):  # host packing, at construction
                self._ids[b, : len(d)] = torch.tensor(list(d), dtype=torch.long)
                self._biases[b, : len(d)] = torch.tensor(list(d.values()), dtype=torch.float32)
            self._biggest = max((t for d in rows for t in d), default=-1)
            self.active = any(rows)
            return
        self.logit_bias = dict(validate(self.Params, logit_bias=logit_bias).logit_bias)
        self._by_row = False  # one dict for every row (an engine may still set `rows`)

    def any_row_on(self) -> bool:
        return bool((self._ids >= 0).any()) if self._by_row else bool(self.logit_bias)

    def assign(self, rows: torch.Tensor, other: LogitsProcessor) -> None:
        super().assign(rows, other)  # re-pads to the longer dicts
        if isinstance(other, LogitBias) and self._by_row and other._by_row:
            self._biggest = max(self._biggest, other._biggest)

    def _bias(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        key = (vocab_size, device)
        if key not in self._dense:
            biggest = max(self.logit_bias)
            if biggest >= vocab_size:
                raise ConfigError(f"logit_bias: token id {biggest} is outside the vocabulary (size {vocab_size})")
            dense = torch.zeros(vocab_size, dtype=torch.float32)
            dense[list(self.logit_bias)] = torch.tensor(list(self.logit_bias.values()), dtype=torch.float32)
            self._dense[key] = dense.to(device)
        return self._dense[key]

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self._by_row:
            return self._per_row_call(logits)
        if not self.logit_bias:
            return logits
        bias = self._bias(logits.shape[-1], logits.device)
        return to_dtype(logits.float() + bias, logits)

    def _per_row_call(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's own biases, as a dense ``[B, V]`` bias; rows with none keep their logits."""
        if not self.active:
            return logits
        self.check_batch(logits)
        if self._biggest >= logits.shape[-1]:
            raise ConfigError(f"logit_bias: token id {self._biggest} is outside the vocabulary (size {logits.shape[-1]})")
        ids, biases = self._ids.to(logits.device), self._biases.to(logits.device)  # [B, K]
        dense = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        dense.scatter_add_(-1, ids.clamp(min=0), torch.where(ids >= 0, biases, 0.0))  # padding adds 0
        out = to_dtype(logits.float() + dense, logits)
        return torch.where((ids >= 0).any(dim=-1, keepdim=True), out, logits)


class MinNewTokens(LogitsProcessor):
    """Hold EOS back until ``min_new_tokens`` tokens have been generated.

    While fewer have been generated, the EOS token(s) are set to ``-inf`` (unless EOS is the only
    token left in a row). The prompt lengths come from ``begin`` (negative padding ids not
    counted); used outside the loop, pass ``prompt_length``. transformers'
    ``MinNewTokensLengthLogitsProcessor`` semantics; 0 is off. Takes one value per row.
    """

    name = "min_new_tokens"
    idempotent = True
    test_params = [
        lambda v: {"min_new_tokens": 5, "eos_token_id": v - 1},
        {"min_new_tokens": 0, "eos_token_id": 0},
        lambda v: {"min_new_tokens": 100, "eos_token_id": [0, v - 1]},
    ]
    order = 70
    negative_padding = True
    row_fields = ("min_new_tokens", "_prompt_lengths")
    row_params = {"min_new_tokens": 0}

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        min_new_tokens: int = Field(ge=0, description="no EOS before this many new tokens")

    def __init__(self, min_new_tokens: Any, eos_token_id: int | list[int], prompt_length: int | None = None) -> None:
        self.init_setting("min_new_tokens", min_new_tokens, int)
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if not ids or any(i < 0 for i in ids):
            raise ConfigError(f"min_new_tokens: eos_token_id={eos_token_id!r} must name token ids >= 0")
        self.eos_token_id = ids
        self.prompt_length = prompt_length
        self._prompt_lengths: torch.Tensor | None = None
        self._eos = torch.tensor(ids, dtype=torch.long)
        self._eos_cache: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.active = self.any_row_on()

    @classmethod
    def from_params(cls, params: BaseModel, context: BuildContext) -> MinNewTokens:
        return cls(params.min_new_tokens, context.eos_ids("min_new_tokens"))

    @classmethod
    def from_row_params(cls, values: dict[str, list[Any]], shared: dict[str, Any], context: BuildContext) -> MinNewTokens:
        return cls(values["min_new_tokens"], context.eos_ids("min_new_tokens"))

    def any_row_on(self) -> bool:
        m = self.min_new_tokens
        return bool((m > 0).any()) if isinstance(m, torch.Tensor) else m > 0

    def begin(self, input_ids: torch.Tensor) -> None:
        self.prompt_length = input_ids.shape[-1]
        self._prompt_lengths = prompt_lengths(input_ids)

    def _eos_for(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """The EOS ids inside the vocabulary, on ``device``: filtered once, not per step (no sync)."""
        key = (vocab_size, device)
        if key not in self._eos_cache:
            self._eos_cache[key] = self._eos[self._eos < vocab_size].to(device)
        return self._eos_cache[key]

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return logits
        self.check_batch(logits)
        if self._prompt_lengths is None and self.prompt_length is not None:  # given, not begun
            generated = torch.full(input_ids.shape[:1], input_ids.shape[-1] - self.prompt_length)
        else:
            generated = generated_count(input_ids, self._prompt_lengths)  # [B]
        hold = generated.to(logits.device)[:, None] < self.value("min_new_tokens", logits)  # [B, 1]
        held = logits.index_fill(-1, self._eos_for(logits.shape[-1], logits.device), NEG_INF)
        return keep_nonempty(torch.where(hold, held, logits), logits, "min_new_tokens")
