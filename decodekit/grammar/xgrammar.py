"""The xgrammar backend: ``pip install "decodekit[xgrammar]"`` (it pulls in transformers and triton).

Its vocabulary is a ``GrammarCompiler`` over a ``TokenizerInfo`` (which caches compiled grammars);
a ``GrammarMatcher`` is wrapped in :class:`XGrammarMatcher` to speak our matcher interface.
Special tokens are empty byte strings in a raw vocabulary (xgrammar's mark for them), and ids past
the vocabulary the model's padding, so neither is ever text.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from decodekit.errors import ConfigError
from decodekit.grammar import choice_lark, first_line, is_gbnf
from decodekit.grammar.vocabulary import ByteVocabulary, cached, kind_of

INSTALL = 'structured_backend=xgrammar needs xgrammar: pip install "decodekit[xgrammar]" (or pip install xgrammar)'
SEPARATORS = (", ", ": ")  # JSON on one line, as the llguidance backend writes it


class XGrammarMatcher:
    """A ``GrammarMatcher`` with our matcher interface. xgrammar leaves a matcher as it was when it
    refuses a token; we remember the refusal (``is_error``) as llguidance does."""

    __slots__ = ("inner", "error")

    def __init__(self, inner: Any, error: bool = False) -> None:
        self.inner, self.error = inner, error

    def consume_token(self, token: int) -> bool:
        if not self.error and not self.inner.accept_token(token):
            self.error = True
        return not self.error

    def consume_tokens(self, tokens: list[int]) -> bool:
        return all(self.consume_token(t) for t in tokens)

    def is_accepting(self) -> bool:
        return not self.error and bool(self.inner.is_completed())

    def is_stopped(self) -> bool:
        return bool(self.inner.is_terminated())

    def is_error(self) -> bool:
        return self.error

    def deep_copy(self) -> XGrammarMatcher:
        return XGrammarMatcher(self.inner.fork(), self.error)


class XGrammarBackend:
    """xgrammar: grammars compiled against one vocabulary, masks filled for a batch of matchers."""

    name = "xgrammar"

    def __init__(self) -> None:
        try:
            import xgrammar
        except ImportError:
            raise ConfigError(INSTALL) from None
        self.xgr = xgrammar
        self._batch = xgrammar.BatchGrammarMatcher()

    def vocabulary(self, tokenizer: Any, vocab_size: int, eos: list[int]) -> Any:
        """A grammar compiler for ``tokenizer``'s ids, ``vocab_size`` of them, EOS ``eos``."""
        return cached(self.name, tokenizer, vocab_size, eos, lambda: self.xgr.GrammarCompiler(self._info(tokenizer, vocab_size, eos)))

    def _info(self, tokenizer: Any, vocab_size: int, eos: list[int]) -> Any:
        xgr, kind = self.xgr, kind_of(tokenizer)
        if kind in ("json", "hf"):
            hf = tokenizer._tok
            if kind == "json":
                from transformers import PreTrainedTokenizerFast  # xgrammar depends on transformers

                hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer._tok)
            try:
                return xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=eos)
            except (ValueError, RuntimeError):  # a tokenizer xgrammar cannot read: token by token
                pass
        vocabulary = ByteVocabulary(tokenizer, vocab_size, eos)
        special = set(vocabulary.special_token_ids) - set(eos)
        tokens = [b"" if i in special else t for i, t in enumerate(vocabulary.tokens)]
        return xgr.TokenizerInfo(tokens, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=eos)

    def matcher(self, vocabulary: Any, kind: str, value: Any) -> XGrammarMatcher:
        """A fresh matcher; a grammar the backend refuses is a :class:`ConfigError` naming ``kind``."""
        if kind == "json_schema":
            _check_schema(value)
        try:
            if kind == "json_schema":
                schema = json.dumps(value)
                compiled = vocabulary.compile_json_schema(schema, any_whitespace=False, separators=SEPARATORS)
            elif kind == "regex":
                compiled = vocabulary.compile_regex(value)
            elif kind == "choice":
                compiled = vocabulary.compile_lark(choice_lark(value))
            elif is_gbnf(value):
                compiled = vocabulary.compile_grammar(value, root_rule_name="root")
            else:
                compiled = vocabulary.compile_lark(value)
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"{kind}: {first_line(str(e))}") from None
        return XGrammarMatcher(self.xgr.GrammarMatcher(compiled))

    def fill_masks(self, matchers: list[tuple[XGrammarMatcher, int]], masks: torch.Tensor) -> None:
        """Each ``(matcher, row)``'s allowed tokens into ``masks[row]`` (int32 bits; in parallel).

        A matcher past EOS or past a refused token gets an empty row (the processor then allows
        EOS alone, as with llguidance)."""
        live = [(m.inner, row) for m, row in matchers if not m.error and not m.inner.is_terminated()]
        if len(live) < len(matchers):
            done = [row for m, row in matchers if m.error or m.inner.is_terminated()]
            masks[done] = 0
        if live:
            assert masks.dtype == torch.int32 and masks.is_cpu
            self._batch.batch_fill_next_token_bitmask([m for m, _ in live], masks, [row for _, row in live])

    def consume(self, pairs: list[tuple[XGrammarMatcher, int]]) -> None:
        """Each matcher takes its token (in parallel); a refused token marks it in error."""
        if pairs:
            accepted = self.xgr.BatchGrammarMatcher.batch_accept_token([m.inner for m, _ in pairs], [t for _, t in pairs])
            for (m, _), ok in zip(pairs, accepted):
                m.error = m.error or not ok


def _check_schema(schema: Any) -> None:
    """Refuse what xgrammar would ignore with a warning only, so that no output breaks its schema."""
    if isinstance(schema, dict):
        if "pattern" in schema and ("minLength" in schema or "maxLength" in schema):
            raise ConfigError(
                "json_schema: xgrammar ignores minLength/maxLength next to a pattern; put the length "
                "in the pattern, or use structured_backend=llguidance"
            )
        for v in schema.values():
            _check_schema(v)
    elif isinstance(schema, list):
        for v in schema:
            _check_schema(v)
