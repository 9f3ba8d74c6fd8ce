"""DRY: the conformance suite, llama.cpp's own test cases, and agreement with a literal port of
llama.cpp's algorithm on random contexts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import decodekit
from decodekit.errors import ConfigError
from decodekit.processors.base import BuildContext
from decodekit_dry import DRY
from decodekit_dry.dry import max_exponent

NEG_INF = float("-inf")


def test_dry_passes_the_conformance_suite(decodekit_check_processor) -> None:
    decodekit_check_processor(DRY)


# --- a literal port of llama.cpp's llama_sampler_dry_apply, one row at a time -----------------


def reference_dry(tokens, logits, multiplier, base, allowed, last_n, breakers):
    """llama.cpp's steps 1-4 on plain lists (Z-algorithm included); returns new logits."""
    out = list(logits)
    if multiplier == 0.0 or base < 1.0 or last_n == 0:
        return out
    n = len(tokens) if last_n == -1 else min(len(tokens), last_n)
    if n <= allowed:
        return out
    ctx = tokens[len(tokens) - n :]

    def rat(i):  # i-th token from the end
        return ctx[n - 1 - i]

    heads = {}
    for b in breakers:
        heads.setdefault(b[0], []).append(b[1:])
    rep_limit = n
    for i in range(n):
        longest = -1
        for tail in heads.get(rat(i), []):
            if len(tail) > longest and len(tail) <= i and all(tail[o] == rat(i - o - 1) for o in range(len(tail))):
                longest = len(tail)
        if longest >= 0:
            rep_limit = i - longest
            break
    if rep_limit < allowed:
        return out
    repeat = [0] * n
    last, rt, lt = n - 1, 0, 0
    for k in range(1, n):
        if k > rt:
            m = 0
            while m + k < n and rat(m) == rat(m + k):
                m += 1
            repeat[last - k] = min(m, rep_limit)
            if m > 0:
                lt, rt = k, k + m - 1
        else:
            p = k - lt
            right = rt - k + 1
            if repeat[last - p] < right:
                repeat[last - k] = min(repeat[last - p], rep_limit)
            else:
                i = rt + 1
                while i < n and rat(i) == rat(i - k):
                    i += 1
                repeat[last - k] = min(i - k, rep_limit)
                lt, rt = k, i - 1
    max_repeat = {}
    for i in range(n - 1):
        if repeat[i] >= allowed:
            token = rat(n - 2 - i)
            max_repeat[token] = max(max_repeat.get(token, -1), repeat[i])
    # llama.cpp's settings and its clamp are float; std::pow(float, int) is computed in double
    base32, multiplier32 = np.float32(base), np.float32(multiplier)
    clamp = int(np.float32(88.7228391) / np.log(base32)) if base32 > np.float32(1.000001) else 0
    single = {b[0] for b in breakers if len(b) == 1}
    for token, length in max_repeat.items():
        if token in single:
            continue
        exponent = length - allowed
        if clamp > 0 and exponent > clamp:
            exponent = clamp
        with np.errstate(over="ignore"):  # float penalty = ...: past float32's maximum it is inf
            penalty = np.float32(np.float64(multiplier32) * np.float64(base32) ** exponent)
        out[token] -= float(penalty)
    return out


def probs_after(dry: DRY, history: list[int], probs: list[float]) -> list[float]:
    logits = torch.tensor(probs).log()[None]
    return dry(torch.tensor([history]), logits).softmax(-1)[0].tolist()


# llama.cpp tests/test-sampling.cpp, test_dry(probs, last_tokens, expected, multiplier, base, allowed, last_n, breakers)
LLAMA_CPP_CASES = [
    ([0.25] * 4, [0, 1], [0.25] * 4, 1.0, 1.1, 2, 4, []),
    ([0.25] * 4, [0, 1, 2, 0, 1], [0.296923, 0.296923, 0.109232, 0.296923], 1.0, 1.1, 2, 5, []),
    ([0.2] * 5, [0, 1, 3, 4, 0, 1], [0.2] * 5, 1.0, 1.1, 2, 6, [[3]]),
    ([0.2] * 5, [0, 1, 2, 0, 1], [0.241818, 0.241818, 0.032727, 0.241818, 0.241818], 2.0, 1.1, 2, 5, []),
    ([0.2] * 5, [0, 1, 2, 3, 4, 0, 1], [0.2] * 5, 1.0, 1.1, 4, 7, []),
]


@pytest.mark.parametrize("probs, history, expected, multiplier, base, allowed, last_n, breakers", LLAMA_CPP_CASES)
def test_dry_reproduces_llama_cpp_test_cases(probs, history, expected, multiplier, base, allowed, last_n, breakers) -> None:
    dry = DRY(multiplier, base, allowed, breakers, last_n)
    assert probs_after(dry, history, probs) == pytest.approx(expected, abs=1e-5)


