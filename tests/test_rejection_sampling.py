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


def test_same_draw_same_token_as_the_sort_based_path() -> None:
    torch.manual_seed(1)
    logits = torch.randn(512, 300) * 2
    for p in (0.5, 0.9, 0.99):
        fast = sample_top_p(logits, p, RowRandom(torch.arange(512)))
        slow = Multinomial()(None, TopP(p)(None, logits), RowRandom(torch.arange(512)))
        assert (fast == slow).float().mean() > 0.995  # differ only by rounding at the nucleus edge


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
