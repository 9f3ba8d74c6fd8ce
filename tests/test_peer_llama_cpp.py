"""llama.cpp's expected values: the cases of its tests/test-sampling.cpp, run on decodekit's processors.

Upstream: ggml-org/llama.cpp, tests/test-sampling.cpp at commit 07e4038f07a83cd729bbac700e6681757b313b73;
the rules ported below from src/llama-sampling.cpp at 0344068cf112e524eb3fbdbd58c171870b63e56c.

Each case cites the upstream call in ``main()`` of ggml-org/llama.cpp ``tests/test-sampling.cpp``
(its ``sampler_tester`` builds logits ``log(p)``, applies the sampler, then usually ``dist``,
which renormalises; it checks each probability to 1e-5). llama.cpp shrinks the candidate array
where decodekit sets removed tokens to ``-inf``, and its truncating samplers sort the survivors
(most likely first): :func:`by_token` puts such a list back in token order, zeros for the removed.
DRY's cases are in ``plugins/decodekit-dry/tests/test_dry_plugin.py``; llama.cpp's ``p_less``
has no counterpart here. Where the upstream test has no case for a setting (``temp_ext`` with a
range, ``penalty_last_n`` shorter than the history, XTC's ``min_keep``), a literal Python port of
the llama.cpp function (``src/llama-sampling.cpp``) is the reference.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from decodekit import ConfigError
from decodekit.processors import (
    FrequencyPenalty,
    MinP,
    PresencePenalty,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopNSigma,
    TopP,
    TypicalP,
)

P4 = [0.1, 0.2, 0.3, 0.4]
TOL = 1e-5  # sampler_tester::check


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log()[None]


def by_token(expected: list[float], probs: list[float], *, tail: bool = False) -> torch.Tensor:
    """llama.cpp's sorted survivors (most likely first) as a per-token vector, 0 for the removed.

    Survivors are the most likely ``len(expected)`` tokens, or the least likely (``tail``: XTC
    advances the array's start past the top choices)."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept = order[-len(expected) :] if tail else order[: len(expected)]
    full = torch.zeros(len(probs))
    full[kept] = torch.tensor(expected)
    return full


def renormalised(processor, probs: list[float], history: list[int] | None = None) -> torch.Tensor:
    """What ``sampler_tester`` holds after the sampler and ``dist``: softmax of what is left."""
    ids = torch.tensor([history if history is not None else [0]])
    return processor(ids, logits_of(probs)).softmax(-1)[0]


def as_before(processor, probs: list[float]) -> torch.Tensor:
    """What it holds with no ``dist`` after (XTC, typical): each survivor's probability before the cut."""
    out = processor(torch.tensor([[0]]), logits_of(probs))[0]
    return torch.where(out > float("-inf"), torch.tensor(probs), 0.0)


def close(actual: torch.Tensor, expected: torch.Tensor | list[float]) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float32)
    assert torch.allclose(actual, expected, atol=TOL, rtol=0), f"{actual.tolist()} != {expected.tolist()}"


# --- temperature: test_temp, test_temp_ext ---------------------------------------------------

@pytest.mark.parametrize(
    ("expected", "temp", "delta", "exponent"),
    [
        (P4, 1.0, None, None),  # test_temp({0.1, 0.2, 0.3, 0.4}, {0.1, 0.2, 0.3, 0.4}, 1.0f)
        ([0.0, 0.0, 0.0, 1.0], 0.0, None, None),  # test_temp(..., {0.0, 0.0, 0.0, 1.0}, 0.0f)
        (P4, 1.0, 0.0, 1.0),  # test_temp_ext(..., {0.1, 0.2, 0.3, 0.4}, 1.0f, 0.0f, 1.0f)
        ([0.0, 0.0, 0.0, 1.0], 0.0, 0.0, 1.0),  # test_temp_ext(..., {0.0, 0.0, 0.0, 1.0}, 0.0f, 0.0f, 1.0f)
    ],
)
def test_temp_and_temp_ext(expected, temp, delta, exponent) -> None:
    processor = Temperature(temp) if delta is None else Temperature(temp, delta, exponent)
    close(renormalised(processor, P4), expected)


