"""Each filter means what it says: the law of every built-in processor, checked with Hypothesis."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decodekit import ConfigError, ProcessorChain
from decodekit.processors import (
    BadWords,
    BanSkippedWarning,
    EpsilonCutoff,
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
from decodekit.processors.truncation import TopKTopP
from decodekit.random import RowRandom
from decodekit.samplers import Multinomial
from decodekit.testing import Case, cases, logits

F32 = (torch.float32,)
NEG_INF = float("-inf")
fast = settings(max_examples=80, deadline=None)


def kept(x: torch.Tensor) -> torch.Tensor:
    return x != NEG_INF


@fast
@given(case=cases(dtypes=F32), k=st.integers(1, 60))
def test_top_k_keeps_the_k_largest_and_their_ties(case: Case, k: int) -> None:
    x = case.logits
    out = TopK(k)(case.input_ids, x)
    kth = torch.topk(x, min(k, x.shape[-1]), dim=-1).values[:, -1:]
    assert torch.equal(kept(out), (x >= kth) & kept(x))
    assert torch.equal(out[kept(out)], x[kept(out)])  # kept values unchanged


@fast
@given(case=cases(dtypes=F32), p=st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_top_set_reaching_p(case: Case, p: float) -> None:
    x = case.logits
    out = TopP(p)(case.input_ids, x)
    probs = x.softmax(-1)
    for row in range(x.shape[0]):
        keep = kept(out[row])
        mass = probs[row][keep].sum().item()
        smallest_kept = x[row][keep].min()
        # the kept set is a top set: everything at least as likely as a kept token is kept
        assert torch.equal(keep, x[row] >= smallest_kept)
        # it reaches p (within float error) ...
        assert mass >= p - 1e-5 or keep.sum() == x.shape[-1]
        # ... and without its least likely value(s) it would not
        without = probs[row][x[row] > smallest_kept].sum().item()
        assert without < p + 1e-5


@fast
@given(case=cases(dtypes=F32), k=st.integers(1, 60), p=st.floats(0.05, 1.0))
def test_fused_top_k_top_p_equals_the_two_in_turn(case: Case, k: int, p: float) -> None:
    x = case.logits
    fused = TopKTopP(TopK(k), TopP(p))(case.input_ids, x)
    staged = TopP(p)(case.input_ids, TopK(k)(case.input_ids, x))
    # equal up to float rounding at the exact nucleus boundary: compare kept sets on clear cases
    probs = TopK(k)(case.input_ids, x).softmax(-1)
    sorted_probs = probs.sort(-1).values
    cum = sorted_probs.cumsum(-1)
    near_boundary = ((cum - (1 - p)).abs() < 1e-5).any()
    if not near_boundary:
        assert torch.equal(kept(fused), kept(staged))


def test_chain_fuses_top_k_then_top_p() -> None:
    chain = TopK(5) | TopP(0.9)
    assert isinstance(chain._steps[0], TopKTopP)
    x = torch.randn(8, 1000)
    ids = torch.zeros(8, 1, dtype=torch.long)
    assert torch.equal(chain(ids, x), TopP(0.9)(ids, TopK(5)(ids, x)))


@fast
@given(case=cases(dtypes=F32), min_p=st.floats(0.0, 1.0))
def test_min_p_threshold(case: Case, min_p: float) -> None:
    x = case.logits
    out = MinP(min_p)(case.input_ids, x)
    probs = x.softmax(-1)
    expected = (probs >= min_p * probs.amax(-1, keepdim=True)) | (x == x.amax(-1, keepdim=True))
    assert torch.equal(kept(out), expected & kept(x))


@fast
@given(case=cases(dtypes=F32), eps=st.floats(1e-6, 0.5))
def test_epsilon_cutoff_removes_only_unlikely_tokens(case: Case, eps: float) -> None:
    x = case.logits
    out = EpsilonCutoff(eps)(case.input_ids, x)
    probs = x.softmax(-1)
    removed = kept(x) & ~kept(out)
    assert (probs[removed] < eps).all()
    assert kept(out).gather(-1, x.argmax(-1, keepdim=True)).all()


@fast
@given(case=cases(dtypes=F32), mass=st.floats(0.05, 1.0))
def test_typical_p_keeps_tokens_closest_to_the_entropy(case: Case, mass: float) -> None:
    x = case.logits
    out = TypicalP(mass)(case.input_ids, x)
    logp = x.log_softmax(-1)
    entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
    distance = (-logp - entropy).abs()
    for row in range(x.shape[0]):
        keep = kept(out[row])
        # the kept set is a "most typical" set: nothing dropped is closer to the entropy
        dropped = distance[row][kept(x[row]) & ~keep]
        if dropped.numel():
            assert distance[row][keep].max() <= dropped.min()


@fast
@given(case=cases(dtypes=F32), n=st.floats(0.1, 4.0))
def test_top_n_sigma_threshold(case: Case, n: float) -> None:
    x = case.logits.double()
    out = TopNSigma(n)(case.input_ids, case.logits)
    finite = torch.isfinite(x)
    for row in range(x.shape[0]):
        vals = x[row][finite[row]]
        if vals.abs().max() > 1e15:
            continue  # variance overflows float32; the filter then keeps every token
        threshold = vals.max() - n * vals.std(unbiased=False)
        clear = (x[row] - threshold).abs() > 1e-3 * (1 + threshold.abs())
        assert torch.equal(kept(out[row])[clear], (x[row] >= threshold)[clear])


@fast
@given(case=cases(dtypes=F32), t=st.floats(0.01, 10.0))
def test_temperature_keeps_the_argmax_and_the_order(case: Case, t: float) -> None:
    x = case.logits
    out = Temperature(t)(case.input_ids, x)
    # the old argmax is still a maximum (dividing can underflow a denormal to zero: a tie, never a loss)
    assert torch.equal(out.gather(-1, x.argmax(-1, keepdim=True)).squeeze(-1), out.max(-1).values)
    assert torch.equal(kept(out), kept(x))


def test_temperature_zero_is_greedy() -> None:
    x = torch.randn(16, 50)
    out = Temperature(0)(torch.zeros(16, 1, dtype=torch.long), x)
    assert torch.equal(kept(out).sum(-1), torch.ones(16, dtype=torch.long))
    tokens = Multinomial()(None, out, RowRandom(torch.arange(16)))
    assert torch.equal(tokens, x.argmax(-1))


@fast
@given(case=cases(dtypes=F32), r=st.floats(0.1, 5.0))
def test_repetition_penalty_touches_only_tokens_in_the_history(case: Case, r: float) -> None:
    x = case.logits
    out = RepetitionPenalty(r)(case.input_ids, x)
    in_history = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, case.input_ids, True)
    assert torch.equal(out[~in_history], x[~in_history])
    if r > 1:  # discouraged: never more likely than before
        changed = in_history & kept(x)
        assert (out[changed] <= x[changed]).all()


@fast
@given(case=cases(dtypes=F32), alpha=st.floats(-2, 2), prompt=st.integers(0, 12))
def test_presence_and_frequency_penalties_touch_only_generated_tokens(case: Case, alpha: float, prompt: int) -> None:
    x, ids = case.logits, case.input_ids
    prompt = min(prompt, ids.shape[1])
    generated = ids[:, prompt:]
    counts = torch.zeros_like(x).scatter_add_(-1, generated, torch.ones_like(generated, dtype=x.dtype))
    for proc, expected in (
        (PresencePenalty(alpha), x - alpha * (counts > 0).float()),
        (FrequencyPenalty(alpha), x - alpha * counts),
    ):
        proc.begin(ids[:, :prompt])
        out = proc(ids, x)
        finite = kept(x) & (x.abs() < 1e6)
        assert torch.allclose(out[finite], expected[finite], atol=1e-4)
        assert torch.equal(out[counts == 0], x[counts == 0])


def test_no_repeat_ngram_bans_completing_a_seen_ngram() -> None:
    ids = torch.tensor([[1, 2, 3, 1, 2], [5, 5, 5, 5, 5]])
    out = NoRepeatNGram(3)(ids, torch.zeros(2, 8))
    assert out[0, 3] == NEG_INF and kept(out[0]).sum() == 7  # "1 2" was followed by 3
    assert out[1, 5] == NEG_INF and kept(out[1]).sum() == 7
    out1 = NoRepeatNGram(1)(ids, torch.zeros(2, 8))
    assert torch.equal(kept(out1[0]), torch.tensor([True, False, False, False, True, True, True, True]))


@pytest.mark.filterwarnings("ignore::decodekit.processors.BanSkippedWarning")  # n = 1 may ban all 4
@fast
@given(ids=st.lists(st.integers(0, 3), min_size=1, max_size=14), n=st.integers(1, 4))
def test_no_repeat_ngram_never_lets_an_ngram_repeat(ids: list[int], n: int) -> None:
    history = torch.tensor([ids])
    out = NoRepeatNGram(n)(history, torch.zeros(1, 4))
    seen = {tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)}
    for token in range(4):
        candidate = tuple((ids + [token])[-n:])
        if len(ids) + 1 >= n and candidate in seen and kept(out[0]).sum() > 0:
            assert out[0, token] == NEG_INF or kept(out[0]).all()


@pytest.mark.filterwarnings("ignore::decodekit.processors.BanSkippedWarning")  # rows the bans would empty
@fast
@given(case=cases(dtypes=F32), seed=st.integers(0, 1000))
def test_bad_words_are_never_sampled(case: Case, seed: int) -> None:
    v = case.vocab_size
    if v < 3:
        return
    ids = case.input_ids
    seqs = [[v - 1], [int(ids[0, -1]), 1]]
    out = BadWords(seqs)(ids, case.logits)
    tokens = Multinomial()(ids, out, RowRandom(torch.arange(ids.shape[0]) + seed))
    # banned in row b: v - 1 always; 1 where the row ends with the first token of [last, 1]
    banned = torch.zeros(ids.shape[0], v, dtype=torch.bool)
    banned[:, v - 1] = True
    banned[:, 1] = ids[:, -1] == ids[0, -1]
    has_other = (kept(case.logits) & ~banned).any(-1)  # else the ban is skipped for the row
    drew_banned = banned.gather(1, tokens[:, None]).squeeze(1)
    assert not (drew_banned & has_other).any()


def test_bad_words_multi_token_prefix_match() -> None:
    bw = BadWords([[4, 5, 6], [7]])
    x = torch.zeros(2, 10)
    out = bw(torch.tensor([[1, 4, 5], [4, 5, 1]]), x)
    assert out[0, 6] == NEG_INF and out[0, 7] == NEG_INF
    assert out[1, 6] == 0 and out[1, 7] == NEG_INF


def test_logit_bias_and_min_new_tokens() -> None:
    x = torch.zeros(1, 5)
    ids = torch.zeros(1, 3, dtype=torch.long)
    assert LogitBias({2: 3.0})(ids, x)[0, 2] == 3.0
    m = MinNewTokens(2, eos_token_id=4)
    m.begin(ids[:, :2])  # one token generated so far
    assert m(ids, x)[0, 4] == NEG_INF
    m.begin(ids[:, :1])  # two generated
    assert m(ids, x)[0, 4] == 0.0
    only_eos = torch.tensor([[NEG_INF, NEG_INF, NEG_INF, NEG_INF, 1.0]])
    with pytest.warns(BanSkippedWarning, match=r"min_new_tokens: .* row\(s\) \[0\]"):
        assert m(torch.zeros(1, 1, dtype=torch.long), only_eos)[0, 4] == 1.0  # never empties a row


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Temperature(-1), "temperature=-1"),
        (lambda: TopP(1.5), "top_p=1.5"),
        (lambda: TopP(-0.1), "top_p=-0.1"),
        (lambda: TopK(-2), "top_k=-2"),
        (lambda: RepetitionPenalty(0), "repetition_penalty=0"),
        (lambda: NoRepeatNGram(-1), "no_repeat_ngram_size=-1"),
        (lambda: MinP(2), "min_p=2"),
        (lambda: LogitBias({1: 500}), "logit_bias"),
    ],
)
def test_bad_parameters_name_the_setting(make, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.filterwarnings("ignore::decodekit.processors.BanSkippedWarning")  # rows with token 0 alone
@fast
@given(x=logits(vocab=st.integers(2, 48)))  # a ban of token 0 in a vocabulary of 1 is refused
def test_chain_of_everything_keeps_a_token(x: torch.Tensor) -> None:
    ids = torch.zeros(x.shape[0], 3, dtype=torch.long)
    chain = ProcessorChain(
        [RepetitionPenalty(1.3), NoRepeatNGram(2), BadWords([[0]]), Temperature(0.7), TopK(5), TopP(0.8), MinP(0.1), TypicalP(0.9)]
    )
    out = chain(ids, x)
    assert torch.isfinite(out).any(-1).all()
    assert not torch.isnan(out).any()
