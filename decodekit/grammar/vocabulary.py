"""Our tokenizers' vocabularies as the grammar backends need them: each id's bytes, special ids apart.

A vocabulary takes a while to build at 50,000 tokens and the engine builds a processor per
request, so each backend's vocabulary is built once per tokenizer (:func:`cached`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

_BUILT: OrderedDict[tuple[str, int, int, tuple[int, ...]], tuple[Any, Any]] = OrderedDict()


def cached(backend: str, tokenizer: Any, vocab_size: int, eos: list[int], build: Callable[[], Any]) -> Any:
    """``build()`` once per (backend, tokenizer, vocab_size, eos); the last few are kept."""
    key = (backend, id(tokenizer), vocab_size, tuple(eos))
    if key in _BUILT and _BUILT[key][0] is tokenizer:
        _BUILT.move_to_end(key)
        return _BUILT[key][1]
    built = build()
    _BUILT[key] = (tokenizer, built)  # the tokenizer is kept, so its id stays its own
    while len(_BUILT) > 4:
        _BUILT.popitem(last=False)
    return built


def kind_of(tokenizer: Any) -> str:
    """``"json"`` (a ``tokenizer.json``), ``"hf"`` (a fast Hugging Face tokenizer) or ``"bytes"``
    (every other: byte, char, a slow Hugging Face tokenizer), which :class:`ByteVocabulary` reads."""
    name = type(tokenizer).__name__
    if name == "JSONTokenizer":
        return "json"
    if name == "HFTokenizer" and getattr(getattr(tokenizer, "_tok", None), "is_fast", False):
        return "hf"
    return "bytes"


class ByteVocabulary:
    """Each id's bytes, for tokenizers without a ``tokenizer.json`` (byte, char, any other).

    ByteTokenizer: id ``i < 256`` is byte ``i``; CharTokenizer: the character's UTF-8 bytes;
    others: the decoded text of the id alone. Special ids (EOS, BOS, pad) and the ids beyond
    the tokenizer's vocabulary (a model's padding) are special tokens: never text; their
    ``tokens`` entry is a placeholder each backend replaces with its own marker.
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