def llama_temp_ext(logits: list[float], temp: float, delta: float, exponent: float) -> list[float]:
    """``llama_sampler_temp_ext_apply`` then softmax, in Python; ``-inf`` logits are not candidates."""
    cand = [i for i, x in enumerate(logits) if x > -math.inf]
    if len(cand) <= 1:
        return _softmax(logits)
    lo, hi = max(0.0, temp - delta), temp + delta
    p = _softmax([logits[i] for i in cand])
    entropy = -sum(q * math.log(q) for q in p if q > 0.0)
    dyn = lo + (hi - lo) * (entropy / -math.log(1.0 / len(cand))) ** exponent
    if dyn <= 0.0:
        best = max(cand, key=lambda i: (logits[i], -i))
        return [1.0 if i == best else 0.0 for i in range(len(logits))]
    return _softmax([x / dyn for x in logits])


def _softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    e = [math.exp(x - top) if x > -math.inf else 0.0 for x in xs]
    return [v / sum(e) for v in e]


def test_dynamic_temperature_matches_a_port_of_llama_temp_ext() -> None:
    """test-sampling.cpp has temp_ext cases with delta = 0 only; a range is checked against the C++ rule."""
    rng = random.Random(15)
    for case in range(60):
        v = rng.randint(2, 12)
        logits = [rng.gauss(0.0, 3.0) for _ in range(v)]
        for i in rng.sample(range(v), rng.randint(0, v - 1)):  # candidates removed by an earlier sampler
            logits[i] = -math.inf
        temp, delta = rng.choice([0.0, 0.5, 0.8, 1.5]), rng.choice([0.3, 0.5, 1.0, 2.0])
        exponent = rng.choice([0.0, 0.5, 1.0, 2.0])
        out = Temperature(temp, delta, exponent)(None, torch.tensor([logits])).softmax(-1)[0]
        close(out, llama_temp_ext(logits, temp, delta, exponent))


def test_dynamic_temperature_counts_the_candidates_left_by_top_k() -> None:
    """llama.cpp's common chain runs top-k before temp-ext: H_max is log of the k candidates left."""
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(3)) * 2
    out = (TopK(5) | Temperature(0.8, 0.5, 1.0))(None, logits).softmax(-1)[0]
    kept = TopK(5)(None, logits)[0].tolist()
    close(out, llama_temp_ext(kept, 0.8, 0.5, 1.0))


# --- truncation: test_top_k, test_top_p, test_min_p, test_typical, test_top_n_sigma ------------

@pytest.mark.parametrize(
    ("expected", "k"),
    [([1.0], 1), ([0.44444, 0.33333, 0.22222], 3), ([0.4, 0.3, 0.2, 0.1], 4), (P4, 0)],
)
def test_top_k(expected, k) -> None:
    """test_top_k({0.1f, 0.2f, 0.3f, 0.4f}, expected, k); k = 0 is off and keeps llama.cpp's token order."""
    want = torch.tensor(expected) if k == 0 else by_token(expected, P4)
    close(renormalised(TopK(k), P4), want)


@pytest.mark.parametrize(
    ("expected", "p"),
    [([1.0], 0.0), ([0.571429, 0.428571], 0.7), ([0.44444, 0.33333, 0.22222], 0.8), (P4, 1.0)],
)
def test_top_p(expected, p) -> None:
    """test_top_p({0.1f, 0.2f, 0.3f, 0.4f}, expected, p)."""
    want = torch.tensor(expected) if p == 1.0 else by_token(expected, P4)
    close(renormalised(TopP(p), P4), want)


@pytest.mark.parametrize(
    ("expected", "p"),
    [
        ([0.1 / 1.0, 0.2 / 1.0, 0.3 / 1.0, 0.4 / 1.0], 0.00),
        ([0.1 / 1.0, 0.2 / 1.0, 0.3 / 1.0, 0.4 / 1.0], 0.24),
        ([0.2 / 0.9, 0.3 / 0.9, 0.4 / 0.9], 0.26),
        ([0.2 / 0.9, 0.3 / 0.9, 0.4 / 0.9], 0.49),
        ([0.3 / 0.7, 0.4 / 0.7], 0.51),
        ([0.3 / 0.7, 0.4 / 0.7], 0.74),
        ([0.4 / 0.4], 0.76),
        ([0.4 / 0.4], 1.00),
    ],
)
def test_min_p(expected, p) -> None:
    """test_min_p({0.1f, 0.2f, 0.3f, 0.4f}, expected, p): the survivors listed in token order upstream."""
    want = torch.zeros(4)
    want[4 - len(expected) :] = torch.tensor(expected)
    close(renormalised(MinP(p), P4), want)