@st.composite
def dry_cases(draw):
    vocab = draw(st.integers(2, 6))
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, 40))
    rows = [draw(st.lists(st.integers(0, vocab - 1), min_size=length, max_size=length)) for _ in range(batch)]
    breakers = draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=3), max_size=3))
    return dict(
        rows=rows,
        vocab=vocab,
        multiplier=draw(st.sampled_from([0.5, 0.8, 3.0])),
        base=draw(st.sampled_from([1.0, 1.000001, 1.1, 1.75, 1e6])),
        allowed=draw(st.integers(0, 4)),
        last_n=draw(st.sampled_from([-1, 1, 3, 8, 100])),
        breakers=breakers,
    )


@settings(max_examples=150, deadline=None)
@given(case=dry_cases())
def test_dry_matches_a_literal_port_of_llama_cpp(case) -> None:
    logits = torch.linspace(-1.0, 1.0, case["vocab"]).repeat(len(case["rows"]), 1)
    dry = DRY(case["multiplier"], case["base"], case["allowed"], case["breakers"], case["last_n"])
    ours = dry(torch.tensor(case["rows"]), logits)
    for row, tokens in enumerate(case["rows"]):
        expected = reference_dry(
            tokens, logits[row].tolist(), case["multiplier"], case["base"], case["allowed"], case["last_n"], case["breakers"]
        )
        torch.testing.assert_close(ours[row], torch.tensor(expected), rtol=1e-5, atol=1e-5)


@st.composite
def per_row_dry_cases(draw: st.DrawFn) -> list[dict]:
    """Rows of different lengths, each with its own settings (as ``dry_cases`` draws them)."""
    vocab = draw(st.integers(2, 6))
    rows = []
    for _ in range(draw(st.integers(1, 4))):
        case = draw(dry_cases())
        rows.append({**case, "vocab": vocab, "tokens": [t % vocab for t in case["rows"][0]],
                     "breakers": [[t % vocab for t in b] for b in case["breakers"]]})  # fmt: skip
    return rows


@settings(max_examples=100, deadline=None)
@given(rows=per_row_dry_cases())
@example(rows=[{"rows": [[0, 0]], "vocab": 2, "multiplier": 0.5, "base": 1.0, "allowed": 0, "last_n": -1, "breakers": [[1]],
                "tokens": [0, 0]}])  # a breaker id that no row holds  # fmt: skip
