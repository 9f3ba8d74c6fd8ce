"""Per-row settings: every row of a batched call is exactly that row processed alone with its own values."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decodekit import ConfigError, build_chain
from decodekit.processors import (
    BadWords,
    LogitBias,
    EpsilonCutoff,
    EtaCutoff,
    FrequencyPenalty,
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
from decodekit.processors.base import BuildContext, ProcessorChain
from decodekit.registry import build_row_chain
from decodekit.testing import logits as logits_strategy

# drawn histories may leave a ban nothing else to remove: allowed, and said on CPU
pytestmark = pytest.mark.filterwarnings("ignore::decodekit.processors.BanSkippedWarning")

# each per-row built-in: (class, extra constructor kwargs, values a row may take; the first is off)
ROW_BUILTINS = {
    "temperature": (Temperature, {}, st.sampled_from([1.0, 0.0, 0.3, 0.7, 1.5, 1e-30])),
    "top_k": (TopK, {}, st.sampled_from([0, -1, 1, 2, 5, 60])),
    "top_p": (TopP, {}, st.sampled_from([1.0, 0.0, 0.3, 0.8, 0.95])),
    "min_p": (MinP, {}, st.sampled_from([0.0, 0.05, 0.3, 1.0])),
    "typical_p": (TypicalP, {}, st.sampled_from([1.0, 0.2, 0.9])),
    "epsilon_cutoff": (EpsilonCutoff, {}, st.sampled_from([0.0, 1e-3, 0.2])),
    "eta_cutoff": (EtaCutoff, {}, st.sampled_from([0.0, 1e-3, 0.2])),
    "top_n_sigma": (TopNSigma, {}, st.sampled_from([0.0, -1.0, 0.5, 2.0])),
    "repetition_penalty": (RepetitionPenalty, {}, st.sampled_from([1.0, 1.3, 0.7, 1e30])),
    "presence_penalty": (PresencePenalty, {}, st.sampled_from([0.0, 0.5, -2.0])),
    "frequency_penalty": (FrequencyPenalty, {}, st.sampled_from([0.0, 0.5, -1.0])),
    "no_repeat_ngram_size": (NoRepeatNGram, {}, st.sampled_from([0, 1, 2, 3])),
    "min_new_tokens": (MinNewTokens, {"eos_token_id": [0, 2]}, st.sampled_from([0, 1, 3, 50])),
}


@st.composite
def padded_history(draw: st.DrawFn, batch: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompts [B, T0], history [B, T])``, rows right-aligned and left-padded with -1."""
    lengths = draw(st.lists(st.integers(1, 6), min_size=batch, max_size=batch))
    t0 = max(lengths)
    new = draw(st.integers(0, 5))
    rows = [draw(st.lists(st.integers(0, min(vocab - 1, 5)), min_size=n + new, max_size=n + new)) for n in lengths]
    history = torch.tensor([[-1] * (t0 - n) + r for n, r in zip(lengths, rows)])
    return history[:, :t0], history