def test_min_p_above_one_is_refused() -> None:
    """test_min_p(..., {0.4f/0.4f}, 1.05f): llama.cpp keeps the top token; decodekit refuses min_p > 1."""
    with pytest.raises(ConfigError, match=r"min_p=1.05 is not allowed: must be <= 1"):
        MinP(1.05)


@pytest.mark.parametrize(
    ("probs", "expected"),
    [([0.97, 0.01, 0.01, 0.01], [0.97]), ([0.4, 0.2, 0.2, 0.2], [0.2, 0.2, 0.2])],
)
def test_typical(probs, expected) -> None:
    """test_typical(probs, expected, 0.5f): no dist after it, so the survivors keep their probabilities."""
    out = as_before(TypicalP(0.5), probs)
    assert sorted(v for v in out.tolist() if v > 0) == pytest.approx(sorted(expected), abs=TOL)


@pytest.mark.parametrize(
    ("expected", "n"),
    [([0.0, 0.0, 0.428571, 0.571429], 1.0), (P4, 0.0), (P4, 3.0)],
)
def test_top_n_sigma(expected, n) -> None:
    """test_top_n_sigma({0.1f, 0.2f, 0.3f, 0.4f}, expected, n); 0 is off (llama.cpp PR #13345)."""
    close(renormalised(TopNSigma(n), P4), expected)


# --- penalties: test_penalties, and penalty_last_n ---------------------------------------------

P5 = [0.2] * 5


@pytest.mark.parametrize(
    ("last_tokens", "expected"),
    [
        ([0], [0, 0.25, 0.25, 0.25, 0.25]),
        ([0, 1, 2], [0, 0, 0, 0.5, 0.5]),
        ([0, 1, 2, 0, 0], [0, 0, 0, 0.5, 0.5]),
    ],
)
def test_repetition_penalty(last_tokens, expected) -> None:
    """test_penalties({0.2f x5}, last_tokens, expected, 50.0f, 0.0f, 0.0f): penalty_last_n = len(last_tokens)."""
    processor = RepetitionPenalty(50.0, penalty_last_n=len(last_tokens))
    close(renormalised(processor, P5, last_tokens), expected)


def test_presence_and_frequency_above_two_are_refused() -> None:
    """test_penalties(..., 1.0f, 5.0f, 5.0f): llama.cpp takes any value; decodekit keeps OpenAI's [-2, 2]."""
    with pytest.raises(ConfigError, match=r"frequency_penalty=5.0 is not allowed: must be <= 2"):
        FrequencyPenalty(5.0, penalty_last_n=1)
    with pytest.raises(ConfigError, match=r"presence_penalty=5.0 is not allowed: must be <= 2"):
        PresencePenalty(5.0, penalty_last_n=1)


def llama_penalties(
    logits: list[float], accepted: list[int], last_n: int, repeat: float, freq: float, present: float
) -> list[float]:
    """``llama_sampler_penalties_accept`` / ``_apply`` in Python; ``last_n = -1`` is what the server and
    common/ turn into the context size (here: every accepted token)."""
    if last_n == 0 or (repeat == 1.0 and freq == 0.0 and present == 0.0):
        return list(logits)
    window = accepted if last_n < 0 else accepted[len(accepted) - last_n :] if last_n < len(accepted) else accepted
    out = list(logits)
    for token, count in Counter(window).items():
        x = out[token]
        x = x * repeat if x <= 0 else x / repeat
        out[token] = x - count * freq - float(count > 0) * present
    return out


def test_penalty_last_n_matches_a_port_of_llama_penalties() -> None:
    """The window over accepted tokens (prompt ones included, as llama.cpp's main pushes the prompt)."""
    rng = random.Random(7)
    for case in range(80):
        v, t = rng.randint(2, 10), rng.randint(0, 16)
        history = [rng.randrange(v) for _ in range(t)]
        logits = [rng.gauss(0.0, 2.0) for _ in range(v)]
        last_n = rng.choice([-1, 0, 1, 2, 3, 5, 8, 40])
        repeat, freq, present = rng.choice([1.0, 1.3, 0.7, 2.0]), rng.uniform(-2, 2), rng.uniform(-2, 2)
        chain = RepetitionPenalty(repeat, last_n) | PresencePenalty(present, last_n) | FrequencyPenalty(freq, last_n)
        ids = torch.tensor([history], dtype=torch.long).reshape(1, t)
        out = chain(ids, torch.tensor([logits]))[0]  # no begin: every token counts, as llama.cpp's accepted ones
        expected = torch.tensor(llama_penalties(logits, history, last_n, repeat, freq, present))
        assert torch.allclose(out, expected, atol=1e-5), (history, last_n, repeat, freq, present)


