"""Structured output: force each row's new tokens into a JSON schema, a regex, a grammar or a choice.

vLLM's ``StructuredOutputsParams(json=, regex=, choice=, grammar=)`` and llama.cpp's
``--grammar`` / ``--json-schema``, on a grammar backend of :mod:`decodekit.grammar` (llguidance by
default, or xgrammar).
"""

from __future__ import annotations

import json
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from decodekit.errors import ConfigError
from decodekit.grammar import BACKENDS, DEFAULT_BACKEND, KINDS, backend, read_spec
from decodekit.processors.base import NEG_INF, BuildContext, LogitsProcessor
from decodekit.processors.rows import prompt_lengths

Spec = tuple[str, Any, str]  # (kind, value read by read_spec, backend name)


class Structured(LogitsProcessor):
    """Allow only the tokens that keep each row's output a prefix of its grammar's language.

    Exactly one of ``json_schema`` (a schema: a dict, JSON text or ``@file.json``), ``regex``
    (the whole output must match), ``grammar`` (Lark, or GBNF when it holds ``::=``; text or
    ``@file``) and ``choice`` (a list of strings: the output is one of them). EOS is allowed
    exactly when the grammar may end, and is then the only token once it must end. Each row has
    its own matcher: it takes the row's last token at each call (negative ids are padding), and
    its mask is filled on the host (in parallel over rows) and applied to the whole batch with
    one tensor op; the host reads each row's token count and last token per step. A row whose
    allowed tokens were all removed before this processor gets them back at logit 0 (its
    distribution stays valid and within the grammar). Takes one spec per row (``None``: that row is free); ``reorder`` and
    ``assign`` copy matcher state. A grammar no token can start is a :class:`ConfigError`.
    ``structured_backend`` picks the grammar backend (``llguidance``, the default, or
    ``xgrammar``), per row too: each row's mask is filled by its own.
    :meth:`complete` says whether a row's tokens form a whole sentence of its grammar
    (``finish_reason="incomplete"`` when not).
    """

    name = "structured"
    order = 45  # after the penalties (they remove nothing), before bans and truncation
    negative_padding = True
    row_fields = ("_prompt_lengths",)
    row_params = {"json_schema": None, "regex": None, "grammar": None, "choice": None, "structured_backend": None}
    # per-row specs need a tokenizer the conformance kit does not have: checked there instead
    row_checks_elsewhere = "tests/test_structured_settings.py::test_per_row_specs_in_a_batch_and_per_request_in_the_engine"
    test_params = [  # grammars that accept the empty output: every vocabulary size can end at once
        lambda v: {"regex": "[ab]*c?", "tokenizer": _letters(v)},
        lambda v: {"grammar": 'start: ("a" | "bc" | "{")*', "tokenizer": _letters(v)},
    ]

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        json_schema: dict[str, Any] | bool | str | None = Field(default=None, description="a JSON schema (inline or @file.json)")
        regex: str | None = Field(default=None, description="a regular expression the whole output matches")
        grammar: str | None = Field(default=None, description="a Lark or GBNF grammar (inline or @file)")
        choice: list[str] | None = Field(default=None, description="the output is exactly one of these strings")
        structured_backend: Literal["llguidance", "xgrammar"] | None = Field(
            default=None, description="the grammar backend: llguidance (default), or xgrammar (its own extra)"
        )

    def __init__(
        self,
        json_schema: Any = None,
        regex: Any = None,
        grammar: Any = None,
        choice: Any = None,
        structured_backend: Any = None,
        *,
        tokenizer: Any,
        eos_token_id: int | list[int] | None = None,
        vocab_size: int | None = None,
    ) -> None:
        values = {"json_schema": json_schema, "regex": regex, "grammar": grammar, "choice": choice,
                  "structured_backend": structured_backend}  # fmt: skip
        per_row = [k for k, v in values.items() if _is_rows(k, v)]
        if per_row:
            n = {len(values[k]) for k in per_row}
            if len(n) > 1:
                raise ConfigError(f"{self.name}: {', '.join(per_row)} give different numbers of per-row values")
            self.rows = n.pop()
            rows = [{k: (values[k][i] if k in per_row else values[k]) for k in values} for i in range(self.rows)]
            self._specs: list[Spec | None] | None = [_spec(r, f"row {i}: ") for i, r in enumerate(rows)]
            self._spec: Spec | None = None
        else:
            self._specs, self._spec = None, _spec(values)
            if self._spec is None:
                given = "" if structured_backend is None else f" (structured_backend={structured_backend} alone is not enough)"
                raise ConfigError(f"{self.name}: set one of json_schema, regex, grammar, choice{given}")
        eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        if eos is None:
            raise ConfigError("structured output needs an end-of-sequence token, and none is known (set eos_token_id)")
        self.eos_token_id = [eos] if isinstance(eos, int) else list(eos)
        self.vocab_size = int(vocab_size if vocab_size is not None else tokenizer.vocab_size)
        self._backends: dict[str, Any] = {}  # name -> (backend, vocabulary), for the backends rows use
        for spec in self._specs if self._specs is not None else [self._spec]:
            if spec is not None and spec[2] not in self._backends:
                b = backend(spec[2])
                self._backends[spec[2]] = (b, b.vocabulary(tokenizer, self.vocab_size, self.eos_token_id))
        self._fresh: dict[str, Any] = {}
        for i, spec in enumerate(self._specs if self._specs is not None else [self._spec]):
            if spec is not None:
                self._compiled(spec, f"row {i}: " if self._specs is not None else "")
        self._matchers: list[Any] | None = None
        self._consumed: list[int] = []
        self._prompt_lengths: torch.Tensor | None = None
        self._masks: torch.Tensor | None = None
        self._eos_masks: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.active = self.any_row_on()

    @classmethod
    def from_params(cls, params: BaseModel, context: BuildContext) -> Structured:
        return cls(**params.model_dump(), **_from_context(context))

    @classmethod
    def from_row_params(cls, values: dict[str, list[Any]], shared: dict[str, Any], context: BuildContext) -> Structured:
        return cls(**values, **shared, **_from_context(context))

    # ------------------------------------------------------------------ grammars

    def _compiled(self, spec: Spec, where: str = "") -> Any:
        """The pristine matcher of ``spec`` (compiled once), checked to have a first token."""
        key = json.dumps(spec, sort_keys=True)
        if key not in self._fresh:
            kind, value, name = spec
            b, vocabulary = self._backends[name]
            try:
                matcher = b.matcher(vocabulary, kind, value)
            except ConfigError as e:
                raise ConfigError(f"{where}{e}") from None
            masks = torch.zeros((1, (self.vocab_size + 31) // 32), dtype=torch.int32)
            b.fill_masks([(matcher, 0)], masks)
            allowed = _unpack(masks, self.vocab_size)[0]
            allowed[self.eos_token_id] = False
            if not bool(allowed.any()) and not matcher.is_accepting():
                raise ConfigError(f"{where}{spec[0]}: no token of the vocabulary can start it, so no output can match")
            self._fresh[key] = matcher
        return self._fresh[key]

    def spec_of(self, row: int) -> Spec | None:
        return self._spec if self._specs is None else self._specs[row]

    def any_row_on(self) -> bool:
        return self._specs is None or any(s is not None for s in self._specs)

    def complete(self, row: int, tokens: list[int]) -> bool | None:
        """Whether ``tokens`` (a row's new tokens, up to EOS) are a whole sentence of the row's
        grammar; ``None`` for a free row. Once per finished row, on a copy of a fresh matcher."""
        spec = self.spec_of(row)
        if spec is None:
            return None
        matcher = self._compiled(spec).deep_copy()
        for t in tokens:
            if t in self.eos_token_id:
                break
            if not matcher.consume_token(int(t)):
                return False
        return bool(matcher.is_accepting())

    # ------------------------------------------------------------------ steps

    def begin(self, input_ids: torch.Tensor) -> None:
        rows = input_ids.shape[0]
        if self._specs is not None and len(self._specs) != rows:
            self.check_batch(input_ids)
        self._prompt_lengths = prompt_lengths(input_ids).cpu()
        self._matchers = [None if (s := self.spec_of(b)) is None else self._compiled(s).deep_copy() for b in range(rows)]
        self._consumed = [0] * rows

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return logits
        self.check_batch(logits)
        batch, vocab = logits.shape
        if vocab != self.vocab_size:
            raise ConfigError(f"{self.name}: built for a vocabulary of {self.vocab_size}, called with {vocab} logits")
        if self._matchers is None or len(self._matchers) != batch:
            self.begin(input_ids)  # used outside the loop: the ids so far are the prompt
        self._advance(input_ids)
        if self._masks is None or self._masks.shape[0] != batch:
            self._masks = torch.empty((batch, (vocab + 31) // 32), dtype=torch.int32)
        self._masks.fill_(-1)  # free rows: every token
        assert self._matchers is not None
        for name, pairs in self._by_backend([(m, b) for b, m in enumerate(self._matchers) if m is not None]):
            self._backends[name][0].fill_masks(pairs, self._masks)
        allowed = _unpack(self._masks.to(logits.device, non_blocking=True), vocab)  # [B, V]
        dead = ~allowed.any(dim=-1, keepdim=True)  # a grammar with no way on: only EOS (no sync)
        allowed = allowed | (dead & self._eos_mask(vocab, logits.device))
        out = logits.masked_fill(~allowed, NEG_INF)
        empty = out.amax(dim=-1, keepdim=True) == NEG_INF  # allowed tokens all removed before
        fallback = torch.zeros((), dtype=logits.dtype, device=logits.device).masked_fill(~allowed, NEG_INF)
        return torch.where(empty, fallback, out)

    def _eos_mask(self, vocab: int, device: torch.device) -> torch.Tensor:
        key = (vocab, device)
        if key not in self._eos_masks:
            mask = torch.zeros(vocab, dtype=torch.bool)
            mask[[e for e in self.eos_token_id if e < vocab]] = True
            self._eos_masks[key] = mask.to(device)
        return self._eos_masks[key]

    def _advance(self, input_ids: torch.Tensor) -> None:
        """Each matcher takes its row's tokens generated since the last call (usually one).

        The host gets each row's token count and the last few columns only, not the history."""
        assert self._matchers is not None and self._prompt_lengths is not None
        generated = ((input_ids >= 0).sum(dim=-1).cpu() - self._prompt_lengths).tolist()
        width = max((g - c for g, c in zip(generated, self._consumed)), default=0)
        if width <= 0:
            return
        tail = input_ids[:, max(input_ids.shape[1] - width, 0) :].cpu().tolist()
        pairs, rows = [], []
        for b, matcher in enumerate(self._matchers):  # matchers are per row by nature (like text)
            new = generated[b] - self._consumed[b]
            if matcher is None or new <= 0:
                continue
            self._consumed[b] = generated[b]
            if matcher.is_stopped() or matcher.is_error():
                continue  # after EOS only padding follows; a dead matcher allows only EOS
            tokens = [t for t in tail[b][len(tail[b]) - new :] if t >= 0]
            if len(tokens) == 1:
                pairs.append((matcher, tokens[0]))
                rows.append(b)
            elif tokens:
                matcher.consume_tokens(tokens)
        for name, group in self._by_backend(pairs, rows):
            self._backends[name][0].consume(group)

    def _by_backend(self, pairs: list[tuple[Any, int]], rows: list[int] | None = None) -> list[tuple[str, list[tuple[Any, int]]]]:
        """``pairs`` grouped by their row's backend (the row is ``pairs[i][1]``, or ``rows[i]``)."""
        if self._specs is None:
            return [(self._spec[2], pairs)] if pairs and self._spec is not None else []
        groups: dict[str, list[tuple[Any, int]]] = {}
        for i, pair in enumerate(pairs):
            spec = self._specs[pair[1] if rows is None else rows[i]]
            assert spec is not None
            groups.setdefault(spec[2], []).append(pair)
        return list(groups.items())

    def reorder(self, index: torch.Tensor) -> None:
        """Rows taken as ``[index]``: each row's matcher is copied (a row may be taken twice)."""
        idx = index.tolist()
        if self._specs is not None:
            self._specs = [self._specs[i] for i in idx]
        if self._matchers is not None:
            self._matchers = [None if self._matchers[i] is None else self._matchers[i].deep_copy() for i in idx]
            self._consumed = [self._consumed[i] for i in idx]
        super().reorder(index)

    def assign(self, rows: torch.Tensor, other: LogitsProcessor) -> None:
        """Rows ``rows`` take ``other``'s specs and matcher state (``other`` begun for them)."""
        if not isinstance(other, Structured):
            raise ConfigError(f"{self.name}: assign needs a Structured, got {type(other).__name__}")
        if self.rows is None:
            raise ConfigError(f"{self.name}: assign needs a processor built with per-row values")
        if other._matchers is None:
            raise ConfigError(f"{self.name}: assign: the new rows have no matchers (call begin first)")
        if self._specs is None:
            self._specs = [self._spec] * self.rows
        if self._matchers is None:
            self.begin(torch.full((self.rows, 1), -1, dtype=torch.long))
        assert self._matchers is not None and self._prompt_lengths is not None and other._prompt_lengths is not None
        self._fresh.update(other._fresh)
        self._backends.update(other._backends)
        lengths = self._prompt_lengths.clone()
        for j, r in enumerate(rows.tolist()):  # at admission, not per step
            self._specs[r] = other.spec_of(j)
            self._matchers[r] = None if other._matchers[j] is None else other._matchers[j].deep_copy()
            self._consumed[r] = other._consumed[j]
            lengths[r] = other._prompt_lengths[j]
        self._prompt_lengths = lengths
        self.active = self.any_row_on()

    def __deepcopy__(self, memo: dict) -> Structured:
        """Backend, vocabulary and compiled grammars are shared; matchers are copied."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._fresh = dict(self._fresh)
        new._backends = dict(self._backends)
        new._specs = None if self._specs is None else list(self._specs)
        new._matchers = None if self._matchers is None else [None if m is None else m.deep_copy() for m in self._matchers]
        new._consumed = list(self._consumed)
        new._masks = None
        return new

    def __repr__(self) -> str:
        specs = self._specs if self._specs is not None else self._spec
        return f"Structured({specs!r})"


def _is_rows(kind: str, value: Any) -> bool:
    if kind == "choice":
        return isinstance(value, (list, tuple)) and bool(value) and all(v is None or isinstance(v, (list, tuple)) for v in value)
    return isinstance(value, (list, tuple))


def _spec(values: dict[str, Any], where: str = "") -> Spec | None:
    given = [k for k in KINDS if values.get(k) is not None]
    if len(given) > 1:
        raise ConfigError(f"{where}set only one of json_schema, regex, grammar, choice (got {', '.join(given)})")
    if not given:
        return None
    name = DEFAULT_BACKEND if values.get("structured_backend") is None else values["structured_backend"]
    if name not in BACKENDS:
        raise ConfigError(f"{where}structured_backend={name!r} is not allowed: one of {', '.join(BACKENDS)}")
    try:
        return given[0], read_spec(given[0], values[given[0]]), name
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None


def _from_context(context: BuildContext) -> dict[str, Any]:
    tokenizer = getattr(context, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError("structured output (json_schema, regex, grammar, choice) needs a tokenizer, and none is loaded")
    return {"tokenizer": tokenizer, "eos_token_id": context.eos_token_id, "vocab_size": context.vocab_size}


def _letters(vocab_size: int) -> Any:
    """A character tokenizer of ``vocab_size`` ids, the last one EOS (for the property suite)."""
    from decodekit.tokenization import CharTokenizer

    chars = "abc{}" + "".join(chr(0x100 + i) for i in range(max(vocab_size - 5, 0)))
    return CharTokenizer(list(chars[: vocab_size]), eos_token_id=vocab_size - 1)


def _unpack(masks: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[B, W]`` int32 bit masks (bit ``i % 32`` of word ``i // 32``) to ``[B, vocab]`` bool."""
    shifts = torch.arange(32, dtype=torch.int32, device=masks.device)
    bits = (masks[:, :, None] >> shifts) & 1  # [B, W, 32]
    return bits.reshape(masks.shape[0], -1)[:, :vocab].bool()