def test_per_row_settings_match_the_literal_port_row_by_row_through_left_padding(rows) -> None:
    vocab = rows[0]["vocab"]  # breakers may name ids no row holds
    width = max(len(r["tokens"]) for r in rows)
    ids = torch.tensor([[-1] * (width - len(r["tokens"])) + r["tokens"] for r in rows])  # left-padded with -1
    logits = torch.linspace(-1.0, 1.0, vocab).repeat(len(rows), 1)
    names = ("multiplier", "base", "allowed", "breakers", "last_n")
    ours = DRY(*([r[k] for r in rows] for k in names))(ids, logits)
    for row, r in enumerate(rows):
        expected = reference_dry(r["tokens"], logits[row].tolist(), *(r[k] for k in ("multiplier", "base", "allowed", "last_n", "breakers")))
        torch.testing.assert_close(ours[row], torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_assign_gives_a_newcomer_its_own_breakers_even_longer_ones() -> None:
    live = DRY([0.8, 0.8], dry_sequence_breakers=[[[0]], []], dry_allowed_length=1)
    newcomer = DRY([1.0], dry_sequence_breakers=[[[3], [2, 4]]], dry_allowed_length=[1])  # a length no row had
    live.assign(torch.tensor([1]), newcomer)
    ids = torch.tensor([[4, 1, 2, 4, 1], [4, 1, 2, 4, 1]])
    out = live(ids, torch.zeros(2, 5))
    assert out[0, 2] == -0.8 * 1.75  # "4 1" repeats before 2: one token past the allowed length
    assert out[1, 2] == -1.0  # the breaker "2 4" cuts the repeat to "1": no growth
    assert torch.equal(out[1:], DRY(1.0, dry_allowed_length=1, dry_sequence_breakers=[[3], [2, 4]])(ids[1:], torch.zeros(1, 5)))


def test_repeats_longer_than_one_comparison_block_are_measured_in_full() -> None:
    # A period-3 pattern 72 tokens long: the suffix repeats 69 tokens back, beyond the 64 compared per pass.
    history = [0, 1, 2] * 24
    dry = DRY(1.0, 1.02, 2, [], -1)
    out = dry(torch.tensor([history]), torch.zeros(1, 4))
    assert out[0, 0].item() == pytest.approx(-(1.02 ** (69 - 2)), rel=1e-5)  # token 0 would extend it
    expected = reference_dry(history, [0.0] * 4, 1.0, 1.02, 2, -1, [])
    torch.testing.assert_close(out[0], torch.tensor(expected))


def test_the_exponent_clamp_is_llama_cpps_float32_one() -> None:
    # int(88.7228391f / logf(base)): in double precision base 2 would give 127
    assert [max_exponent(b) for b in (2.0, 1.75, 1.1, 3.0, 1e6)] == [128, 158, 930, 80, 6]
    assert max_exponent(1.0) == max_exponent(1.000001) == 0  # no clamp, as llama.cpp


def test_a_long_repeat_at_base_2_is_penalised_with_exponent_128() -> None:
    history = torch.tensor([[5] * 200])  # token 5 would extend a repeat of 199 tokens
    out = DRY(2.0**-120, 2.0, 2, [], -1)(history, torch.zeros(1, 8))
    assert out[0, 5].item() == -(2.0 ** (128 - 120))  # exponent 197 clamped to 128, not 127
    assert out[0, :5].eq(0).all() and out[0, 6:].eq(0).all()


def test_a_penalty_past_float32s_maximum_removes_the_token_as_in_llama_cpp() -> None:
    history = [3] * 201  # a repeat of 200 tokens: exponent 198, clamped to 158
    logits = torch.zeros(1, 4)
    removed = DRY(2.0, 1.75, 2, [], -1)(torch.tensor([history]), logits)
    assert removed[0, 3].item() == NEG_INF  # 2 * 1.75 ** 158 = 5.0e38 rounds to float inf
    assert removed[0, [0, 1, 2]].eq(0).all()
    kept = DRY(1.0, 1.75, 2, [], -1)(torch.tensor([history]), logits)
    assert kept[0, 3].item() == pytest.approx(-(1.75**158), rel=1e-6)  # 2.5e38: still finite
    assert removed[0].tolist() == reference_dry(history, [0.0] * 4, 2.0, 1.75, 2, -1, [])
    assert DRY(0.8, 2.0, 2, [], -1)(torch.tensor([history]), logits)[0, 3].item() == pytest.approx(-0.8 * 2.0**128, rel=1e-6)


def test_a_one_token_breaker_is_never_penalised() -> None:
    history = torch.tensor([[0, 1, 4, 2, 0, 1]])  # "0 1" was followed by 4
    assert DRY(1.0, 2.0, 1, [], -1)(history, torch.zeros(1, 5))[0, 4] < 0
    assert DRY(1.0, 2.0, 1, [[4]], -1)(history, torch.zeros(1, 5))[0, 4] == 0


def test_a_breaker_cuts_how_far_back_a_repeat_reaches() -> None:
    history = torch.tensor([[0, 1, 3, 5, 0, 1, 3, 5, 0, 1]])  # "0 1" was followed by 3, twice
    without = DRY(1.0, 2.0, 1, [], -1)(history, torch.zeros(1, 6))
    with_breaker = DRY(1.0, 2.0, 1, [[5]], -1)(history, torch.zeros(1, 6))
    assert without[0, 3] == -(2.0 ** (6 - 1))  # "0 1 3 5 0 1" repeats: 6 tokens
    assert with_breaker[0, 3] == -(2.0 ** (2 - 1))  # only "0 1", after the last 5, counts


def test_of_breakers_starting_at_one_position_the_longest_counts() -> None:
    history = [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    breakers = [[3], [3, 4]]  # both start at the last 3; "3 4" ends one token later
    out = DRY(1.0, 2.0, 1, breakers, -1)(torch.tensor([history]), torch.zeros(1, 5))
    assert out[0, 2] == -(2.0 ** (2 - 1))  # the repeat "0 1" after "3 4", not "4 0 1" after "3"
    torch.testing.assert_close(out[0], torch.tensor(reference_dry(history, [0.0] * 5, 1.0, 2.0, 1, -1, breakers)))


def test_penalty_last_n_limits_how_far_back_repeats_are_found() -> None:
    history = [2, 3, 0, 1, 1, 1, 1, 1, 2, 3]
    logits = torch.zeros(1, 4)
    assert DRY(1.0, 1.75, 2, [], -1)(torch.tensor([history]), logits)[0, 0] < 0  # "2 3" then 0, seen at the start
    assert torch.equal(DRY(1.0, 1.75, 2, [], 5)(torch.tensor([history]), logits), logits)


def test_a_zero_multiplier_leaves_logits_untouched() -> None:
    logits = torch.randn(2, 7)
    ids = torch.tensor([[1, 2, 1, 2, 1, 2], [3, 3, 3, 3, 3, 3]])
    assert DRY(0.0)(ids, logits) is logits


def test_rows_are_penalised_independently() -> None:
    ids = torch.tensor([[1, 2, 3, 1, 2], [4, 4, 0, 1, 2]])
    logits = torch.zeros(2, 5)
    both = DRY(0.8)(ids, logits)
    alone = torch.cat([DRY(0.8)(ids[i : i + 1], logits[i : i + 1]) for i in range(2)])
    assert torch.equal(both, alone)
    assert both[0, 3] < 0 and both[1, 3] == 0  # only row 0 has seen "1 2" followed by 3


# --- registry and settings ------------------------------------------------------------------


def test_dry_is_registered_by_its_entry_point() -> None:
    component = decodekit.get_registry(refresh=True).processor("dry")
    assert component.cls is DRY and component.plugin == "decodekit-dry"


def test_settings_build_a_dry_chain_with_breaker_strings_tokenized() -> None:
    context = BuildContext(encode=lambda text: list(text.encode()), vocab_size=257)
    chain = decodekit.build_chain({"dry_multiplier": 0.8, "dry_allowed_length": 3}, context=context)
    (dry,) = chain.processors
    assert isinstance(dry, DRY) and dry.dry_allowed_length == 3
    assert dry.dry_sequence_breakers == [[10], [58], [34], [42]]  # "\n", ":", '"', "*" as bytes


def test_breaker_strings_without_a_tokenizer_are_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"dry_sequence_breakers: '\\n' is text, but no tokenizer is loaded"):
        decodekit.build_chain({"dry_multiplier": 0.8})
    chain = decodekit.build_chain({"dry_multiplier": 0.8, "dry_sequence_breakers": [[10]]})
    assert chain.processors[0].dry_sequence_breakers == [[10]]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"dry_multiplier": -1.0}, r"dry_multiplier=-1.0 is not allowed: must be >= 0"),
        ({"dry_base": 0.5}, r"dry_base=0.5 is not allowed: must be >= 1"),
        ({"dry_allowed_length": -2}, r"dry_allowed_length=-2 is not allowed: must be >= 0"),
        ({"dry_penalty_last_n": -5}, r"dry_penalty_last_n=-5 is not allowed: must be >= -1"),
        ({"dry_sequence_breakers": [[]]}, r"dry_sequence_breakers=\[\[\]\] is not allowed: .*empty"),
    ],
)
def test_bad_settings_are_rejected_by_drys_own_model(settings, message) -> None:
    with pytest.raises(ConfigError, match=message):
        decodekit.build_chain({"dry_multiplier": 0.8, "dry_sequence_breakers": [[10]], **settings})