def test_penalty_last_n_window_counts_no_prompt_token_for_presence_and_frequency() -> None:
    """Where decodekit differs: with a prompt (``begin``), presence and frequency count generated
    tokens only, in the window too; llama.cpp counts the prompt's. The repetition penalty agrees."""
    prompt, generated = [1, 2], [3]
    ids = torch.tensor([prompt + generated])
    logits = [1.0] * 5
    presence = PresencePenalty(1.0, penalty_last_n=2)
    presence.begin(torch.tensor([prompt]))
    out = presence(ids, torch.tensor([logits]))[0].tolist()
    assert out == [1.0, 1.0, 1.0, 0.0, 1.0]  # only the generated 3
    assert llama_penalties(logits, prompt + generated, 2, 1.0, 0.0, 1.0) == [1.0, 1.0, 0.0, 0.0, 1.0]  # 2 and 3
    repetition = RepetitionPenalty(2.0, penalty_last_n=2)(ids, torch.tensor([logits]))[0].tolist()
    assert repetition == llama_penalties(logits, prompt + generated, 2, 2.0, 0.0, 0.0) == [1.0, 1.0, 0.5, 0.5, 1.0]


def test_penalty_last_n_zero_is_off_and_minus_one_is_everything() -> None:
    """llama.cpp: 0 disables the penalties, -1 means the whole context (common/arg.cpp, --repeat-last-n)."""
    ids, logits = torch.tensor([[0, 1, 2, 0]]), torch.ones(1, 4)
    assert torch.equal(RepetitionPenalty(2.0, penalty_last_n=0)(ids, logits), logits)
    assert RepetitionPenalty(2.0, penalty_last_n=-1)(ids, logits)[0].tolist() == [0.5, 0.5, 0.5, 1.0]
    with pytest.raises(ConfigError, match=r"penalty_last_n=-2 is not allowed: must be >= -1"):
        RepetitionPenalty(2.0, penalty_last_n=-2)


# --- XTC: test_xtc, and min_keep ---------------------------------------------------------------

XTC_PROBS = [0.4, 0.3, 0.2, 0.1]


@pytest.mark.parametrize(
    ("expected", "threshold"),
    [([0.1], 0.09), ([0.2, 0.1], 0.19), ([0.3, 0.2, 0.1], 0.29), ([0.4, 0.3, 0.2, 0.1], 0.39)],
)
def test_xtc(expected, threshold) -> None:
    """test_xtc({0.4f, 0.3f, 0.2f, 0.1f}, expected, 0.99f, threshold) ("XTC should" / "should not")."""
    xtc = pytest.importorskip("decodekit_xtc").XTC(0.99, threshold, 0)
    assert float(xtc.draws(torch.tensor([[0]]))) <= 0.99  # upstream's seed-0 draw acts; so does ours
    close(as_before(xtc, XTC_PROBS), by_token(expected, XTC_PROBS, tail=True))


