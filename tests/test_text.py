"""Text decoding: batches of prompts of different lengths, stop strings, streaming, BPE boundaries."""

from __future__ import annotations

import pytest
import torch

from decodekit import ConfigError
from decodekit.models.gpt import GPT, GPTConfig
from decodekit.processors import BadWords, Temperature
from decodekit.samplers import Multinomial
from decodekit.text import generate_text
from decodekit.tokenization import ByteTokenizer

EOS = 256


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(1)
    return GPT(GPTConfig(block_size=96, vocab_size=257, n_layer=2, n_head=2, n_embd=32)).eval()


@pytest.fixture(scope="module")
def tok() -> ByteTokenizer:
    return ByteTokenizer(eos_token_id=EOS)


def test_a_prompt_gives_the_same_greedy_output_alone_or_in_a_batch(model: GPT, tok: ByteTokenizer) -> None:
    prompts = ["Hi", "Once upon a time", "é€😀 unicode"]
    batch = generate_text(model, tok, prompts, max_new_tokens=12)
    for prompt, result in zip(prompts, batch):
        alone = generate_text(model, tok, prompt, max_new_tokens=12)[0]
        assert result.tokens == alone.tokens and result.text == alone.text


def test_sampled_rows_do_not_depend_on_the_batch(model: GPT, tok: ByteTokenizer) -> None:
    kwargs = dict(processors=Temperature(1.2), sampler=Multinomial(), max_new_tokens=10)
    batch = generate_text(model, tok, ["abc", "a much longer prompt"], seed=[5, 6], **kwargs)
    alone = generate_text(model, tok, ["a much longer prompt"], seed=[6], **kwargs)
    assert batch[1].tokens == alone[0].tokens


def test_stop_string_across_token_boundaries_is_trimmed(model: GPT, tok: ByteTokenizer) -> None:
    ascii_only = BadWords([[b] for b in range(128, 256)])  # a random model: keep its text valid UTF-8
    free = generate_text(model, tok, "The", processors=ascii_only, max_new_tokens=20)[0]
    stop = free.text[4:7]  # three bytes: three tokens, matched across their boundaries
    assert len(stop) == 3
    pieces: list[str] = []
    result = generate_text(
        model, tok, "The", processors=ascii_only, max_new_tokens=20, stop=[stop], on_text=lambda r, p: pieces.append(p)
    )[0]
    assert result.finish_reason == "stop" and result.stop_string == stop
    assert result.text == free.text[: free.text.find(stop)]
    assert "".join(pieces) == result.text  # streamed text never shows the stop string


def test_finish_reasons_eos_and_length(model: GPT, tok: ByteTokenizer) -> None:
    free = generate_text(model, tok, ["x", "yy"], max_new_tokens=6)
    assert [r.finish_reason for r in free] == ["length", "length"]
    first = free[0].tokens[0]
    ended = generate_text(model, tok, ["x"], max_new_tokens=6, eos_token_id=first)[0]
    assert ended.finish_reason == "eos" and ended.tokens == [first] and ended.text == ""


def test_num_samples_gives_distinct_seeded_rows(model: GPT, tok: ByteTokenizer) -> None:
    results = generate_text(
        model, tok, ["a", "b"], processors=Temperature(1.5), sampler=Multinomial(), num_samples=3, seed=10, max_new_tokens=8
    )
    assert [(r.prompt_index, r.sample_index) for r in results] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert [r.seed for r in results] == list(range(10, 16))
    assert len({tuple(r.tokens) for r in results[:3]}) > 1


def test_continuation_is_separate_from_the_prompt_across_a_bpe_merge() -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from decodekit.tokenization import JSONTokenizer, continuation_text

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["hello world " * 50, "help hello held"], trainer)
    import json
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tokenizer.json"
        bpe.save(str(path))
        tok = JSONTokenizer(path)
        prompt = tok.encode("hel")
        rest = tok.encode("hello")[len(tok.encode("hel")) :] if tok.encode("hello")[: len(prompt)] == prompt else tok.encode("lo")
        assert continuation_text(tok, prompt, rest) == "lo"
        json.loads(path.read_text())  # the file is a real tokenizer.json


def test_bad_inputs(model: GPT, tok: ByteTokenizer) -> None:
    with pytest.raises(ConfigError, match="num_samples=0"):
        generate_text(model, tok, "a", num_samples=0)
    with pytest.raises(ConfigError, match="prompts"):
        generate_text(model, tok, [])
    small = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ConfigError, match="do not belong together"):
        generate_text(small, tok, "a")


def test_empty_prompt_starts_from_eos(model: GPT, tok: ByteTokenizer) -> None:
    result = generate_text(model, tok, "", max_new_tokens=4, eos_token_id=[])[0]
    assert len(result.tokens) == 4


def test_beam_search_with_several_returned_sequences(model: GPT, tok: ByteTokenizer) -> None:
    from decodekit.samplers import BeamSearch

    results = generate_text(model, tok, ["ab", "xyz"], sampler=BeamSearch(3, num_return_sequences=2), max_new_tokens=6)
    assert [(r.prompt_index, r.sequence_index) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r.score is not None for r in results)
    assert results[0].score >= results[1].score and results[2].score >= results[3].score
    assert results[0].tokens != results[1].tokens
