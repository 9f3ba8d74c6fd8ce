"""Tokenizers from GGUF metadata: SentencePiece (Llama) with byte fallback, BPE, the unsupported ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from decodekit import ConfigError
from decodekit.models.gguf_tokenizer import gguf_tokenizer

gguf = pytest.importorskip("gguf")

PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "ll", "▁he", "llo", "▁hello", "▁w", "or", "▁wor", "ld", "▁world"]


def write_vocab(path: Path, model: str, tokens: list[str], **keys: object) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    for key, value in keys.items():
        getattr(writer, f"add_{key}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def spm_file(path: Path) -> Path:
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *PIECES]
    scores = [0.0] * 259 + [-100.0 + len(p) for p in PIECES]  # longer pieces merge first
    types = [2, 3, 3] + [6] * 256 + [1] * len(PIECES)  # unknown, control, byte, normal
    return write_vocab(path, "llama", tokens, token_scores=scores, token_types=types, bos_token_id=1, eos_token_id=2,
                       unk_token_id=0, add_bos_token=True)  # fmt: skip


def test_sentencepiece_vocabulary_merges_by_score_and_falls_back_to_bytes(tmp_path: Path) -> None:
    tok = gguf_tokenizer(spm_file(tmp_path / "spm.gguf"))
    ids = tok.encode("hello world")
    assert ids == [1, 259 + PIECES.index("▁hello"), 259 + PIECES.index("▁world")]  # BOS, then two pieces
    ids = tok.encode("hello é")  # é is not a piece: its two UTF-8 bytes
    assert ids[-2:] == [3 + 0xC3, 3 + 0xA9]
    assert tok.decode(ids) == "hello é"
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.decode([1, *tok.encode("hello")[1:], 2]) == "hello"  # control tokens skipped


def test_unsupported_vocabularies_are_one_line(tmp_path: Path) -> None:
    path = write_vocab(tmp_path / "bert.gguf", "bert", ["[CLS]", "a"])
    with pytest.raises(ConfigError, match=r"tokenizer.ggml.model='bert' is not supported: decodekit reads 'gpt2'"):
        gguf_tokenizer(path)
    path = write_vocab(tmp_path / "qwen.gguf", "gpt2", ["a", "b", "ab"], token_merges=["a b"], tokenizer_pre="qwen2")
    with pytest.raises(ConfigError, match=r"tokenizer.ggml.pre='qwen2' is not supported"):
        gguf_tokenizer(path)


def test_llama3_bpe_pre_tokenizer_splits_numbers_in_threes(tmp_path: Path) -> None:
    from decodekit.models.gguf_export import byte_level_vocab

    tokens, merges = byte_level_vocab(300)
    path = write_vocab(tmp_path / "l3.gguf", "gpt2", tokens, token_merges=merges, tokenizer_pre="llama-bpe")
    tok = gguf_tokenizer(path)
    assert tok.decode(tok.encode("12345 go")) == "12345 go"
    assert tok._tok.pre_tokenizer.pre_tokenize_str("12345")[0][0] == "123"
