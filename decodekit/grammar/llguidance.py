"""The llguidance backend (the default): ``pip install "decodekit[grammar]"``.

One abi3 wheel, no dependencies. Its ``LLMatcher`` is our matcher as it is; masks are filled and
tokens consumed for a batch of matchers in parallel by one ``LLExecutor``.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from decodekit.errors import ConfigError
from decodekit.grammar import choice_lark, first_line, is_gbnf
from decodekit.grammar.vocabulary import ByteVocabulary, cached, kind_of

INSTALL = 'structured output needs llguidance: pip install "decodekit[grammar]" (or pip install llguidance)'
# JSON is written on one line, ", " and ": " between items (a schema's "x-guidance" may differ):
# free whitespace lets a weak model pad with spaces until max_new_tokens
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class LLGuidanceBackend:
    """llguidance: grammars compiled against one vocabulary, masks filled for a batch of matchers."""

    name = "llguidance"

    def __init__(self) -> None:
        try:
            import llguidance  # not llguidance.torch: it compiles a kernel we do not use at import
        except ImportError:
            raise ConfigError(INSTALL) from None
        self.ll = llguidance
        self._executor = llguidance.LLExecutor()

    def vocabulary(self, tokenizer: Any, vocab_size: int, eos: list[int]) -> Any:
        """The backend's tokenizer for ``tokenizer``'s ids, ``vocab_size`` of them, EOS ``eos``."""
        return cached(self.name, tokenizer, vocab_size, eos, lambda: self._vocabulary(tokenizer, vocab_size, eos))

    def _vocabulary(self, tokenizer: Any, vocab_size: int, eos: list[int]) -> Any:
        ll = self.ll
        kind = kind_of(tokenizer)
        if kind == "json":
            try:
                return ll.LLTokenizer(tokenizer._tok.to_str(), n_vocab=vocab_size, eos_token=eos)
            except ValueError:  # a tokenizer.json llguidance cannot read (no decoder ...): token by token
                pass
        if kind == "hf":
            from llguidance.hf import from_tokenizer

            return from_tokenizer(tokenizer._tok, n_vocab=vocab_size, eos_token=eos)
        return ll.LLTokenizer(ll.TokenizerWrapper(ByteVocabulary(tokenizer, vocab_size, eos)), n_vocab=vocab_size)

    def grammar(self, kind: str, value: Any) -> str:
        """The backend's grammar text for a spec read by :func:`decodekit.grammar.read_spec`."""
        M = self.ll.LLMatcher
        if kind == "json_schema":
            try:
                return M.grammar_from_json_schema(value if isinstance(value, dict) else json.dumps(value), defaults=JSON_LAYOUT)
            except ValueError as e:
                raise ConfigError(f"json_schema: {first_line(str(e))}") from None
        if kind == "regex":
            return M.grammar_from_regex(value)
        if kind == "choice":
            return M.grammar_from_lark(choice_lark(value))
        if is_gbnf(value):
            from llguidance.gbnf_to_lark import gbnf_to_lark

            try:
                value = gbnf_to_lark(value)
            except Exception as e:  # the converter raises its own error types
                raise ConfigError(f"grammar: not valid GBNF ({first_line(str(e))})") from None
        return M.grammar_from_lark(value)

    def matcher(self, vocabulary: Any, kind: str, value: Any) -> Any:
        """A fresh matcher; a grammar the backend refuses is a :class:`ConfigError` naming ``kind``."""
        matcher = self.ll.LLMatcher(vocabulary, self.grammar(kind, value), log_level=0)
        if matcher.is_error():
            raise ConfigError(f"{kind}: {first_line(matcher.get_error())}")
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
