"""Settings as users type them: "off" values, booleans, words the tokenizer cannot encode, bans of everything."""

from __future__ import annotations

import pytest
import torch

from decodekit import ConfigError, build_chain
from decodekit.processors import (
    BadWords,
    BanSkippedWarning,
    BuildContext,
    EpsilonCutoff,
    EtaCutoff,
    FrequencyPenalty,
    LogitBias,
    MinNewTokens,
    MinP,
    NoRepeatNGram,
    PresencePenalty,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopNSigma,
    TopP,
    TypicalP,
)
from decodekit.processors.base import ProcessorChain

NEG_INF = float("-inf")

# a row with a token of underflowing probability, a row of ties, a row with removed tokens
LOGITS = torch.tensor(
    [[-1000.0, 0.0, 0.5, 3.0], [1.0, 1.0, 1.0, 1.0], [NEG_INF, 2.0, -5.0, NEG_INF]], dtype=torch.float32
)
HISTORY = torch.tensor([[0, 1, 0, 1], [1, 2, 3, 1], [2, 2, 2, 2]])

OFF = {
    "Temperature(1.0)": lambda: Temperature(1.0),
    "TopK(0)": lambda: TopK(0),
    "TopK(-1)": lambda: TopK(-1),
    "TopP(1.0)": lambda: TopP(1.0),
    "MinP(0.0)": lambda: MinP(0.0),
    "TypicalP(1.0)": lambda: TypicalP(1.0),
    "EpsilonCutoff(0.0)": lambda: EpsilonCutoff(0.0),
    "EtaCutoff(0.0)": lambda: EtaCutoff(0.0),
    "TopNSigma(0.0)": lambda: TopNSigma(0.0),
    "TopNSigma(-1.0)": lambda: TopNSigma(-1.0),
    "RepetitionPenalty(1.0)": lambda: RepetitionPenalty(1.0),
    "PresencePenalty(0.0)": lambda: PresencePenalty(0.0),
    "FrequencyPenalty(0.0)": lambda: FrequencyPenalty(0.0),
    "NoRepeatNGram(0)": lambda: NoRepeatNGram(0),
    "BadWords([])": lambda: BadWords([]),
    "LogitBias({})": lambda: LogitBias({}),
    "MinNewTokens(0, eos_token_id=3)": lambda: MinNewTokens(0, eos_token_id=3),
}


