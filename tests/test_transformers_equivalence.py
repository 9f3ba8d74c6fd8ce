"""Each processor against transformers' counterpart on the same inputs (transformers is optional)."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from decodekit import ProcessorChain

from decodekit.processors import (
    BadWords,
    BanSkippedWarning,
    EpsilonCutoff,
    EtaCutoff,
    LogitBias,
    MinNewTokens,
    MinP,
    NoRepeatNGram,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    TypicalP,
)

lp = pytest.importorskip("transformers.generation.logits_process")

V = 300


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, V, generator=g) * 3
    logits[1, :] = 0.5  # a row of equal values
    logits[2, ::7] = float("-inf")  # some tokens already removed
    ids = torch.randint(0, 40, (6, 12), generator=g)
    return ids, logits


def _same_distribution(ours: torch.Tensor, theirs: torch.Tensor, tied_row: int | None = None) -> None:
    """Same removed tokens and log-probabilities.

    ``tied_row`` holds only equal values: where transformers cuts a group of ties at an arbitrary
    point of its sort, we keep the whole group (documented in ``TopP``), so there ours keeps a
    superset of theirs.
    """
    if tied_row is not None:
        ours_kept, theirs_kept = ours[tied_row] != float("-inf"), theirs[tied_row] != float("-inf")
        assert (theirs_kept <= ours_kept).all()
        rows = [r for r in range(ours.shape[0]) if r != tied_row]
        ours, theirs = ours[rows], theirs[rows]
    assert torch.equal(ours == float("-inf"), theirs == float("-inf")), "different tokens removed"
    assert torch.allclose(ours.log_softmax(-1), theirs.log_softmax(-1), atol=1e-5, equal_nan=True)


CASES = [
    (lambda: Temperature(0.7), lambda: lp.TemperatureLogitsWarper(0.7)),
    (lambda: Temperature(1.6), lambda: lp.TemperatureLogitsWarper(1.6)),
    (lambda: TopK(1), lambda: lp.TopKLogitsWarper(1)),
    (lambda: TopK(20), lambda: lp.TopKLogitsWarper(20)),
    (lambda: TopK(20, min_tokens_to_keep=30), lambda: lp.TopKLogitsWarper(20, min_tokens_to_keep=30)),
    (lambda: TopP(0.3), lambda: lp.TopPLogitsWarper(0.3)),
    (lambda: TopP(0.9), lambda: lp.TopPLogitsWarper(0.9)),
    (lambda: TopP(0.9, min_tokens_to_keep=5), lambda: lp.TopPLogitsWarper(0.9, min_tokens_to_keep=5)),
    (lambda: MinP(0.05), lambda: lp.MinPLogitsWarper(0.05)),
    (lambda: MinP(0.3, min_tokens_to_keep=3), lambda: lp.MinPLogitsWarper(0.3, min_tokens_to_keep=3)),
    (lambda: TypicalP(0.5), lambda: lp.TypicalLogitsWarper(0.5)),
    (lambda: TypicalP(0.95), lambda: lp.TypicalLogitsWarper(0.95)),
    (lambda: EpsilonCutoff(3e-3), lambda: lp.EpsilonLogitsWarper(3e-3)),
    (lambda: EtaCutoff(2e-3), lambda: lp.EtaLogitsWarper(2e-3)),
    (lambda: RepetitionPenalty(1.3), lambda: lp.RepetitionPenaltyLogitsProcessor(1.3)),
    (lambda: RepetitionPenalty(0.7), lambda: lp.RepetitionPenaltyLogitsProcessor(0.7)),
    (lambda: NoRepeatNGram(1), lambda: lp.NoRepeatNGramLogitsProcessor(1)),
    (lambda: NoRepeatNGram(2), lambda: lp.NoRepeatNGramLogitsProcessor(2)),
    (lambda: NoRepeatNGram(3), lambda: lp.NoRepeatNGramLogitsProcessor(3)),
    (lambda: BadWords([[5], [7, 8], [1, 2, 3]]), lambda: lp.NoBadWordsLogitsProcessor([[5], [7, 8], [1, 2, 3]], eos_token_id=299)),
]


@pytest.mark.parametrize("ours, theirs", CASES, ids=[repr(o()) for o, _ in CASES])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_processor_matches_transformers(ours, theirs, seed: int) -> None:
    ids, logits = _inputs(seed)
    if isinstance(ours(), NoRepeatNGram | BadWords):
        ids = torch.tensor([[1, 2, 3, 1, 2, 7, 1, 2] + [4] * 4] * 6)  # histories with repeats and prefixes
    tied_row = 1 if isinstance(ours(), TopP) else None
    _same_distribution(ours()(ids, logits), theirs()(ids, logits.clone()), tied_row)


def test_min_new_tokens_matches_transformers() -> None:
    ids, logits = _inputs(0)
    for prompt_len in (4, 11, 12):
        ours = MinNewTokens(3, eos_token_id=[9, 10])
        ours.begin(ids[:, :prompt_len])
        theirs = lp.MinNewTokensLengthLogitsProcessor(prompt_len, 3, [9, 10])
        _same_distribution(ours(ids, logits), theirs(ids, logits.clone()))


def test_transformers_processors_run_in_our_chain() -> None:
    from decodekit import ProcessorChain

    ids, logits = _inputs(3)
    chain = ProcessorChain([lp.RepetitionPenaltyLogitsProcessor(1.2), Temperature(0.8), lp.TopKLogitsWarper(10)])
    expected = TopK(10)(ids, Temperature(0.8)(ids, RepetitionPenalty(1.2)(ids, logits)))
    _same_distribution(chain(ids, logits), expected)


def test_full_chain_matches_transformers_list() -> None:
    ids, logits = _inputs(4)
    ours = RepetitionPenalty(1.2) | Temperature(0.8) | TopK(50) | TopP(0.9)
    theirs = lp.LogitsProcessorList(
        [lp.RepetitionPenaltyLogitsProcessor(1.2), lp.TemperatureLogitsWarper(0.8), lp.TopKLogitsWarper(50), lp.TopPLogitsWarper(0.9)]
    )
    _same_distribution(ours(ids, logits), theirs(ids, logits.clone()), tied_row=1)


def test_logit_bias_matches_sequence_bias_with_one_token_sequences() -> None:
    ids, logits = _inputs(5)
    ours = LogitBias({3: 2.5, 17: -4.0, 250: 100.0})
    theirs = lp.SequenceBiasLogitsProcessor(sequence_bias=[[[3], 2.5], [[17], -4.0], [[250], 100.0]])
    _same_distribution(ours(ids, logits), theirs(ids, logits.clone()))


# --- chains of built-ins in any order --------------------------------------------------------

# (ours, theirs) for every built-in with a transformers counterpart, sign-dependent ones included
PAIRS = {
    "temperature": (lambda: Temperature(0.6), lambda: lp.TemperatureLogitsWarper(0.6)),
    "hot": (lambda: Temperature(1.7), lambda: lp.TemperatureLogitsWarper(1.7)),
    "top_k": (lambda: TopK(40), lambda: lp.TopKLogitsWarper(40)),
    "top_p": (lambda: TopP(0.85), lambda: lp.TopPLogitsWarper(0.85)),
    "min_p": (lambda: MinP(0.02), lambda: lp.MinPLogitsWarper(0.02)),
    "typical_p": (lambda: TypicalP(0.9), lambda: lp.TypicalLogitsWarper(0.9)),
    "epsilon": (lambda: EpsilonCutoff(1e-4), lambda: lp.EpsilonLogitsWarper(1e-4)),
    "eta": (lambda: EtaCutoff(1e-4), lambda: lp.EtaLogitsWarper(1e-4)),
    "repetition": (lambda: RepetitionPenalty(1.5), lambda: lp.RepetitionPenaltyLogitsProcessor(1.5)),
    "encouraging": (lambda: RepetitionPenalty(0.8), lambda: lp.RepetitionPenaltyLogitsProcessor(0.8)),
    "no_repeat": (lambda: NoRepeatNGram(2), lambda: lp.NoRepeatNGramLogitsProcessor(2)),
    "bad_words": (lambda: BadWords([[5], [2, 9]]), lambda: lp.NoBadWordsLogitsProcessor([[5], [2, 9]], eos_token_id=299)),
    "logit_bias": (
        lambda: LogitBias({3: 4.0, 11: -3.0}),
        lambda: lp.SequenceBiasLogitsProcessor(sequence_bias=[[[3], 4.0], [[11], -3.0]]),
    ),
}


@settings(max_examples=150, deadline=None)
@given(
    names=st.lists(st.sampled_from(sorted(PAIRS)), min_size=2, max_size=6, unique=True).flatmap(st.permutations),
    seed=st.integers(0, 2**16),
)
def test_chains_of_builtins_in_any_order_give_transformers_distribution(names: list[str], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, V, generator=g) * 4 + 1  # no ties; positive and negative logits
    ids = torch.randint(0, 20, (4, 10), generator=g)
    ours = ProcessorChain([PAIRS[n][0]() for n in names])
    theirs = lp.LogitsProcessorList([PAIRS[n][1]() for n in names])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mine = ours(ids, logits)
    # a ban that would empty a row is skipped here (and said); transformers empties the row: not comparable
    assume(not any(issubclass(w.category, BanSkippedWarning) for w in caught))
    reference = theirs(ids, logits.clone())
    assert torch.equal(mine == float("-inf"), reference == float("-inf")), f"{names}: different tokens removed"
    assert torch.allclose(mine.softmax(-1), reference.softmax(-1), atol=1e-6, rtol=1e-5), names
