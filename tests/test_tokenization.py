"""Tokenizers round-trip text, fit their model, and turn generated ids into text correctly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decodekit.errors import ConfigError, ModelLoadError, TokenizationError
from decodekit.models import GPT, GPTConfig, ModelExtras
from decodekit.tokenization import (
    ByteTokenizer,
    CharTokenizer,
    JSONTokenizer,
    StreamDecoder,
    Tokenizer,
    check_vocab,
    continuation_text,
    load_tokenizer,
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "To be, or not to be: that is the question.",
    "the the the then there their they them",
]
ALPHABET = "abcdefgh ,.!\néü€😀"


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer.json trained in memory on a few sentences."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return path


# ------------------------------------------------------------------------------ round trips


@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text: str) -> None:
    tok = ByteTokenizer(eos_token_id=256, bos_token_id=256, add_bos=True)
    ids = tok.encode(text)
    assert ids[0] == 256 and all(0 <= i < 256 for i in ids[1:])
    assert tok.decode(ids) == text


@given(st.text(alphabet=ALPHABET))
def test_char_tokenizer_round_trips_its_alphabet(text: str) -> None:
    tok = CharTokenizer(list(ALPHABET))
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_json_bpe_tokenizer_round_trips_any_text(bpe_file: Path, text: str) -> None:
    tok = JSONTokenizer(bpe_file)
    assert tok.decode(tok.encode(text)) == text


def test_json_tokenizer_finds_its_eos_and_size(bpe_file: Path) -> None:
    tok = JSONTokenizer(bpe_file)
    assert isinstance(tok, Tokenizer)
    assert tok.eos_token_id == 0 and tok.vocab_size == 300
    assert tok.decode([*tok.encode("the"), tok.eos_token_id]) == "the"  # specials are skipped


# ------------------------------------------------------------------------------ errors


def test_char_tokenizer_names_an_unknown_character() -> None:
    with pytest.raises(TokenizationError, match=r"'z' \(U\+007A\) at position 2"):
        CharTokenizer(list("abc ")).encode("abz")


def test_decode_rejects_ids_outside_the_vocabulary() -> None:
    with pytest.raises(TokenizationError, match="token id 300"):
        ByteTokenizer().decode([65, 300])


def test_byte_tokenizer_special_ids_must_follow_the_bytes() -> None:
    with pytest.raises(ConfigError, match=">= 256"):
        ByteTokenizer(eos_token_id=10)


def test_check_vocab_accepts_a_fitting_pair_and_rejects_a_too_large_tokenizer() -> None:
    model = GPT(GPTConfig(block_size=8, vocab_size=257, n_layer=1, n_head=1, n_embd=8))
    check_vocab(ByteTokenizer(eos_token_id=256), model)
    check_vocab(ByteTokenizer(), model)  # fewer ids than logits is fine
    with pytest.raises(ConfigError, match="ids up to 257 but the model has only 257 logits"):
        check_vocab(ByteTokenizer(eos_token_id=257), model)


# ------------------------------------------------------------------------------ load_tokenizer


def test_load_tokenizer_from_model_extras_and_specs(bpe_file: Path) -> None:
    extras = ModelExtras(source="x", format="nanogpt", tokenizer={"kind": "char", "vocab": list("ab")})
    assert isinstance(load_tokenizer(None, extras), CharTokenizer)
    assert isinstance(load_tokenizer("char", extras), CharTokenizer)
    byte = load_tokenizer("auto", {"kind": "byte", "eos_token_id": 256})
    assert isinstance(byte, ByteTokenizer) and byte.eos_token_id == 256
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    assert isinstance(load_tokenizer(bpe_file), JSONTokenizer)
    assert isinstance(load_tokenizer(str(bpe_file.parent)), JSONTokenizer)  # folder without tokenizer_config.json


def test_load_tokenizer_errors_are_one_line() -> None:
    with pytest.raises(ConfigError, match="names no tokenizer"):
        load_tokenizer("auto", None)
    with pytest.raises(ConfigError, match="stores no character vocabulary"):
        load_tokenizer("char", {"kind": "byte"})
    with pytest.raises(ConfigError, match="expected 'auto', 'byte'"):
        load_tokenizer("sentencepiece")
    with pytest.raises(ConfigError, match="kind='nope'"):
        load_tokenizer({"kind": "nope"})
    with pytest.raises(ModelLoadError, match="not found"):
        load_tokenizer("/nonexistent/tokenizer.json")


def test_json_tokenizer_reads_special_tokens_from_tokenizer_config(bpe_file: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(bpe_file.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}, "pad_token": "<|endoftext|>"}))
    tok = JSONTokenizer(folder / "tokenizer.json")
    assert tok.eos_token_id == tok.pad_token_id == 0 and tok.bos_token_id is None


# ------------------------------------------------------------------------------ continuation text and streaming


def test_continuation_text_survives_a_character_split_across_the_boundary() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("price: 5€ today")
    cut = ids.index(0xE2) + 1  # the prompt ends inside "€"
    assert continuation_text(tok, ids[:cut], ids[cut:]) == "€ today"


def test_continuation_text_survives_a_bpe_merge_across_the_boundary(bpe_file: Path) -> None:
    tok = JSONTokenizer(bpe_file)
    ids = tok.encode("the quick brown fox")
    for cut in range(len(ids) + 1):
        prompt_text = tok.decode(ids[:cut])
        assert prompt_text + continuation_text(tok, ids[:cut], ids[cut:]) == "the quick brown fox"


@given(st.text(), st.text())
def test_stream_decoder_pieces_join_to_the_continuation(prompt: str, text: str) -> None:
    tok = ByteTokenizer(eos_token_id=256)
    prompt_ids, new_ids = tok.encode(prompt), tok.encode(text)
    stream = StreamDecoder(tok, prompt_ids)
    pieces = [stream.push(i) for i in new_ids]
    assert all(not p.endswith("\ufffd") or "\ufffd" in text for p in pieces)
    assert "".join(pieces) + stream.flush() == text


def test_stream_decoder_holds_back_an_incomplete_character() -> None:
    stream = StreamDecoder(ByteTokenizer())
    euro = "€".encode()
    assert stream.push(ord("a")) == "a"
    assert stream.push(euro[0]) == ""
    assert stream.push(euro[1]) == ""
    assert stream.push(euro[2]) == "€"
    assert stream.push(euro[0]) == ""
    assert stream.flush() == "\ufffd"


@settings(max_examples=30, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_stream_decoder_with_bpe_joins_to_the_decoded_text(bpe_file: Path, text: str) -> None:
    tok = JSONTokenizer(bpe_file)
    stream = StreamDecoder(tok)
    out = "".join(stream.push(i) for i in tok.encode(text)) + stream.flush()
    assert out == text
