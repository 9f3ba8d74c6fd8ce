"""The decoding loop: cache use, per-row stops, reproducibility, streaming, errors that name the culprit."""

from __future__ import annotations

import pytest
import torch

from decodekit import ConfigError, InvalidLogitsError, PluginError, generate
from decodekit.models.gpt import GPT, GPTConfig
from decodekit.processors import Temperature, TopK, TopP
from decodekit.samplers import Greedy, Multinomial


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=32))
    return m.eval()


class Recording:
    """Wraps a model and records the shape of every ``step`` input."""

    def __init__(self, inner: GPT) -> None:
        self.inner = inner
        self.shapes: list[tuple[int, ...]] = []
        self.vocab_size, self.max_context = inner.vocab_size, inner.max_context
        self.device, self.dtype = inner.device, inner.dtype

    def new_cache(self, b: int, n: int):
        return self.inner.new_cache(b, n)

    def step(self, input_ids, **kw):
        self.shapes.append(tuple(input_ids.shape))
        return self.inner.step(input_ids, **kw)

    def reorder_cache(self, cache, index):
        return self.inner.reorder_cache(cache, index)


def reference_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by recomputing the full forward pass each step (no cache)."""
    ids = torch.tensor([prompt])
    for _ in range(n):
        with torch.no_grad():
            nxt = model(ids)[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids[0, len(prompt) :].tolist()


def test_greedy_matches_a_full_recompute_and_uses_the_cache(model: GPT) -> None:
    rec = Recording(model)
    out = generate(rec, [[1, 2, 3, 4]], max_new_tokens=12)
    assert out.rows()[0] == reference_greedy(model, [1, 2, 3, 4], 12)
    assert rec.shapes[0] == (1, 4)  # prefill once
    assert all(s == (1, 1) for s in rec.shapes[1:])  # then one position per step
    assert len(rec.shapes) == 12
    assert out.finish_reasons == ["length"]


def test_rows_stop_independently_at_eos(model: GPT) -> None:
    free = generate(model, [[1, 2, 3], [7, 8, 9]], max_new_tokens=10)
    eos = free.tokens[0, 2].item()  # row 0's third token becomes EOS
    out = generate(model, [[1, 2, 3], [7, 8, 9]], max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    row0 = out.rows()[0]
    assert row0[-1] == eos and eos not in row0[:-1] and len(row0) <= 3
    assert out.finish_reasons[0] == "eos"
    assert (out.tokens[0, len(row0) :] == 0).all()  # padding after EOS
    if eos not in free.rows()[1]:
        assert out.rows()[1] == free.rows()[1] and out.finish_reasons[1] == "length"


def test_loop_ends_when_every_row_has_stopped(model: GPT) -> None:
    first = generate(model, [[5, 6]], max_new_tokens=1).tokens[0, 0].item()
    rec = Recording(model)
    out = generate(rec, [[5, 6]], max_new_tokens=30, eos_token_id=first)
    assert out.tokens.shape == (1, 1) and len(rec.shapes) == 1


def test_same_seed_same_tokens_and_rows_independent_of_the_batch(model: GPT) -> None:
    chain = Temperature(1.5) | TopK(30)
    prompts = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    a = generate(model, prompts, processors=chain, sampler=Multinomial(), max_new_tokens=15, seed=[11, 12, 13])
    b = generate(model, prompts, processors=chain, sampler=Multinomial(), max_new_tokens=15, seed=[11, 12, 13])
    assert torch.equal(a.tokens, b.tokens)
    alone = generate(model, prompts[1:2], processors=chain, sampler=Multinomial(), max_new_tokens=15, seed=[12])
    assert torch.equal(alone.tokens[0], a.tokens[1])
    other = generate(model, prompts, processors=chain, sampler=Multinomial(), max_new_tokens=15, seed=[99, 12, 98])
    assert torch.equal(other.tokens[1], a.tokens[1])
    assert not torch.equal(other.tokens[0], a.tokens[0])


def test_left_padded_batch_equals_each_prompt_alone(model: GPT) -> None:
    short, long = [3, 4], [9, 8, 7, 6, 5]
    ids = torch.tensor([[0, 0, 0] + short, long])
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    out = generate(model, ids, attention_mask=mask, max_new_tokens=8)
    assert out.rows()[0] == generate(model, [short], max_new_tokens=8).rows()[0]
    assert out.rows()[1] == generate(model, [long], max_new_tokens=8).rows()[0]


def test_streaming_callback_sees_every_token(model: GPT) -> None:
    seen: list[int] = []
    out = generate(model, [[1, 2]], max_new_tokens=6, on_token=lambda step, tok, done: seen.append(int(tok[0])))
    assert seen == out.rows()[0]


def test_scores_are_the_processed_logits_and_logprobs_of_chosen_tokens(model: GPT) -> None:
    out = generate(model, [[1, 2]], processors=TopK(3), max_new_tokens=5, output_scores=True)
    assert len(out.scores) == 5 and all((s != float("-inf")).sum() == 3 for s in out.scores)
    for t, s in enumerate(out.scores):
        expected = s.log_softmax(-1)[0, out.tokens[0, t]]
        assert torch.isclose(out.logprobs[0, t], expected)


def test_context_window_slides_and_long_prompts_are_cropped(model: GPT) -> None:
    out = generate(model, [[1, 2, 3]], max_new_tokens=100)  # 103 > block_size 64
    assert out.tokens.shape == (1, 100)
    assert out.rows()[0][:61] == reference_greedy(model, [1, 2, 3], 61)  # identical until the slide
    with pytest.warns(UserWarning, match="keeping its last 64"):
        cropped = generate(model, [list(range(50)) * 2], max_new_tokens=3)
    assert cropped.tokens.shape == (1, 3)


def test_custom_stopping_criterion_gives_reason_stop(model: GPT) -> None:
    out = generate(model, [[1, 2]], max_new_tokens=10, stopping=[lambda seq, n: torch.tensor([n >= 4])])
    assert out.lengths.tolist() == [4] and out.finish_reasons == ["stop"]


class NaNModel(Recording):
    def step(self, input_ids, **kw):
        logits, cache = self.inner.step(input_ids, **kw)
        return logits * float("nan"), cache


def test_nan_logits_from_the_model_give_a_clear_error(model: GPT) -> None:
    with pytest.raises(InvalidLogitsError, match="model's logits at step 0: NaN"):
        generate(NaNModel(model), [[1]], sampler=Multinomial(), max_new_tokens=3)


def test_a_bad_processor_is_named(model: GPT) -> None:
    def nan_plugin(ids, logits):
        return logits * float("nan")

    def raising_plugin(ids, logits):
        raise RuntimeError("boom")

    def wrong_shape(ids, logits):
        return logits[:, :-1]

    with pytest.raises(PluginError, match=r"nan_plugin \(test_loop\) returned NaN.*at step 0"):
        generate(model, [[1]], processors=[TopK(5), nan_plugin], max_new_tokens=2)
    with pytest.raises(PluginError, match=r"raising_plugin \(test_loop\) raised at step 0: RuntimeError: boom"):
        generate(model, [[1]], processors=[raising_plugin], max_new_tokens=2)
    with pytest.raises(PluginError, match=r"wrong_shape \(test_loop\) returned \(1, 49\)"):
        generate(model, [[1]], processors=[wrong_shape], max_new_tokens=2)


def test_a_bad_sampler_is_named(model: GPT) -> None:
    class Broken(Greedy):
        name = "broken"

        def __call__(self, ids, logits, rng):
            return logits.argmax(-1).float()

    with pytest.raises(PluginError, match=r"sampler broken \(test_loop\) returned \(1,\) torch.float32 at step 0"):
        generate(model, [[1]], sampler=Broken(), max_new_tokens=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"input_ids": [[1, 99]]}, "token ids must be in"),
        ({"eos_token_id": -1}, "eos_token_id=-1"),
        ({"seed": [1, 2]}, "2 seeds given for 1 rows"),
    ],
)
def test_bad_arguments_name_the_setting(model: GPT, kwargs: dict, message: str) -> None:
    args = {"input_ids": [[1, 2]], "max_new_tokens": 3, **kwargs}
    with pytest.raises(ConfigError, match=message):
        generate(model, args.pop("input_ids"), **args)


def test_top_p_sampling_only_draws_from_the_nucleus(model: GPT) -> None:
    out = generate(model, [[1, 2]] * 4, processors=TopP(0.5), sampler=Multinomial(), max_new_tokens=8, seed=3, output_scores=True)
    for t, s in enumerate(out.scores):
        assert torch.isfinite(s.gather(-1, out.tokens[:, t : t + 1])).all()


def test_chunked_prefill_gives_the_same_logits(model: GPT) -> None:
    from decodekit.stepping import prefill

    ids = torch.randint(0, 50, (3, 23))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :5] = False  # a left-padded row
    whole, _ = prefill(model, ids, mask, 30, chunk=64)
    chunked, cache = prefill(model, ids, mask, 30, chunk=4)
    assert torch.allclose(whole, chunked, atol=1e-5)
    assert cache.length == 23