def test_breaker_ids_outside_the_vocabulary_are_rejected() -> None:
    context = BuildContext(vocab_size=50)
    with pytest.raises(ConfigError, match=r"dry_sequence_breakers: token id 99 is outside the vocabulary \(size 50\)"):
        decodekit.build_chain({"dry_multiplier": 0.8, "dry_sequence_breakers": [[99]]}, context=context)


def test_dry_discourages_repeating_in_generation() -> None:
    from decodekit.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=16, n_layer=1, n_head=2, n_embd=32)).eval()
    prompt = torch.tensor([[1, 2, 3, 4, 1, 2, 3]])
    chain = decodekit.build_chain({"dry_multiplier": 100.0, "dry_allowed_length": 1, "dry_sequence_breakers": []})
    out = decodekit.generate(model, prompt, processors=chain, max_new_tokens=6, output_scores=True)
    # With a huge multiplier, token 4 (which would continue "1 2 3" -> "1 2 3 4") is never chosen first.
    assert out.tokens[0, 0] != 4
    assert out.scores[0][0, 4] < -50


def test_requests_with_their_own_dry_settings_decode_in_the_engine_as_alone() -> None:
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
            ("Once upon", {"dry_multiplier": 0.8, "dry_allowed_length": 1}),
            ("Hi", {"dry_multiplier": 2.0, "dry_sequence_breakers": ["\n"], "dry_penalty_last_n": 8}),
            ("The cat", {}),
            ("Why do birds", {"dry_multiplier": 1.0, "dry_base": 3.0}),
        ])
    ]
    outputs = Engine(model, tokenizer, max_slots=2).generate(requests)
    context = BuildContext(eos_token_id=tokenizer.eos_token_id, encode=tokenizer.encode, vocab_size=model.vocab_size)
    for request, out in zip(requests, outputs):
        chain = decodekit.build_chain(dict(request.settings), context=context) if request.settings else None
        solo = generate_text(model, tokenizer, [request.prompt], processors=chain, sampler=Multinomial(), output=[],
                             max_new_tokens=request.max_new_tokens, seed=request.seed)[0]  # fmt: skip
        assert out.error is None and out.tokens == solo.tokens, request.settings
