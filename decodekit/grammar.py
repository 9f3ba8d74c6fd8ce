"""The grammar backend of structured output: specs to grammars, our tokenizers to its vocabulary.

Structured output (:class:`decodekit.processors.structured.Structured`) forces a row's new tokens
into a JSON schema, a regular expression, a grammar (Lark or GBNF) or one of a list of strings.
The work per token is done by a backend behind the small interface of :class:`GrammarBackend`:
``vocabulary(tokenizer, vocab_size, eos)`` once per tokenizer, ``compile(spec)`` once per spec,
and matchers with ``consume_token``, ``is_accepting``, ``is_stopped``, ``is_error`` and
``deep_copy`` whose masks are filled by ``fill_masks``. The default (and only) backend is
llguidance (``pip install "decodekit[grammar]"``); without it, asking for a grammar is one line
saying what to install.

A spec is ``(kind, value)`` with ``kind`` one of ``json_schema``, ``regex``, ``grammar``,
``choice``. ``@path`` reads a schema or a grammar from a file.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from decodekit.errors import ConfigError

KINDS = ("json_schema", "regex", "grammar", "choice")
# JSON is written on one line, ", " and ": " between items (a schema's "x-guidance" may differ):
# free whitespace lets a weak model pad with spaces until max_new_tokens
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
INSTALL = 'structured output needs llguidance: pip install "decodekit[grammar]" (or pip install llguidance)'


def read_spec(kind: str, value: Any) -> Any:
    """The spec's value with ``@file`` read (and a JSON schema parsed), checked; one-line errors."""
    if kind == "choice":
        if isinstance(value, str) or not isinstance(value, Sequence) or not value:
            raise ConfigError(f"choice={value!r} is not allowed: give a non-empty list of strings")
        if any(not isinstance(c, str) or not c for c in value):
            raise ConfigError(f"choice={list(value)!r} is not allowed: every choice must be a non-empty string")
        return list(value)
    if kind == "json_schema" and isinstance(value, dict):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{kind}={value!r} is not allowed: give the {kind} as text or as @file")
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            value = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{kind}={value}: cannot read {path} ({type(e).__name__}: {e})") from None
    if kind == "json_schema":
        try:
            schema = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"json_schema: not valid JSON ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise ConfigError(f"json_schema: a schema is a JSON object, got {type(schema).__name__}")
        return schema
    return value


_VOCABULARIES: OrderedDict[tuple[int, int, tuple[int, ...]], tuple[Any, Any]] = OrderedDict()


