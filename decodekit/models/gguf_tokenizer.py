"""The tokenizer stored in a GGUF file's metadata, rebuilt with the ``tokenizers`` library.

Two vocabularies are read: ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE: tokens and merges;
pre-tokenizer ``default`` / ``gpt-2``, or ``llama-bpe`` for Llama 3) and ``"llama"``
(SentencePiece: tokens and scores, byte fallback; merges ranked by the merged piece's score, as
transformers converts these files). Control tokens are special (never split, skipped when
decoding); the BOS token is put first when ``tokenizer.ggml.add_bos_token`` says so.
Not supported, refused in one line: other vocabularies (``bert``, ``t5``, ``rwkv``, ...) and
other BPE pre-tokenizers (``qwen2``, ``deepseek-llm``, ...): pass ``tokenizer=`` a tokenizer.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from decodekit.errors import ConfigError
from decodekit.models.gguf import GGUFFile
from decodekit.tokenization import JSONTokenizer

__all__ = ["GGUFTokenizer", "gguf_tokenizer"]

CONTROL = 3  # llama.cpp's token type of special tokens (<s>, </s>, <|endoftext|> ...)
GPT2_PRE = ("default", "gpt-2", "gpt2")
# Llama 3's pre-tokenizer split (llama.cpp's "llama-bpe"), as transformers writes it
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class GGUFTokenizer(JSONTokenizer):
    """A :class:`~decodekit.tokenization.JSONTokenizer` that puts BOS first when the file asks for it."""

    def __init__(self, rust: Any, *, eos_token: str | None, bos_token: str | None, add_bos: bool) -> None:
        super().__init__(rust, eos_token=eos_token, bos_token=bos_token)
        self.add_bos = add_bos and self.bos_token_id is not None

    def encode(self, text: str) -> list[int]:
        ids = super().encode(text)
        return [self.bos_token_id, *ids] if self.add_bos else ids

    def __repr__(self) -> str:
        return f"GGUFTokenizer(vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id}, add_bos={self.add_bos})"


def gguf_tokenizer(path: str | Path) -> GGUFTokenizer:
    """The tokenizer in ``path``'s metadata (see the module doc for what is read)."""
    file = GGUFFile(path)
    kind = file.value("tokenizer.ggml.model", None)
    tokens: list[str] = file.value("tokenizer.ggml.tokens")
    types: list[int] = file.value("tokenizer.ggml.token_type", [1] * len(tokens))
    if kind == "gpt2":
        rust = _byte_level_bpe(tokens, file.value("tokenizer.ggml.merges", []), file.value("tokenizer.ggml.pre", "default"), path)
    elif kind == "llama":
        unk = file.value("tokenizer.ggml.unknown_token_id", 0)
        rust = _sentencepiece(tokens, file.value("tokenizer.ggml.scores"), tokens[unk], file.value("tokenizer.ggml.add_space_prefix", True))
    else:
        raise ConfigError(
            f"{path}: tokenizer.ggml.model={kind!r} is not supported: decodekit reads 'gpt2' (byte-level BPE) "
            "and 'llama' (SentencePiece); pass tokenizer= a tokenizer.json instead"
        )
    from tokenizers import AddedToken

    rust.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, kind_ in zip(tokens, types) if kind_ == CONTROL])

    def token(key: str) -> str | None:
        i = file.value(f"tokenizer.ggml.{key}_token_id", None)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    add_bos = bool(file.value("tokenizer.ggml.add_bos_token", kind == "llama"))
    return GGUFTokenizer(rust, eos_token=token("eos"), bos_token=token("bos"), add_bos=add_bos)


def _byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], pre: str, path: str | Path) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    if pre in GPT2_PRE:
        rust = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
        rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif pre == "llama-bpe":
        rust = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=True))
        rust.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )  # fmt: skip
    else:
        raise ConfigError(
            f"{path}: tokenizer.ggml.pre={pre!r} is not supported: decodekit reads the BPE pre-tokenizers "
            f"{', '.join(GPT2_PRE)} and llama-bpe; pass tokenizer= a tokenizer.json instead"
        )
    rust.decoder = decoders.ByteLevel()
    return rust


def _sentencepiece(tokens: Sequence[str], scores: Sequence[float], unk: str, space_prefix: bool) -> Any:
    """SentencePiece BPE as a ``tokenizers`` BPE: merges (a, b) ranked by the score of a + b."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for piece, i in vocab.items():  # every split of a piece into two pieces of the vocabulary
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in vocab and b in vocab:
                ranked.append((-scores[i], vocab[a], vocab[b], a, b))
    merges = [(a, b) for *_, a, b in sorted(ranked)]
    rust = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Prepend("▁")] if space_prefix else []
    rust.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if space_prefix else []
    rust.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    return rust
