"""transformers' expected values: the cases of its tests/generation/test_logits_process.py
(``LogitsProcessorTest``), run on decodekit's processors. Upstream: huggingface/transformers at
commit 019af3ac65298aae51038a941c54a038a505bd57.

Each test names the upstream test it ports. transformers' warpers take a ``filter_value``; decodekit
always removes with ``-inf``, so a check of ``!= 0.0`` upstream (``filter_value=0.0``) is one of
``!= -inf`` here. Not ported: processors decodekit has no counterpart for (``MinLength``, the
encoder-side ones, ``normalize=True`` repetition penalty, forced BOS/EOS, watermarks, guidance),
and multi-token sequence biases (decodekit's ``logit_bias`` biases single tokens).
"""

from __future__ import annotations

import pytest
import torch

from decodekit import ConfigError, build_chain
from decodekit.processors import (
    BadWords,
    BuildContext,
    EpsilonCutoff,
    EtaCutoff,
    LogitBias,
    MinNewTokens,
    MinP,
    NoRepeatNGram,
    PrefixAllowedTokens,
    ProcessorChain,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    TypicalP,
)

INF = float("-inf")


def uniform(batch_size: int, length: int) -> torch.Tensor:
    """``LogitsProcessorTest._get_uniform_logits``."""
    return torch.ones((batch_size, length), dtype=torch.float) / length


