"""XTC: the conformance suite, llama.cpp's test cases, and the reproducible per-row draws."""

from __future__ import annotations

import pytest
import torch

import decodekit
from decodekit.errors import ConfigError
from decodekit_xtc import XTC

NEG_INF = float("-inf")


def test_xtc_passes_the_conformance_suite(decodekit_check_processor) -> None:
    decodekit_check_processor(XTC)


def kept(xtc: XTC, probs: list[float], history: list[int] | None = None) -> list[int]:
    """Indices of the tokens XTC leaves, for one row of probabilities."""
    ids = torch.tensor([history or [0]])
    out = xtc(ids, torch.tensor([probs]).log())
    return (out[0] > NEG_INF).nonzero().flatten().tolist()


# llama.cpp tests/test-sampling.cpp, test_xtc(probs, expected, p=0.99, t): with probability 1 here,
# so that the draw always says "act".
@pytest.mark.parametrize(
    "threshold, expected",
    [(0.09, [3]), (0.19, [2, 3]), (0.29, [1, 2, 3]), (0.39, [0, 1, 2, 3])],
)
def test_xtc_reproduces_llama_cpp_test_cases(threshold: float, expected: list[int]) -> None:
    assert kept(XTC(1.0, threshold), [0.4, 0.3, 0.2, 0.1]) == expected


def test_fewer_than_two_top_choices_leave_the_row_alone() -> None:
    assert kept(XTC(1.0, 0.5), [0.7, 0.2, 0.1]) == [0, 1, 2]
    assert kept(XTC(1.0, 0.9), [0.7, 0.2, 0.1]) == [0, 1, 2]


def test_tokens_tied_with_the_least_likely_top_choice_are_all_kept() -> None:
    assert kept(XTC(1.0, 0.1), [0.3, 0.3, 0.3, 0.1 - 1e-3]) == [0, 1, 2, 3]
    assert kept(XTC(1.0, 0.1), [0.4, 0.2, 0.2, 0.2]) == [1, 2, 3]


def test_removed_tokens_are_not_top_choices_even_at_threshold_zero() -> None:
    logits = torch.tensor([[2.0, NEG_INF, 1.0, 0.0]])
    out = XTC(1.0, 0.0)(torch.tensor([[0]]), logits)
    assert (out[0] > NEG_INF).tolist() == [False, False, False, True]


def test_probability_zero_never_acts_and_returns_the_input() -> None:
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    assert XTC(0.0, 0.1)(torch.tensor([[1, 2]]), logits) is logits


def histories(n: int, length: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 1000, (n, length), generator=g)


def test_the_draws_act_at_the_requested_rate() -> None:
    ids = histories(4000)
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().expand(4000, 4)
    for probability in (0.1, 0.5, 0.9):
        out = XTC(probability, 0.1)(ids, logits)
        rate = (out[:, 0] == NEG_INF).float().mean().item()
        assert abs(rate - probability) < 0.03, (probability, rate)


def test_draws_are_reproducible_and_depend_on_the_seed() -> None:
    ids = histories(64)
    assert torch.equal(XTC(0.5, 0.1).draws(ids), XTC(0.5, 0.1).draws(ids))
    assert not torch.equal(XTC(0.5, 0.1, xtc_seed=1).draws(ids), XTC(0.5, 0.1).draws(ids))


def test_draws_change_from_step_to_step() -> None:
    xtc = XTC(0.5, 0.1)
    xtc.begin(torch.tensor([[1, 2, 3]]))
    steps = [xtc.draws(torch.tensor([[1, 2, 3] + [7] * k])) for k in range(20)]
    assert len({round(float(d), 6) for d in steps}) == 20  # even while the same token repeats


def test_a_rows_draw_ignores_the_rest_of_the_batch_and_its_left_padding() -> None:
    alone = XTC(0.5, 0.1)
    alone.begin(torch.tensor([[5, 6, 7]]))
    in_batch = XTC(0.5, 0.1)
    in_batch.begin(torch.tensor([[0, 0, 5, 6, 7], [9, 8, 7, 6, 5]]))  # row 0 left-padded
    generated = [[11, 12], [13, 14]]
    d_alone = alone.draws(torch.tensor([[5, 6, 7] + generated[0]]))
    d_batch = in_batch.draws(torch.tensor([[0, 0, 5, 6, 7] + generated[0], [9, 8, 7, 6, 5] + generated[1]]))
    assert d_alone[0] == d_batch[0]


def test_xtc_acts_per_row() -> None:
    ids = histories(200)
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().expand(200, 4)
    xtc = XTC(0.5, 0.1)
    out = xtc(ids, probs)
    acted = out[:, 0] == NEG_INF
    assert torch.equal(acted, xtc.draws(ids) <= 0.5)
    assert 0 < int(acted.sum()) < 200
    alone = torch.cat([xtc(ids[i : i + 1], probs[i : i + 1]) for i in range(200)])
    assert torch.equal(out, alone)


# --- registry and settings ------------------------------------------------------------------