def _alone(history: torch.Tensor, prompt: torch.Tensor, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``row`` as it would be decoded alone: no padding."""
    return prompt[row][prompt[row] >= 0][None], history[row][history[row] >= 0][None]


def _run(processor, prompt: torch.Tensor, history: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if hasattr(processor, "begin"):
        processor.begin(prompt)
    return processor(history, x)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(ROW_BUILTINS)))
def test_each_row_equals_the_row_alone_with_its_own_value(data: st.DataObject, name: str) -> None:
    cls, extra, values = ROW_BUILTINS[name]
    x = data.draw(logits_strategy(batch=st.integers(1, 5)))
    b, v = x.shape
    row_values = data.draw(st.lists(values, min_size=b, max_size=b))
    prompt, history = data.draw(padded_history(b, v))
    batched = _run(cls(row_values, **extra), prompt, history, x)
    for row, value in enumerate(row_values):
        alone = _run(cls(value, **extra), *_alone(history, prompt, row), x[row : row + 1])
        # bitwise: every per-row step is elementwise or a reduction within the row
        assert torch.equal(batched[row : row + 1], alone), f"{name}: row {row} ({value!r}) differs from alone"
        off = cls.row_params[next(iter(cls.row_params))]
        if value == off:
            assert torch.equal(batched[row], x[row]), f"{name}: off row {row} changed"


# settings whose values name token ids (below 3: the chain test's vocabulary has at least 3; EOS is 0 and 2)
ROW_BANS = {
    "bad_words": st.sampled_from([[], [[1]], [[0, 2], [1, 1]]]),
    "logit_bias": st.sampled_from([{}, {1: 2.0}, {0: -5.0, 2: 1.0}]),
}


@st.composite
def row_settings(draw: st.DrawFn) -> dict:
    values = {**{n: v[2] for n, v in ROW_BUILTINS.items()}, **ROW_BANS}
    names = draw(st.lists(st.sampled_from(sorted(values)), max_size=5, unique=True))
    return {n: draw(values[n]) for n in names}


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_a_row_chain_gives_each_row_its_own_chain(data: st.DataObject) -> None:
    x = data.draw(logits_strategy(batch=st.integers(1, 4), vocab=st.integers(3, 40)))
    b, v = x.shape
    rows = data.draw(st.lists(row_settings(), min_size=b, max_size=b))
    prompt, history = data.draw(padded_history(b, v))
    context = BuildContext(eos_token_id=[0, 2])
    batched = _run(build_row_chain(rows, context=context), prompt, history, x)
    for row, own in enumerate(rows):
        alone = _run(build_chain(own, context=context), *_alone(history, prompt, row), x[row : row + 1])
        assert torch.equal(batched[row : row + 1], alone), f"row {row} {own} differs from its chain alone"


def test_reorder_takes_rows_and_assign_admits_new_ones() -> None:
    x = torch.randn(3, 30)
    prompt = torch.tensor([[-1, 4, 5], [1, 2, 3], [-1, -1, 7]])
    chain = build_row_chain([{"top_k": 2, "presence_penalty": 1.0}, {"temperature": 0.5}, {"top_p": 0.5}])
    chain.begin(prompt)
    history = torch.cat([prompt, torch.tensor([[4], [9], [7]])], dim=-1)
    expected = chain(history, x)
    index = torch.tensor([2, 0, 0])
    chain.reorder(index)
    assert torch.equal(chain(history[index], x[index]), expected[index])
    # admit a request into slot 1: its result is what it gets alone
    def newcomer() -> ProcessorChain:  # same structure as the running chain, values of the new row
        chain = ProcessorChain([PresencePenalty([0.0]), Temperature([1.0]), TopK([3]), TopP([0.9])])
        chain.begin(torch.tensor([[8, 8]]))
        return chain

    fresh = newcomer()
    chain.assign(torch.tensor([1]), newcomer())
    assert chain[0].active  # recomputed on assign
    history = torch.tensor([[-1, -1, 7, 7], [-1, 8, 8, 1], [-1, 4, 5, 4]])
    out = chain(history, x)
    assert torch.equal(out[1:2], fresh(torch.tensor([[8, 8, 1]]), x[1:2]))


def test_active_flags_skip_processors_whose_rows_are_all_off() -> None:
    p = TopP([1.0, 1.0])
    assert not p.active and TopP([1.0, 0.5]).active
    p.assign(torch.tensor([0]), TopP([0.5]))
    assert p.active


def test_per_row_errors_name_the_row_and_the_batch_size() -> None:
    with pytest.raises(ConfigError, match=r"^row 2: top_p=1.5 is not allowed: must be <= 1.0$"):
        TopP([0.5, 1.0, 1.5])
    with pytest.raises(ConfigError, match=r"^row 1: top_k=True is not allowed"):
        TopK([3, True])
    with pytest.raises(ConfigError, match=r"^row 3: top_p=1.5 is not allowed"):
        build_row_chain([{}, {}, {"top_p": 0.5}, {"top_p": 1.5}])
    with pytest.raises(ConfigError, match=r"built with per-row values for 2 rows, called with a batch of 3"):
        Temperature([0.5, 1.0])(torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 4))
    with pytest.raises(ConfigError, match=r"eos_length_penalty takes no per-row values"):
        build_row_chain([{"eos_length_target": 3}, {}], context=BuildContext(eos_token_id=0))
    with pytest.raises(ConfigError, match=r"^row 1: bad_words: token ids must be integers >= 0"):
        BadWords([[[1]], [[2, -3]]])
    with pytest.raises(ConfigError, match=r"^row 1: logit_bias=\{3: 500.0\} is not allowed"):
        LogitBias([{}, {3: 500.0}])
    with pytest.raises(ConfigError, match=r"^row 1: bad_words: \[7\] is the end-of-sequence token 7"):
        build_row_chain([{"bad_words": [[3]]}, {"bad_words": [[7]]}], context=BuildContext(eos_token_id=7))


def test_negative_padding_is_never_a_token() -> None:
    x = torch.zeros(1, 4)
    padded = torch.tensor([[-1, -1, 3]])
    assert torch.equal(RepetitionPenalty(2.0)(padded, x - 1)[0, :3], torch.full((3,), -1.0))
    assert NoRepeatNGram(2)(torch.tensor([[-1, -1, -1]]), x).eq(0).all()
    m = MinNewTokens(1, eos_token_id=3)
    m.begin(torch.tensor([[-1, 5]]))
    assert m(torch.tensor([[-1, 5]]), x)[0, 3] == float("-inf")
    assert m(torch.tensor([[-1, 5, 1]]), x)[0, 3] == 0.0


@pytest.mark.parametrize("cls", [PresencePenalty, FrequencyPenalty])
def test_a_penalty_too_small_for_float32_is_on_in_its_row_as_alone(cls) -> None:
    # 1e-300 rounds to 0 in float32, yet the row is on: alone, half-precision rows are shifted to max 0
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], dtype=torch.float16)
    ids = torch.tensor([[0], [0]])
    batched = cls([1e-300, 0.0])(ids, x)
    assert torch.equal(batched[:1], cls(1e-300)(ids[:1], x[:1]))
    assert torch.equal(batched[1], x[1])


def test_bad_words_per_row_ban_each_rows_own_words_and_never_match_padding() -> None:
    x = torch.zeros(3, 6)
    history = torch.tensor([[-1, -1, 1], [2, 3, 1], [-1, 4, 1]])
    banned = BadWords([[[5], [1, 2]], [], [[3, 4]]])(history, x) == float("-inf")
    assert banned[0].nonzero().flatten().tolist() == [2, 5]  # its one-token word, and 2 after 1
    assert not banned[1].any()  # off
    assert not banned[2].any()  # 4 is banned only after 3
    assert BadWords([[[3, 0]]])(torch.tensor([[-1, -1, -1]]), x[:1]).eq(0).all()  # -1 is no token


def test_bad_words_assign_repads_for_a_newcomer_with_more_and_longer_words() -> None:
    live = BadWords([[[1]], []])
    newcomer = BadWords([[[2, 3, 4], [5], [0, 4]]])
    live.assign(torch.tensor([1]), newcomer)
    history = torch.tensor([[2, 3], [2, 3]])
    out = live(history, torch.zeros(2, 6)) == float("-inf")
    assert out[0].nonzero().flatten().tolist() == [1]
    assert out[1].nonzero().flatten().tolist() == [4, 5]  # length 3 was no row's before: matched now
    assert live.active and not BadWords([[], []]).active


def test_logit_bias_per_row_adds_each_rows_own_biases() -> None:
    x = torch.zeros(3, 5, dtype=torch.float16) - 0.0
    out = LogitBias([{1: 2.0}, {}, {0: -1.0, 4: 3.0}])(torch.zeros(3, 1, dtype=torch.long), x)
    assert torch.equal(out[1], x[1])  # an off row is untouched (no shift in half precision)
    assert torch.equal(out[0], LogitBias({1: 2.0})(torch.zeros(1, 1, dtype=torch.long), x[:1])[0])
    live = LogitBias([{1: 2.0}, {}])
    live.assign(torch.tensor([1]), LogitBias([{0: 1.0, 2: 2.0, 3: 3.0}]))  # more entries than any row had
    assert live(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 5))[1].tolist() == [1.0, 0.0, 2.0, 3.0, 0.0]