def llama_xtc(probs: list[float], threshold: float, min_keep: int) -> list[int]:
    """``llama_sample_xtc_apply`` when its draw acts, in Python: the token ids it keeps."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    if threshold > 0.5 or len(order) < 2:
        return sorted(order)
    pos_last = 0
    for i, token in enumerate(order):
        if probs[token] >= threshold:
            pos_last = i
        else:
            break
    if len(order) - pos_last >= min_keep and pos_last > 0:
        order = order[pos_last:]
    return sorted(order)


def test_xtc_min_keep_matches_a_port_of_llama_xtc() -> None:
    """test-sampling.cpp passes min_keep = 0 only; other values are checked against the C++ rule."""
    xtc_module = pytest.importorskip("decodekit_xtc")
    rng = random.Random(3)
    for case in range(60):
        v = rng.randint(2, 9)
        weights = rng.sample(range(1, 60), v)  # distinct: llama.cpp's sort picks among ties, decodekit keeps them
        probs = [w / sum(weights) for w in weights]
        threshold, min_keep = rng.choice([0.0, 0.05, 0.1, 0.2, 0.3]), rng.randint(0, v + 1)
        out = xtc_module.XTC(1.0, threshold, 0, min_keep)(torch.tensor([[0]]), logits_of(probs))[0]
        kept = (out > float("-inf")).nonzero().flatten().tolist()
        assert kept == llama_xtc(probs, threshold, min_keep), (probs, threshold, min_keep)


# --- test_sampler_queue: chains of top-k, top-p, min-p on 10000 tokens --------------------------

QUEUE_CASES = [
    ("k", 10000, 1.0, 1.0), ("k", 1, 1.0, 1.0), ("p", 10000, 1.0, 1.0), ("p", 10000, 0.0, 1.0),
    ("m", 10000, 1.0, 1.0), ("m", 10000, 1.0, 1e-12),
    ("k", 100, 1.0, 1.0), ("p", 10000, 0.0003, 1.0), ("p", 10000, 0.8, 1.0),
    ("m", 10000, 1.0, 9997.9 / 9999.0), ("m", 10000, 1.0, 0.1),
    ("kp", 100, 0.8, 0.1), ("km", 100, 0.8, 0.1), ("pk", 100, 0.8, 0.1), ("pm", 100, 0.8, 0.1),
    ("mk", 100, 0.8, 0.1), ("mp", 100, 0.8, 9997.9 / 9999.0), ("mp", 100, 0.8, 0.1),
    ("kpm", 100, 0.8, 0.1), ("kmp", 100, 0.8, 0.1), ("pkm", 100, 0.8, 0.1),
    ("pmk", 100, 0.8, 0.1), ("mkp", 100, 0.8, 0.1), ("mpk", 100, 0.8, 0.1),
]  # fmt: skip


@pytest.mark.parametrize(("sequence", "top_k", "top_p", "min_p"), QUEUE_CASES)
def test_sampler_queue(sequence: str, top_k: int, top_p: float, min_p: float) -> None:
    """test_sampler_queue(10000, sequence, top_k, top_p, min_p): logits log(id), so p_i is proportional
    to i; after each sampler the count kept and the smallest id kept follow upstream's formulas."""
    n_vocab = 10000
    logits = torch.arange(n_vocab, dtype=torch.float32).log()[None]  # token 0: -inf
    min_token_id, max_token_id, size = 0, n_vocab - 1, n_vocab  # llama.cpp's view: token 0 is a candidate
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731  upstream's floats are float32
    for s in sequence:
        processor = {"k": lambda: TopK(top_k), "p": lambda: TopP(f32(top_p)), "m": lambda: MinP(f32(min_p))}[s]()
        logits = processor(None, logits)
        kept = (logits[0] > float("-inf")).nonzero().flatten()
        if s == "k":
            expected_size = min(size, top_k)
            min_token_id = max(min_token_id, n_vocab - top_k)
        elif s == "p":
            divisor = n_vocab * (n_vocab - 1) // 2 - min_token_id * (min_token_id - 1) // 2
            target = math.ceil(f32(f32(top_p) * divisor))
            min_token_id, expected_size, cumsum = n_vocab, 0, 0
            while True:  # do-while: at least one token
                min_token_id -= 1
                expected_size += 1
                cumsum += min_token_id
                if cumsum >= target:
                    break
            if min_token_id == 1:  # token 0 has p == 0
                min_token_id -= 1
                expected_size += 1
        else:
            expected_size = min(max(math.ceil(f32(f32(1.0 - f32(min_p)) * n_vocab)), 1), size)
            min_token_id = min(max(math.floor(f32(f32(min_p) * n_vocab)), 1, n_vocab - size), n_vocab - 1)
        size = expected_size
        # llama.cpp's candidates are the top `expected_size` ids, token 0 (logit -inf, p = 0) among
        # them when all are kept; in decodekit a -inf logit is a removed token
        assert int(kept.numel()) == min(expected_size, n_vocab - 1), (s, int(kept.numel()), expected_size)
        assert int(kept.max()) == max_token_id and int(kept.min()) == max(min_token_id, 1)