class GrammarBackend:
    """llguidance: grammars compiled against one vocabulary, masks filled for a batch of matchers."""

    def __init__(self) -> None:
        try:
            import llguidance  # not llguidance.torch: it compiles a kernel we do not use at import
        except ImportError:
            raise ConfigError(INSTALL) from None
        self.ll = llguidance
        self._executor = llguidance.LLExecutor()

    def vocabulary(self, tokenizer: Any, vocab_size: int, eos: list[int]) -> Any:
        """The backend's tokenizer for ``tokenizer``'s ids, ``vocab_size`` of them, EOS ``eos``.

        Built once per tokenizer (the last few are kept): the engine builds a processor per
        request, and a 50,000-token vocabulary takes a while."""
        key = (id(tokenizer), vocab_size, tuple(eos))
        if key in _VOCABULARIES and _VOCABULARIES[key][0] is tokenizer:
            _VOCABULARIES.move_to_end(key)
            return _VOCABULARIES[key][1]
        built = self._vocabulary(tokenizer, vocab_size, eos)
        _VOCABULARIES[key] = (tokenizer, built)  # the tokenizer is kept, so its id stays its own
        while len(_VOCABULARIES) > 4:
            _VOCABULARIES.popitem(last=False)
        return built

    def _vocabulary(self, tokenizer: Any, vocab_size: int, eos: list[int]) -> Any:
        ll = self.ll
        inner = getattr(tokenizer, "_tok", None)
        if type(tokenizer).__name__ == "JSONTokenizer":
            try:
                return ll.LLTokenizer(inner.to_str(), n_vocab=vocab_size, eos_token=eos)
            except ValueError:  # a tokenizer.json llguidance cannot read (no decoder ...): token by token
                pass
        if type(tokenizer).__name__ == "HFTokenizer" and getattr(inner, "is_fast", False):
            from llguidance.hf import from_tokenizer

            return from_tokenizer(inner, n_vocab=vocab_size, eos_token=eos)
        return ll.LLTokenizer(ll.TokenizerWrapper(_ByteVocabulary(tokenizer, vocab_size, eos)), n_vocab=vocab_size)

    def grammar(self, kind: str, value: Any) -> str:
        """The backend's grammar text for a spec read by :func:`read_spec`."""
        M = self.ll.LLMatcher
        if kind == "json_schema":
            try:
                return M.grammar_from_json_schema(value if isinstance(value, dict) else json.dumps(value), defaults=JSON_LAYOUT)
            except ValueError as e:
                raise ConfigError(f"json_schema: {_first_line(str(e))}") from None
        if kind == "regex":
            return M.grammar_from_regex(value)
        if kind == "choice":
            return M.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))
        if "::=" in value:  # GBNF (llama.cpp)
            from llguidance.gbnf_to_lark import gbnf_to_lark

            try:
                value = gbnf_to_lark(value)
            except Exception as e:  # the converter raises its own error types
                raise ConfigError(f"grammar: not valid GBNF ({_first_line(str(e))})") from None
        return M.grammar_from_lark(value)

    def matcher(self, vocabulary: Any, kind: str, value: Any) -> Any:
        """A fresh matcher; a grammar the backend refuses is a :class:`ConfigError` naming ``kind``."""
        matcher = self.ll.LLMatcher(vocabulary, self.grammar(kind, value), log_level=0)
        if matcher.is_error():
            raise ConfigError(f"{kind}: {_first_line(matcher.get_error())}")
        return matcher

    def fill_masks(self, matchers: list[tuple[Any, int]], masks: torch.Tensor) -> None:
        """Each ``(matcher, row)``'s allowed tokens into ``masks[row]`` (int32 bits; in parallel)."""
        if matchers:
            assert masks.dtype == torch.int32 and masks.is_cpu and masks.is_contiguous()
            self._executor.unsafe_compute_mask_ptr(matchers, masks.data_ptr(), masks.shape[1] * 4, masks.shape[0])

    def consume(self, pairs: list[tuple[Any, int]]) -> None:
        """Each matcher takes its token (in parallel); a refused token leaves it in its error state."""
        if pairs:
            self._executor.consume_token_par(pairs)


class _ByteVocabulary:
    """Each id's bytes, for tokenizers without a ``tokenizer.json`` (byte, char, any other).

    ByteTokenizer: id ``i < 256`` is byte ``i``; CharTokenizer: the character's UTF-8 bytes;
    others: the decoded text of the id alone. Special ids (EOS, BOS, pad) and the ids beyond
    the tokenizer's vocabulary (a model's padding) are special tokens: never text.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos: list[int]) -> None:
        special = set(eos) | {getattr(tokenizer, n, None) for n in ("eos_token_id", "bos_token_id", "pad_token_id")}
        special.discard(None)
        own = min(int(tokenizer.vocab_size), vocab_size)
        tokens = []
        for i in range(vocab_size):  # once per tokenizer, not per step
            if i in special or i >= own:
                tokens.append(f"<|special_{i}|>".encode())
                special.add(i)
            else:
                tokens.append(_token_bytes(tokenizer, i))
        self.tokens = tokens
        self.special_token_ids = sorted(special)
        self.eos_token_id = eos[0] if eos else vocab_size - 1
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        """Token ids of ``text`` without the BOS that ``encode`` may put first."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        ids = list(self._tokenizer.encode(text))
        return ids[1:] if ids and self.bos_token_id is not None and ids[0] == self.bos_token_id else ids


def _token_bytes(tokenizer: Any, i: int) -> bytes:
    if type(tokenizer).__name__ == "ByteTokenizer":
        return bytes([i])
    itos = getattr(tokenizer, "itos", None)
    if itos is not None:
        return itos[i].encode()
    return tokenizer.decode([i]).encode()


def _first_line(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " ".join(lines[:3])[:300] if lines else "refused by the grammar backend"
