"""Guidance processors: the EOS length penalty's formula and effect, bag-of-words boosts, lexicons."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from decodekit import ConfigError, build_chain, generate, get_registry
from decodekit.models.gpt import GPT, GPTConfig
from decodekit.processors import BagOfWords, BuildContext, EosLengthPenalty
from decodekit.processors.guidance import known_lexicons, load_lexicon, word_variants
from decodekit.tokenization import ByteTokenizer

LEXICONS = Path(__file__).resolve().parents[1] / "decodekit" / "data" / "lexicons"
TOK = ByteTokenizer(eos_token_id=256)
CONTEXT = BuildContext(eos_token_id=256, encode=TOK.encode, vocab_size=257)


# ------------------------------------------------------------------------------------ EOS length penalty


@pytest.mark.parametrize("generated", [0, 3, 7, 20])
def test_eos_logit_moves_by_slope_times_distance_to_target(generated: int) -> None:
    p = EosLengthPenalty(eos_length_target=7, eos_token_id=[2, 5], eos_length_slope=0.5)
    p.begin(torch.zeros(2, 4, dtype=torch.long))
    ids = torch.zeros(2, 4 + generated, dtype=torch.long)
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(generated))
    logits[1, 5] = float("-inf")  # a removed EOS stays removed
    out = p(ids, logits)
    shift = out - logits
    expected = 0.5 * (generated - 7)
    assert torch.allclose(shift[0, [2, 5]], torch.full((2,), expected))
    assert shift[1, 2].item() == pytest.approx(expected) and out[1, 5] == float("-inf")
    others = [i for i in range(10) if i not in (2, 5)]
    assert torch.equal(out[:, others], logits[:, others])


def test_a_later_target_gives_longer_outputs() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=30, n_layer=1, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.4)
    prompts = torch.randint(0, 30, (16, 4), generator=torch.Generator().manual_seed(1))
    eos = int(torch.mode(generate(model, prompts, max_new_tokens=6).tokens.flatten()).values)  # a frequent token

    def mean_length(target: int) -> float:
        chain = EosLengthPenalty(eos_length_target=target, eos_token_id=eos, eos_length_slope=3.0)
        out = generate(model, prompts, processors=chain, max_new_tokens=24, eos_token_id=eos)
        return out.lengths.float().mean().item()

    short, long = mean_length(2), mean_length(12)
    assert short < long
    assert short <= 6 and long >= 10


def test_eos_length_penalty_from_settings_needs_an_eos() -> None:
    chain = build_chain({"eos_length_target": 5, "eos_length_slope": 0.2}, context=CONTEXT)
    assert isinstance(chain[0], EosLengthPenalty) and chain[0].eos_token_id == [256]
    with pytest.raises(ConfigError, match="eos_length_target: needs an end-of-sequence token"):
        build_chain({"eos_length_target": 5})
    with pytest.raises(ConfigError, match=r"eos_length_slope=-1.0 is not allowed: must be >= 0"):
        build_chain({"eos_length_target": 5, "eos_length_slope": -1.0}, context=CONTEXT)


# ------------------------------------------------------------------------------------ bag of words


def lexicon_words(name: str) -> list[str]:
    return [w for w in (LEXICONS / f"{name}.txt").read_text().split() if w]


def boosted(chain, text: str, strength: float) -> set[str]:
    logits = torch.zeros(1, 257)
    out = chain(torch.tensor([TOK.encode(text)]), logits)
    shift = out - logits
    assert set(shift.unique().tolist()) <= {0.0, strength}  # +s or nothing
    return {TOK.decode([i]) for i in (shift[0] == strength).nonzero().flatten().tolist()}


def test_after_whitespace_the_first_letters_of_lexicon_words_are_boosted() -> None:
    chain = build_chain({"guide_attribute": "positive", "guide_strength": 2.0}, context=CONTEXT)
    words = lexicon_words("positive")
    assert boosted(chain, "I feel ", 2.0) == {w[0] for w in words}


def test_a_partly_written_word_is_boosted_to_its_next_letter() -> None:
    chain = build_chain({"guide_attribute": "nature", "guide_strength": 1.5}, context=CONTEXT)
    words = lexicon_words("nature")
    # after " sn": the letter after "sn" of every nature word starting so, e.g. "snow"
    expected = {w[2] for w in words if w.startswith("sn") and len(w) > 2}
    assert expected and boosted(chain, "the sn", 1.5) == expected


def test_mid_word_letters_are_not_boosted_with_a_byte_tokenizer() -> None:
    chain = build_chain({"guide_attribute": "science", "guide_strength": 2.0}, context=CONTEXT)
    assert boosted(chain, "qqq", 2.0) == set()


def test_first_tokens_of_both_spellings_with_a_word_level_tokenizer() -> None:
    vocab = {"happy": 1, " happy": 2, "sad": 3, " sad": 4, " ": 5, "jo": 6, "y": 7, " jo": 8}

    def encode(text: str) -> list[int]:
        if text in vocab:
            return [vocab[text]]
        if text.strip() == "joy":
            return [vocab[text[:-1]], vocab["y"]]
        return []

    words = ["happy", "joy"]
    sequences = [ids for w in words for ids in word_variants(encode, w)]
    assert sequences == [[1], [2], [6, 7], [8, 7]]
    p = BagOfWords(sequences, guide_strength=3.0)
    logits = torch.zeros(2, 10)
    out = p(torch.tensor([[0, 3], [0, 8]]), logits)
    assert (out[0] > 0).nonzero().flatten().tolist() == [1, 2, 6, 8]
    assert (out[1] > 0).nonzero().flatten().tolist() == [1, 2, 6, 7, 8]  # after " jo": "y" too


def test_boost_raises_odds_by_e_to_the_strength() -> None:
    p = BagOfWords([[1], [2]], guide_strength=2.0)
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.0]])
    before = logits.softmax(-1)[0]
    after = p(torch.zeros(1, 1, dtype=torch.long), logits).softmax(-1)[0]
    odds = (after / before) / (after[0] / before[0])
    assert torch.allclose(odds, torch.tensor([1.0, torch.e**2, torch.e**2, 1.0]))


def test_guidance_settings_errors() -> None:
    with pytest.raises(ConfigError, match=r"guide_attribute='happyness' is not known; known: nature, negative, positive, science"):
        build_chain({"guide_attribute": "happyness"}, context=CONTEXT)
    with pytest.raises(ConfigError, match=r"guide_strength=-1.0 is not allowed: must be >= 0"):
        build_chain({"guide_attribute": "positive", "guide_strength": -1.0}, context=CONTEXT)
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        build_chain({"guide_attribute": "positive"})


def test_shipped_lexicons_load_and_are_clean() -> None:
    assert {"positive", "negative", "science", "nature"} <= set(known_lexicons())
    for name in known_lexicons():
        words = load_lexicon(name)
        assert len(words) >= 50, name
        assert words == lexicon_words(name)
        assert len(set(words)) == len(words), f"{name} repeats a word"
        assert all(w.isalpha() and w.islower() for w in words), name


def test_registered_under_their_own_settings() -> None:
    owners = get_registry().owners
    assert owners["eos_length_target"].cls is EosLengthPenalty and owners["eos_length_slope"].cls is EosLengthPenalty
    assert owners["guide_attribute"].cls is BagOfWords and owners["guide_strength"].cls is BagOfWords
