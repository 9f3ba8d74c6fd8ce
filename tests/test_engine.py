"""The request engine: every request decodes exactly as it would alone, whatever shares the batch.

Reference: the plain loop (:func:`decodekit.generate` through ``generate_text(..., output=[])``,
which never uses the engine) on the request alone, with the same seed and limits.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from decodekit import ConfigError
from decodekit.engine import Engine, QueueFull, Request
from decodekit.models import load_model
from decodekit.samplers import Greedy, Multinomial
from decodekit.text import generate_text
from decodekit.tokenization import load_tokenizer

PROMPTS = [
    "Once upon a time",
    "The meaning of life is",
    "A",
    "Why do birds",
    "In the beginning there was nothing but a very long and winding road that led",
    "Q: What is the capital of France?\nA:",
]


@pytest.fixture(scope="module")
def default():  # the embedded model: real words, so stop strings and EOS happen
    model, extras = load_model("default", device="cpu")
    return model, load_tokenizer("auto", extras)


class NoSlots:
    """The same model without a slot cache: the engine refills it in waves."""

    def __init__(self, model) -> None:
        self._model = model

    def __getattr__(self, name: str):
        if name == "new_slot_cache":
            raise AttributeError(name)
        return getattr(self._model, name)


def alone(model, tokenizer, request: Request, sampler) -> tuple[list[int], str, str]:
    """The request decoded by itself through the plain loop."""
    r = generate_text(
        model, tokenizer, [request.prompt], sampler=sampler, max_new_tokens=request.max_new_tokens,
        seed=request.seed, stop=request.stop, eos_token_id=request.eos_token_id, output=[],
    )[0]  # fmt: skip
    return r.tokens, r.text, r.finish_reason


def mixed_requests(n: int, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        stop = rng.choice([(), ("\n",), (" the", "."), ("e",)])
        eos = rng.choice([None, None, 32])  # 32 (a space) ends most requests early: the EOS path
        out.append(Request(prompt=rng.choice(PROMPTS), max_new_tokens=rng.randint(1, 40), seed=rng.randrange(10**6),
                           stop=stop, eos_token_id=eos, id=f"r{i}"))  # fmt: skip
    return out


@pytest.mark.parametrize("sampler", [Greedy(), Multinomial()], ids=["greedy", "multinomial"])
@pytest.mark.parametrize("waves", [False, True], ids=["slots", "waves"])
def test_every_request_equals_its_solo_decoding(default, sampler, waves: bool) -> None:
    model, tokenizer = default
    requests = mixed_requests(24, seed=1)
    engine = Engine(NoSlots(model) if waves else model, tokenizer, processors=[], sampler=sampler, max_slots=5)
    outputs = engine.generate(requests)
    assert [o.id for o in outputs] == [r.id for r in requests]
    reasons = set()
    for request, out in zip(requests, outputs):
        assert (out.tokens, out.text, out.finish_reason) == alone(model, tokenizer, request, sampler), request
        reasons.add(out.finish_reason)
    assert reasons == {"eos", "stop", "length"}  # the workload exercises every way to end


def test_a_request_gives_the_same_output_whenever_it_is_admitted(default) -> None:
    model, tokenizer = default
    probe = Request(prompt="Why do birds", max_new_tokens=30, seed=7, id="probe")
    results = []
    for before in (0, 3, 11):  # admitted at once, or into a slot freed mid-run by others
        others = [Request(prompt=p, max_new_tokens=5 + 7 * i % 23, seed=i) for i, p in enumerate((PROMPTS * 3)[:before])]
        engine = Engine(model, tokenizer, processors=[], sampler=Multinomial(), max_slots=3)
        out = {o.id: o for o in engine.run([*others, probe])}["probe"]
        results.append(out.tokens)
    assert results[0] == results[1] == results[2]
    assert results[0] == alone(model, tokenizer, probe, Multinomial())[0]


def test_freed_slots_are_refilled_at_once(default) -> None:
    model, tokenizer = default
    lengths = [2, 30, 3, 4, 5, 6]
    requests = [Request(prompt="Once upon a time", max_new_tokens=m, seed=i) for i, m in enumerate(lengths)]
    engine = Engine(model, tokenizer, processors=[], max_slots=2)
    engine.generate(requests)
    # two slots: the 30-token request runs throughout while the other slot serves the rest
    # one after another (2 + 3 + 4 + 5 + 6 = 20 <= 30): static batches of 2 would take 2 + 30 + 4 + 6
    assert engine.steps == 30


def test_results_in_submission_order_or_as_completed(default) -> None:
    model, tokenizer = default
    requests = [Request(prompt="A", max_new_tokens=m, id=m) for m in (20, 1, 10, 3)]
    ordered = [o.id for o in Engine(model, tokenizer, processors=[], max_slots=4).run(requests)]
    completed = [o.id for o in Engine(model, tokenizer, processors=[], max_slots=4).run(requests, ordered=False)]
    assert ordered == [20, 1, 10, 3]
    assert completed == [1, 3, 10, 20]


def test_the_queue_is_bounded_and_run_pulls_its_input_lazily(default) -> None:
    model, tokenizer = default
    engine = Engine(model, tokenizer, processors=[], max_slots=2, max_queue=3)
    for i in range(3):
        engine.submit(Request(prompt="A", max_new_tokens=2))
    with pytest.raises(QueueFull, match="max_queue=3"):
        engine.submit(Request(prompt="A", max_new_tokens=2))

    pulled = []

    def source() -> Iterator[Request]:
        for i in range(40):
            pulled.append(i)
            yield Request(prompt="A", max_new_tokens=3, id=i)

    engine = Engine(model, tokenizer, processors=[], max_slots=2, max_queue=3)
    seen = 0
    for out in engine.run(source()):
        seen += 1
        assert len(pulled) - seen <= 3 + 2 + 1  # queued + in slots + the one being submitted
    assert seen == 40


def test_a_bad_request_is_refused_alone(default) -> None:
    model, tokenizer = default
    requests = [
        Request(prompt="Once", max_new_tokens=5, id="ok1"),
        Request(prompt="Once", max_new_tokens=0, id="bad-length"),
        Request(prompt_ids=[1, 2, 10**6], id="bad-ids"),
        Request(prompt="Once", settings={"top_p": 0.5}, id="bad-settings"),  # this engine has one chain
        Request(prompt="Once", max_new_tokens=5, id="ok2"),
    ]
    outputs = Engine(model, tokenizer, processors=[], max_slots=2).generate(requests)
    by_id = {o.id: o for o in outputs}
    assert by_id["ok1"].finish_reason == by_id["ok2"].finish_reason == "length"
    assert "max_new_tokens=0" in by_id["bad-length"].error
    assert "prompt_ids" in by_id["bad-ids"].error
    assert "settings" in by_id["bad-settings"].error
    for rid in ("bad-length", "bad-ids", "bad-settings"):
        assert by_id[rid].finish_reason == "error" and "\n" not in by_id[rid].error


def test_a_prompt_longer_than_its_slot_keeps_its_last_tokens(default) -> None:
    model, tokenizer = default
    engine = Engine(model, tokenizer, processors=[], max_slots=2, cache_tokens=2 * 40)  # 40 positions a slot
    long = "x" * 50 + " and then the story began"
    out = engine.generate([Request(prompt=long, max_new_tokens=10, seed=3)])[0]
    ids = tokenizer.encode(long)
    assert out.cropped == len(ids) - 30 and out.prompt_ids == ids[-30:]
    cropped = generate_text(model, tokenizer, [tokenizer.decode(ids[-30:])], max_new_tokens=10, output=[])[0]
    assert out.tokens == cropped.tokens
    with pytest.raises(ConfigError, match="max_new_tokens"):
        raise ConfigError(engine.generate([Request(prompt="a", max_new_tokens=40)])[0].error)


def test_streamed_text_adds_up_to_each_result(default) -> None:
    model, tokenizer = default
    pieces: dict[int, str] = {}
    engine = Engine(model, tokenizer, processors=[], sampler=Multinomial(), max_slots=3,
                    on_text=lambda i, piece: pieces.__setitem__(i, pieces.get(i, "") + piece))  # fmt: skip
    outputs = engine.generate(mixed_requests(9, seed=4))
    for out in outputs:
        assert pieces.get(out.index, "") == out.text


def test_the_cache_is_allocated_once_however_long_the_queue(default) -> None:
    model, tokenizer = default
    engine = Engine(model, tokenizer, processors=[], max_slots=2, cache_tokens=2 * 64, max_queue=100)
    cache = engine.runner.cache
    before = (cache.k.data_ptr(), cache.k.numel())
    engine.generate([Request(prompt="Once", max_new_tokens=8, seed=i) for i in range(60)])
    assert (cache.k.data_ptr(), cache.k.numel()) == before
    assert cache.k.shape[1] == 2 and cache.k.shape[3] == 64


def test_generate_text_runs_on_the_engine_and_gives_the_loops_results(default, monkeypatch) -> None:
    model, tokenizer = default
    steps = []
    original = Engine.step
    monkeypatch.setattr(Engine, "step", lambda self: steps.append(1) or original(self))
    kwargs = dict(sampler=Multinomial(), max_new_tokens=25, num_samples=2, seed=11, stop=["\n"])
    via_engine = generate_text(model, tokenizer, PROMPTS[:3], **kwargs)
    assert steps, "generate_text did not use the engine"
    steps.clear()
    via_loop = generate_text(model, tokenizer, PROMPTS[:3], output=[], **kwargs)
    assert [(r.tokens, r.text, r.finish_reason, r.seed, r.prompt_index, r.sample_index) for r in via_engine] == [
        (r.tokens, r.text, r.finish_reason, r.seed, r.prompt_index, r.sample_index) for r in via_loop
    ]
    assert not steps  # output=[] asks for the loop's raw output: the loop ran


# --- settings per request ------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st  # noqa: E402

from decodekit.processors.base import BuildContext  # noqa: E402
from decodekit.registry import build_chain  # noqa: E402

SETTING_VALUES = {
    "temperature": st.sampled_from([0.0, 0.5, 0.8, 1.0, 1.3]),
    "top_k": st.sampled_from([0, 1, 5, 40]),
    "top_p": st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    "min_p": st.sampled_from([0.0, 0.05, 0.2]),
    "typical_p": st.sampled_from([0.5, 0.95, 1.0]),
    "epsilon_cutoff": st.sampled_from([0.0, 0.001]),
    "eta_cutoff": st.sampled_from([0.0, 0.002]),
    "top_n_sigma": st.sampled_from([0.0, 1.0, 2.0]),
    "repetition_penalty": st.sampled_from([1.0, 1.2, 0.9]),
    "presence_penalty": st.sampled_from([0.0, 0.5]),
    "frequency_penalty": st.sampled_from([0.0, 0.4]),
    "no_repeat_ngram_size": st.sampled_from([0, 2, 3]),
    "min_new_tokens": st.sampled_from([0, 3]),
    "bad_words": st.sampled_from([[], ["e"], [" the", "a"]]),
    "logit_bias": st.sampled_from([{}, {101: 3.0}, {32: -100.0, 116: 5.0}]),
}
request_settings = st.dictionaries(st.sampled_from(sorted(SETTING_VALUES)), st.integers(0, 10**6), max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({k: SETTING_VALUES[k] for k in keys})
)


@hyp_settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(request_settings, st.integers(1, 25), st.sampled_from(PROMPTS[:4])), min_size=3, max_size=9),
       st.integers(1, 4))  # fmt: skip
def test_requests_with_their_own_settings_equal_their_solo_decoding(default, mix, slots: int) -> None:
    model, tokenizer = default
    requests = [Request(prompt=p, settings=s, max_new_tokens=n, seed=i, stop=["\n", " the"])
                for i, (s, n, p) in enumerate(mix)]  # fmt: skip
    outputs = Engine(model, tokenizer, max_slots=slots).generate(requests)
    context = BuildContext(eos_token_id=tokenizer.eos_token_id, encode=tokenizer.encode, vocab_size=model.vocab_size)
    for request, out in zip(requests, outputs):
        assert out.error is None, out.error
        chain = build_chain(dict(request.settings), context=context) if request.settings else None
        solo = generate_text(model, tokenizer, [request.prompt], processors=chain, sampler=Multinomial(), output=[],
                             max_new_tokens=request.max_new_tokens, seed=request.seed, stop=request.stop)[0]  # fmt: skip
        assert (out.tokens, out.text, out.finish_reason) == (solo.tokens, solo.text, solo.finish_reason), request.settings


def test_temperature_zero_is_greedy_for_that_request_alone(default) -> None:
    model, tokenizer = default
    requests = [Request(prompt="Why do birds", settings={"temperature": 0}, max_new_tokens=20, seed=s) for s in range(3)]
    requests.append(Request(prompt="Why do birds", settings={"temperature": 1.5}, max_new_tokens=20, seed=0))
    outputs = Engine(model, tokenizer, max_slots=4).generate(requests)
    greedy = generate_text(model, tokenizer, ["Why do birds"], max_new_tokens=20, output=[])[0].tokens
    assert outputs[0].tokens == outputs[1].tokens == outputs[2].tokens == greedy
    assert outputs[3].tokens != greedy


def test_a_setting_without_per_row_values_is_refused_for_that_request(default) -> None:
    model, tokenizer = default
    outputs = Engine(model, tokenizer, max_slots=2).generate([
        Request(prompt="Once", settings={"guide_attribute": "positive"}, id="bw"),
        Request(prompt="Once", settings={"top_p": 7}, id="range"),
        Request(prompt="Once", settings={"no_such_setting": 1}, id="unknown"),
        Request(prompt="Once", settings={"min_new_tokens": 3}, eos_token_id=32, id="min-new-own-eos"),
        Request(prompt="Once", settings={"top_p": 0.9}, max_new_tokens=4, id="fine"),
    ])  # fmt: skip
    by_id = {o.id: o for o in outputs}
    assert "guide" in by_id["bw"].error and "per-row" in by_id["bw"].error
    assert "top_p" in by_id["range"].error
    assert not any(out.error.startswith("row ") for out in by_id.values() if out.error)  # a request is not a row
    assert "no_such_setting" in by_id["unknown"].error
    assert "min_new_tokens" in by_id["min-new-own-eos"].error
    assert by_id["fine"].finish_reason == "length" and len(by_id["fine"].tokens) == 4