def ramp(batch_size: int, vocab_size: int) -> torch.Tensor:
    """The "edge cases with negative and extreme logits" ramp: ``arange(V) - V // 2``, row 1 times 100."""
    logits = torch.arange(vocab_size, dtype=torch.float).unsqueeze(0).repeat(batch_size, 1) - (vocab_size // 2)
    logits[1] = logits[1] * 100.0
    return logits


def kept(scores: torch.Tensor) -> list[int]:
    return (scores != INF).sum(dim=-1).tolist()


def assert_filters(processor, probs: list[list[float]], expected: list[list[float]]) -> None:
    """Upstream's pattern: logits ``log(probs)``, ``exp`` of the result against ``expected`` (1e-3),
    and the input not changed in place."""
    dist = torch.log(torch.tensor(probs))
    filtered = processor(None, dist)
    torch.testing.assert_close(torch.exp(filtered), torch.tensor(expected), rtol=1e-3, atol=1e-3)
    assert not torch.all(filtered == dist)


def test_temperature_dist_warper() -> None:
    """test_temperature_dist_warper."""
    length = 20
    scores = uniform(2, length)
    scores[1, 5] = (1 / length) + 0.1  # peak
    scores[1, 10] = (1 / length) - 0.4  # valley
    probs = scores.softmax(-1)
    sharp = Temperature(0.5)(None, scores).softmax(-1)
    smooth = Temperature(1.3)(None, scores).softmax(-1)
    processed = Temperature(1.3)(None, scores)
    torch.testing.assert_close(probs[0], sharp[0], rtol=1e-3, atol=1e-3)  # uniform stays uniform
    torch.testing.assert_close(probs[0], smooth[0], rtol=1e-3, atol=1e-3)
    assert probs[1].max() < sharp[1].max() and probs[1].min() > sharp[1].min()
    assert probs[1].max() > smooth[1].max() and probs[1].min() < smooth[1].min()
    assert not torch.all(scores == processed)


def _penalty_scores() -> torch.Tensor:
    scores = uniform(2, 10)
    scores[0, 0] = -(1 / 10)
    scores[1, 5] = 4 / 10
    return scores


def _assert_penalised(processed: torch.Tensor) -> None:
    v = 10
    assert processed[0, 0].item() == pytest.approx(-(1 / v) * 2)
    assert processed[0, 1].item() == pytest.approx((1 / v) / 2)
    assert processed[1, 0].item() == pytest.approx((1 / v) / 2)
    assert processed[1, 5].item() == pytest.approx((4 / v) / 2)


def test_repetition_penalty_dist_process() -> None:
    """test_repetition_penalty_dist_process."""
    input_ids = torch.tensor([[0, 1], [5, 0]])
    scores = _penalty_scores()
    processed = RepetitionPenalty(2.0)(input_ids, scores)
    _assert_penalised(processed)
    assert not torch.all(scores == processed)


def test_repetition_penalty_dist_process_exclusion_no_new_input_ids() -> None:
    """test_repetition_penalty_dist_process_exclusion_no_new_input_ids: transformers'
    ``prompt_ignore_length`` is, while the tokens after the prompt are the last ones,
    ``penalty_last_n`` = the number generated: here 0, so nothing is penalised."""
    input_ids = torch.tensor([[0, 1], [5, 0]])
    scores = _penalty_scores()
    assert torch.equal(RepetitionPenalty(2.0, penalty_last_n=0)(input_ids, scores), scores)


def test_repetition_penalty_dist_process_exclusion_with_new_input_ids() -> None:
    """test_repetition_penalty_dist_process_exclusion_with_new_input_ids: a 2-token prompt ignored,
    2 tokens generated after it (``penalty_last_n=2``)."""
    curr_input_ids = torch.tensor([[0, 1, 0, 1], [5, 0, 5, 0]])
    scores = _penalty_scores()
    processed = RepetitionPenalty(2.0, penalty_last_n=2)(curr_input_ids, scores)
    _assert_penalised(processed)
    assert not torch.all(scores == processed)


def test_top_k_dist_warper() -> None:
    """test_top_k_dist_warper."""
    vocab_size, batch_size = 10, 2
    ramp_logits = torch.arange(vocab_size, dtype=torch.float).unsqueeze(0).repeat(batch_size, 1)
    ramp_logits[1:, : vocab_size // 2] = ramp_logits[1:, : vocab_size // 2] + vocab_size
    scores = TopK(3)(None, ramp_logits)
    assert torch.isinf(scores[0]).tolist() == 7 * [True] + 3 * [False]
    assert torch.isinf(scores[1]).tolist() == 2 * [True] + 3 * [False] + 5 * [True]
    assert not torch.all(scores == ramp_logits)

    safety = TopK(1, min_tokens_to_keep=3)
    assert kept(safety(None, uniform(batch_size, 5))) == [5, 5]  # uniform dist is not changed
    ramp5 = torch.arange(5, dtype=torch.float).unsqueeze(0).repeat(batch_size, 1)
    assert kept(safety(None, ramp5)) == [3, 3]  # min_tokens overwrites k: 2 tokens are removed


def test_top_p_dist_warper() -> None:
    """test_top_p_dist_warper."""
    assert_filters(TopP(0.8), [[0.3, 0.1, 0.1, 0.5], [0.15, 0.3, 0.3, 0.25]], [[0.3, 0.0, 0.0, 0.5], [0.0, 0.3, 0.3, 0.25]])
    # first row keeps 3 tokens; the second would keep 1, min_tokens_to_keep=2 keeps 2
    assert kept(TopP(0.9, min_tokens_to_keep=2)(None, ramp(2, 10))) == [3, 2]


def test_min_p_dist_warper() -> None:
    """test_min_p_dist_warper."""
    assert_filters(
        MinP(0.05),
        [[0.9, 0.0274, 0.047, 0.0274], [0.15, 0.3, 0.3, 0.25], [0.97, 0.01, 0.01, 0.01]],
        [[0.9, 0.0, 0.047, 0.0], [0.15, 0.3, 0.3, 0.25], [0.97, 0.0, 0.0, 0.0]],
    )
    assert kept(MinP(0.9, min_tokens_to_keep=2)(None, ramp(2, 10))) == [2, 2]


def test_typical_dist_warper() -> None:
    """test_typical_dist_warper."""
    assert_filters(TypicalP(0.5), [[0.97, 0.01, 0.01, 0.01], [0.4, 0.2, 0.2, 0.2]], [[0.97, 0.0, 0.0, 0.0], [0.0, 0.2, 0.2, 0.2]])
    assert kept(TypicalP(0.5, min_tokens_to_keep=3)(None, uniform(2, 5))) == [5, 5]  # uniform: unchanged
    assert kept(TypicalP(0.7, min_tokens_to_keep=2)(None, ramp(2, 10))) == [2, 2]


def test_epsilon_dist_warper() -> None:
    """test_epsilon_dist_warper."""
    probs = [[0.87, 0.099, 0.001, 0.03], [0.4, 0.299, 0.101, 0.2]]
    assert_filters(EpsilonCutoff(0.1), probs, [[0.87, 0, 0, 0], [0.4, 0.299, 0.101, 0.2]])
    assert kept(EpsilonCutoff(5e-2, min_tokens_to_keep=2)(None, ramp(2, 10))) == [3, 2]


def test_eta_dist_warper() -> None:
    """test_eta_dist_warper."""
    probs = [[0.0, 0.1, 0.8, 0.1], [0.01, 0.04, 0.9, 0.05]]
    assert_filters(EtaCutoff(0.0625), probs, [[0.0, 0.1, 0.8, 0.1], [0.0, 0.0, 0.9, 0.0]])
    assert kept(EtaCutoff(0.1, min_tokens_to_keep=2)(None, ramp(2, 10))) == [2, 2]


def test_no_repeat_ngram_dist_processor() -> None:
    """test_no_repeat_ngram_dist_processor."""
    input_ids = torch.tensor([[1, 1, 2, 1], [0, 1, 0, 1]])
    scores = uniform(2, 3)
    two, three = NoRepeatNGram(2)(input_ids, scores), NoRepeatNGram(3)(input_ids, scores)
    assert torch.isinf(two).tolist() == [[False, True, True], [True, False, False]]
    assert torch.isinf(three).tolist() == [[False, False, False], [True, False, False]]


def test_no_repeat_ngram_dist_processor_banned_token_reappears() -> None:
    """test_no_repeat_ngram_dist_processor_banned_token_reappears."""
    input_ids = torch.tensor([[1, 2, 5, 7, 8, 5, 1, 2]])
    filtered = NoRepeatNGram(3)(input_ids, uniform(1, 10))
    assert torch.isinf(filtered).nonzero()[:, 1].tolist() == [5]


def test_no_repeat_ngram_dist_processor_sequence_shorter_than_ngram() -> None:
    """test_no_repeat_ngram_dist_processor_sequence_shorter_than_ngram."""
    filtered = NoRepeatNGram(3)(torch.tensor([[1, 2], [0, 1]]), uniform(2, 3))
    assert not torch.isinf(filtered).any()


def test_no_bad_words_dist_processor() -> None:
    """test_no_bad_words_dist_processor. transformers silently drops the entry ``[4]`` that is the
    EOS token; decodekit bans ids given to ``BadWords`` as given, and refuses that entry from
    settings (banning EOS would let no sequence end), so the case runs without it."""
    input_ids = torch.tensor([[0, 1, 3, 1], [0, 1, 0, 1]])
    scores = uniform(2, 5)
    filtered = BadWords([[1], [1, 0], [0, 1, 2], [1, 3, 1, 3]])(input_ids, scores)
    assert torch.isinf(filtered).tolist() == [[True, True, False, True, False], [True, True, True, False, False]]
    assert not torch.all(scores == filtered)
    context = BuildContext(eos_token_id=4, vocab_size=5)
    with pytest.raises(ConfigError, match="end-of-sequence token"):
        build_chain({"bad_words": [[1], [4], [1, 0]]}, context=context)
    with pytest.raises(ConfigError, match="end-of-sequence token"):  # upstream's edge case: [[4]] alone
        build_chain({"bad_words": [[4]]}, context=context)


def test_bias_dist_processor() -> None:
    """test_bias_dist_processor, its one-token biases ``{(1,): 100.0, (4,): 100.0}`` (the multi-token
    negative biases have no counterpart in decodekit)."""
    scores = torch.zeros((2, 5))
    filtered = LogitBias({1: 100.0, 4: 100.0})(torch.tensor([[0, 1, 3, 1], [0, 1, 0, 1]]), scores)
    assert filtered.tolist() == [[0.0, 100.0, 0.0, 0.0, 100.0], [0.0, 100.0, 0.0, 0.0, 100.0]]


def test_processor_list() -> None:
    """test_processor_list: a chain gives what the processors give one after the other, and
    ``input_ids`` is never changed (decodekit has no MinLength; the rest of the list is kept)."""
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 15, (4, 10), generator=gen)
    input_ids_comp = input_ids.clone()
    processors = [
        Temperature(0.5), RepetitionPenalty(2.0), TopK(3), TopP(0.8), NoRepeatNGram(2), BadWords([[1]]),
    ]  # fmt: skip
    scores = uniform(4, 15)
    one_by_one = scores
    for p in processors:
        one_by_one = p(input_ids, one_by_one)
    torch.testing.assert_close(one_by_one, ProcessorChain(processors)(input_ids, scores.clone()), rtol=1e-3, atol=1e-3)
    assert input_ids.tolist() == input_ids_comp.tolist()


def test_prefix_constrained_logits_processor() -> None:
    """test_prefix_constrained_logits_processor."""
    input_ids = torch.tensor([[0, 1, 3, 1], [0, 1, 0, 1]])
    scores = uniform(2, 5)
    filtered = PrefixAllowedTokens(lambda batch_id, ids: [[0, 1], [2, 3]][batch_id], 1)(input_ids, scores)
    assert torch.isinf(filtered).tolist() == [[False, False, True, True, True], [True, True, False, False, True]]
    with pytest.raises(ValueError, match="returned no token ids for batch_id 0"):  # a ConfigError is a ValueError
        PrefixAllowedTokens(lambda batch_id, ids: [], 1)(input_ids, scores)
    assert not torch.all(scores == filtered)


def test_prefix_constrained_logits_processor_with_beams() -> None:
    """PrefixConstrainedLogitsProcessor's ``num_beams``: rows ``2b`` and ``2b + 1`` are batch ``b``."""
    seen = []
    processor = PrefixAllowedTokens(lambda batch_id, ids: seen.append((batch_id, ids.tolist())) or [batch_id], num_beams=2)
    out = processor(torch.tensor([[5], [6], [7], [8]]), uniform(4, 3))
    assert seen == [(0, [5]), (0, [6]), (1, [7]), (1, [8])]
    assert (out > INF).nonzero()[:, 1].tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("eos_token_id", [0, [0, 18]])
def test_new_min_length_dist_processor(eos_token_id) -> None:
    """test_new_min_length_dist_processor: a 5-token prompt (``begin``), min_new_tokens=3."""
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, 18, (4, 5), generator=gen)
    processor = MinNewTokens(3, eos_token_id=eos_token_id)
    processor.begin(prompt)
    eos = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    expected_banned = 4 * len(eos) * [INF]

    def at_length(n: int) -> torch.Tensor:
        return processor(torch.randint(1, 18, (4, n), generator=gen), uniform(4, 20))

    for n in (5, 2, 6, 7):  # the prompt itself, shorter, 1 and 2 new tokens: EOS held back
        assert at_length(n)[:, eos].flatten().tolist() == expected_banned, n
    for n in (8, 15):  # 3 and more new tokens: no longer
        assert not torch.isinf(at_length(n)).any(), n