def test_xtc_is_registered_by_its_entry_point_and_runs_after_truncation() -> None:
    registry = decodekit.get_registry(refresh=True)
    assert registry.processor("xtc").cls is XTC and registry.processor("xtc").plugin == "decodekit-xtc"
    chain = decodekit.build_chain({"xtc_probability": 0.5, "xtc_threshold": 0.1, "top_p": 0.9, "temperature": 0.8})
    assert [type(p).__name__ for p in chain.processors] == ["Temperature", "TopP", "XTC"]
    assert (chain.processors[-1].xtc_probability, chain.processors[-1].xtc_threshold) == (0.5, 0.1)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"xtc_probability": 1.5}, r"xtc_probability=1.5 is not allowed: must be <= 1"),
        ({"xtc_threshold": -0.1}, r"xtc_threshold=-0.1 is not allowed: must be >= 0"),
        ({"xtc_seed": -3}, r"xtc_seed=-3 is not allowed: must be >= 0"),
    ],
)
def test_bad_settings_are_rejected_by_xtcs_own_model(settings, message) -> None:
    with pytest.raises(ConfigError, match=message):
        decodekit.build_chain({"xtc_probability": 0.5, **settings})


def test_xtc_in_generation_removes_the_top_choices_at_every_step() -> None:
    from decodekit.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=16, n_layer=1, n_head=2, n_embd=32)).eval()
    chain = decodekit.build_chain({"xtc_probability": 1.0, "xtc_threshold": 0.01})
    out = decodekit.generate(model, torch.tensor([[1, 2, 3]]), processors=chain, max_new_tokens=5, output_scores=True)
    plain = decodekit.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=1, output_scores=True)
    # Every token of this small random model has p >= 0.01, so only the least likely is left.
    assert (out.scores[0] > NEG_INF).sum().item() == 1
    assert out.tokens[0, 0] == plain.scores[0].argmin()


def test_per_row_settings_give_each_row_its_draws_and_result_alone() -> None:
    prompts = torch.tensor([[-1, -1, 5, 6], [9, 8, 7, 6], [-1, 4, 4, 4]])  # left-padded with -1
    history = torch.cat([prompts, torch.tensor([[1, 2], [3, 4], [5, 6]])], dim=-1)
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().expand(3, 4)
    settings = [(1.0, 0.1, 3), (0.0, 0.1, 0), (0.5, 0.2, 7)]
    batched = XTC(*zip(*settings))
    batched.begin(prompts)
    out = batched(history, logits)
    assert torch.equal(out[1], logits[1])  # probability 0: off
    for row, (p, t, seed) in enumerate(settings):
        alone = XTC(p, t, seed)
        alone.begin(prompts[row][prompts[row] >= 0][None])
        real = history[row][history[row] >= 0][None]
        assert batched.draws(history)[row] == alone.draws(real)
        assert torch.equal(out[row : row + 1], alone(real, logits[row : row + 1]))
    assert out[0, 0] == NEG_INF  # probability 1 acts


def test_per_row_xtc_is_built_from_each_rows_settings() -> None:
    from decodekit.registry import build_row_chain

    chain = build_row_chain([{"xtc_probability": 0.5, "xtc_seed": 4}, {}])
    xtc = chain.processors[0]
    assert xtc.xtc_probability.tolist() == [0.5, 0.0] and xtc.xtc_seed.tolist() == [4, 0]
    with pytest.raises(ConfigError, match=r"^row 1: xtc_threshold=2.0 is not allowed"):
        XTC([0.5, 0.5], [0.1, 2.0])


def test_requests_with_their_own_xtc_settings_decode_in_the_engine_as_alone() -> None:
    from decodekit.engine import Engine, Request
    from decodekit.models import load_model
    from decodekit.processors.base import BuildContext
    from decodekit.samplers import Multinomial
    from decodekit.text import generate_text
    from decodekit.tokenization import load_tokenizer

    model, extras = load_model("default", device="cpu")
    tokenizer = load_tokenizer("auto", extras)
    requests = [
        Request(prompt=prompt, settings=settings, max_new_tokens=12, seed=i)
        for i, (prompt, settings) in enumerate([
            ("Once upon", {"xtc_probability": 0.7, "xtc_threshold": 0.05}),
            ("Hi", {"xtc_probability": 0.3, "xtc_seed": 5}),
            ("The cat", {}),
            ("Why do birds", {"xtc_probability": 1.0, "xtc_threshold": 0.02}),
        ])
    ]
    outputs = Engine(model, tokenizer, max_slots=2).generate(requests)
    context = BuildContext(eos_token_id=tokenizer.eos_token_id, encode=tokenizer.encode, vocab_size=model.vocab_size)
    for request, out in zip(requests, outputs):
        chain = decodekit.build_chain(dict(request.settings), context=context) if request.settings else None
        solo = generate_text(model, tokenizer, [request.prompt], processors=chain, sampler=Multinomial(), output=[],
                             max_new_tokens=request.max_new_tokens, seed=request.seed)[0]  # fmt: skip
        assert out.error is None and out.tokens == solo.tokens, request.settings
