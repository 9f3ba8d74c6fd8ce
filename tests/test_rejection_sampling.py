"""Sorting-free top-p sampling draws the same distribution as TopP then Multinomial."""

from __future__ import annotations

import torch
from hypothesis import given, settings

from decodekit import generate
from decodekit.models.gpt import GPT, GPTConfig
from decodekit.processors import Temperature, TopP
from decodekit.random import RowRandom
from decodekit.samplers import Multinomial
from decodekit.samplers.rejection import sample_top_p
from decodekit.testing import Case, cases


@settings(max_examples=60, deadline=None)
@given(case=cases(dtypes=(torch.float32,)))
def test_rejection_draws_only_from_the_nucleus(case: Case) -> None:
    for p in (0.3, 0.9):
        nucleus = TopP(p)(case.input_ids, case.logits)
        tokens = sample_top_p(case.logits, p, RowRandom(torch.arange(case.logits.shape[0])))
        assert torch.isfinite(nucleus.gather(-1, tokens[:, None])).all()


def test_rejection_and_sort_based_paths_have_the_same_distribution() -> None:
    torch.manual_seed(0)
    logits = (torch.randn(1, 40) * 2).expand(20000, 40)
    seeds = torch.arange(20000)
    rejection = sample_top_p(logits, 0.8, RowRandom(seeds))
    sort_based = Multinomial()(None, TopP(0.8)(None, logits), RowRandom(seeds + 10**6))
    expected = TopP(0.8)(None, logits[:1]).softmax(-1)[0]
    for tokens in (rejection, sort_based):
        freq = torch.bincount(tokens, minlength=40).float() / len(tokens)
        assert (freq - expected).abs().max() < 0.012  # ~4 standard errors at n = 20000
        assert (freq[expected == 0] == 0).all()


def test_generate_uses_it_and_stays_reproducible_and_batch_independent() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50, n_layer=1, n_head=2, n_embd=32)).eval()
    chain = Temperature(1.3) | TopP(0.7)
    prompts = torch.tensor([[1, 2], [3, 4], [5, 6]])
    a = generate(model, prompts, processors=chain, sampler=Multinomial(), max_new_tokens=12, seed=[7, 8, 9])
    b = generate(model, prompts[1:2], processors=chain, sampler=Multinomial(), max_new_tokens=12, seed=[8])
    assert torch.equal(a.tokens[1], b.tokens[0])
    scored = generate(model, prompts, processors=chain, sampler=Multinomial(), max_new_tokens=12, seed=[7, 8, 9], output_scores=True)
    for t, s in enumerate(scored.scores):  # the sort-based path, with scores: also only nucleus tokens
        assert torch.isfinite(s.gather(-1, scored.tokens[:, t : t + 1])).all()


def test_each_round_setting_draws_the_nucleus_distribution() -> None:
    """Rejection with the default rounds, with one round (then the fallback), and the fallback
    alone (0 rounds) all draw softmax over the nucleus, on skewed and on flat rows."""
    torch.manual_seed(1)
    n = 20000
    for scale, p in ((3.0, 0.5), (0.5, 0.9), (2.0, 0.99)):
        logits = (torch.randn(1, 60) * scale).expand(n, 60)
        expected = TopP(p)(None, logits[:1]).softmax(-1)[0]
        for rounds in (8, 1, 0):
            tokens = sample_top_p(logits, p, RowRandom(torch.arange(n) + 1000 * rounds), rounds=rounds)
            freq = torch.bincount(tokens, minlength=60).float() / n
            assert (freq[expected == 0] == 0).all(), (scale, p, rounds)
            assert ((freq - expected).abs() <= 4.5 * (expected * (1 - expected) / n).sqrt() + 1e-4).all(), (scale, p, rounds)


def test_sample_probs_draws_in_proportion_and_never_a_zero_weight() -> None:
    from decodekit.samplers.base import sample_probs

    torch.manual_seed(2)
    n = 50000
    for v in (7, 256, 700):  # less than, exactly, and not a multiple of one block
        weights = torch.rand(v) ** 4
        weights[::5] = 0
        u = RowRandom(torch.arange(n)).uniform(2)
        freq = torch.bincount(sample_probs(weights.expand(n, v), u), minlength=v).float() / n
        expected = weights / weights.sum()
        assert (freq[weights == 0] == 0).all()
        assert ((freq - expected).abs() <= 4.5 * (expected * (1 - expected) / n).sqrt() + 1e-4).all()
    one = torch.tensor([[0.0, 0.0, 2.0, 0.0]])
    for edge in (1e-30, 0.5, 1.0):  # the ends of the uniforms' range still give the one token
        assert sample_probs(one, torch.full((1, 2), edge)).item() == 2


def test_multinomial_draws_softmax() -> None:
    torch.manual_seed(3)
    n = 20000
    logits = (torch.randn(1, 40) * 2).expand(n, 40).clone()
    logits[:, 5] = float("-inf")
    freq = torch.bincount(Multinomial()(None, logits, RowRandom(torch.arange(n))), minlength=40).float() / n
    expected = logits[0].softmax(-1)
    assert freq[5] == 0
    assert ((freq - expected).abs() <= 4.5 * (expected * (1 - expected) / n).sqrt() + 1e-4).all()


@settings(max_examples=200, deadline=None)
@given(case=cases(dtypes=(torch.float32, torch.float16, torch.bfloat16)))
def test_the_vectorised_argmax_is_torch_argmax(case: Case) -> None:
    """decodekit.samplers.base.argmax (amax-based on CPU) picks the first maximum, as argmax does."""
    from decodekit.samplers.base import argmax

    logits = case.logits
    assert torch.equal(argmax(logits), logits.argmax(dim=-1))
    ties = logits.round()  # many exact ties
    assert torch.equal(argmax(ties), ties.argmax(dim=-1))
    empty = torch.full_like(logits, float("-inf"))  # an invalid row still gives an index in range
    assert torch.equal(argmax(empty), torch.zeros(logits.shape[0], dtype=torch.long))


def test_cpu_rounds_on_undecided_rows_equal_the_no_sync_rounds_on_all_rows() -> None:
    """Given the same uniforms, running the rounds on the undecided rows only (CPU) and on every
    row (accelerators, no sync) gives the same token in every row, with or without the fallback."""
    import decodekit.samplers.rejection as rejection

    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        logits = torch.randn(8, 500, generator=g) * float(torch.rand(1, generator=g) * 6)
        p = float(torch.rand(1, generator=g)) * 0.98 + 0.01
        probs = logits.softmax(dim=-1)
        rng = RowRandom(torch.arange(8) + trial)
        uniforms = [rng.uniform(2) for _ in range(9)]
        for rounds in (0, 1, 2, 8):
            shrinking = rejection._rounds_shrinking(logits, probs, uniforms.__getitem__, p, rounds)
            all_rows = rejection._rounds_all_rows(logits, probs, uniforms.__getitem__, p, rounds)
            assert torch.equal(shrinking, all_rows), (trial, rounds)
            assert torch.isfinite(TopP(p)(None, logits).gather(-1, shrinking[:, None])).all()