@pytest.mark.parametrize("make", OFF.values(), ids=OFF.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_off_values_give_the_logits_back_unchanged(make, dtype: torch.dtype) -> None:
    x = LOGITS.to(dtype)
    processor = make()
    if hasattr(processor, "begin"):
        processor.begin(HISTORY[:, :2])
    assert torch.equal(processor(HISTORY, x), x)


@pytest.mark.parametrize(
    "settings",
    [
        {"top_k": 0},
        {"top_k": -1},
        {"top_p": 1.0},
        {"min_p": 0.0},
        {"typical_p": 1.0},
        {"epsilon_cutoff": 0.0},
        {"eta_cutoff": 0.0},
        {"top_n_sigma": 0.0},
        {"repetition_penalty": 1.0},
        {"no_repeat_ngram_size": 0},
        {"logit_bias": {}},
        {"bad_words": []},
    ],
)
def test_off_values_are_accepted_from_settings(settings: dict) -> None:
    chain = build_chain(settings)
    assert torch.equal(chain(HISTORY, LOGITS), LOGITS)


def test_top_p_zero_keeps_only_the_most_likely_token_and_its_ties() -> None:
    out = TopP(0.0)(HISTORY, LOGITS)
    assert torch.equal(out != NEG_INF, LOGITS == LOGITS.amax(dim=-1, keepdim=True))


def test_top_k_off_is_not_fused_with_top_p() -> None:
    chain = TopK(0) | TopP(0.9)
    assert torch.equal(chain(HISTORY, LOGITS), TopP(0.9)(HISTORY, LOGITS))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TopK(-2), "top_k=-2"),
        (lambda: TopP(-0.5), "top_p=-0.5"),
        (lambda: TypicalP(0.0), "typical_p=0.0"),
        (lambda: EpsilonCutoff(1.0), "epsilon_cutoff=1.0"),
        (lambda: NoRepeatNGram(-1), "no_repeat_ngram_size=-1"),
    ],
)
def test_values_without_a_peer_meaning_are_refused(make, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TopK(True), r"top_k=True is not allowed: must be a number, not a boolean"),
        (lambda: Temperature(False), r"temperature=False is not allowed"),
        (lambda: NoRepeatNGram(True), r"no_repeat_ngram_size=True"),
        (lambda: RepetitionPenalty(True), r"repetition_penalty=True"),
        (lambda: LogitBias({1: True}), r"logit_bias=\{1: True\} is not allowed: must be numbers, not booleans"),
        (lambda: BadWords([[True]]), r"bad_words"),
        (lambda: build_chain({"top_k": True}), r"top_k=True"),
        (lambda: build_chain({"min_p": True}), r"min_p=True"),
        (lambda: build_chain({"bad_words": [[1, False]]}), r"bad_words="),
    ],
)
def test_booleans_are_refused_for_numeric_settings(make, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


def test_integers_still_pass_for_float_settings() -> None:
    assert Temperature(1).temperature == 1.0
    assert build_chain({"top_p": 1, "min_p": 0})[0].top_p == 1.0


# --- bad words ---------------------------------------------------------------------------------


def _ascii_only(text: str) -> list[int]:
    """A tokenizer that drops the characters it does not know."""
    return [ord(c) for c in text if ord(c) < 128]


def _with_unknown(text: str) -> list[int]:
    """A tokenizer that maps the characters it does not know to an unknown token (0)."""
    return [ord(c) if ord(c) < 128 else 0 for c in text]


def _decode(ids) -> str:
    return "".join("<unk>" if i == 0 else chr(i) for i in ids)


@pytest.mark.parametrize("encode", [_ascii_only, _with_unknown])
def test_bad_word_the_tokenizer_cannot_encode_is_refused_naming_it(encode) -> None:
    context = BuildContext(encode=encode, decode=_decode, vocab_size=128)
    with pytest.raises(ConfigError, match=r"bad_words: 'hé' is not what its tokens .* decode to"):
        build_chain({"bad_words": ["ok", "hé"]}, context=context)
    chain = build_chain({"bad_words": ["ok", " hi"]}, context=context)
    assert chain[0].sequences == [[111, 107], [32, 104, 105]]


def test_bad_word_equal_to_the_eos_token_is_refused() -> None:
    context = BuildContext(eos_token_id=[5, 7], vocab_size=10)
    with pytest.raises(ConfigError, match=r"bad_words: \[7\] is the end-of-sequence token 7"):
        build_chain({"bad_words": [[3, 4], [7]]}, context=context)
    assert build_chain({"bad_words": [[7, 7], [3]]}, context=context)[0].sequences == [[7, 7], [3]]


def test_banning_the_whole_vocabulary_is_refused() -> None:
    context = BuildContext(vocab_size=3)
    with pytest.raises(ConfigError, match=r"bad_words: bans every token of the vocabulary \(size 3\)"):
        build_chain({"bad_words": [[0], [2], [1], [0, 1]]}, context=context)
    with pytest.raises(ConfigError, match=r"bad_words: bans every token of the vocabulary \(size 2\)"):
        BadWords([[0], [1]])(HISTORY, torch.zeros(3, 2))  # the vocabulary is known at the first call


def test_a_ban_that_would_empty_a_row_says_so_on_cpu() -> None:
    x = torch.tensor([[0.0, NEG_INF, NEG_INF], [0.0, 1.0, 2.0]])
    ids = torch.tensor([[1, 2], [1, 2]])
    with pytest.warns(BanSkippedWarning, match=r"bad_words: would remove every token left in row\(s\) \[0\]"):
        out = BadWords([[2, 0]])(ids, x)
    assert torch.equal(out[0], x[0]) and out[1, 0] == NEG_INF


def test_temperature_keeps_transformers_values_so_sign_dependent_processors_agree() -> None:
    x = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    ids = torch.tensor([[1, 3]])
    chain = ProcessorChain([Temperature(0.5), RepetitionPenalty(2.0)])
    expected = torch.tensor([[4.0, 1.0, -2.0, 0.5]])  # x / t, then token 1 halved, token 3 halved
    assert torch.equal(chain(ids, x), expected)


def test_temperature_shifts_only_rows_that_would_overflow() -> None:
    x = torch.tensor([[3e38, 2e38, NEG_INF], [2.0, -1.0, 0.0]])
    out = Temperature(0.5)(torch.zeros(2, 1, dtype=torch.long), x)
    assert torch.isfinite(out[0, :2]).all() and out[0, 0] == 0.0 and out[0, 2] == NEG_INF
    assert torch.equal(out[1], x[1] / 0.5)
    half = Temperature(0.01)(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[1000.0, 0.0]], dtype=torch.float16))
    assert torch.equal(half, torch.tensor([[0.0, -100000.0]]).clamp(min=-65504).to(torch.float16))
