"""Static-cache decoding (``generate(..., static_cache=True)``): fixed shapes, the default's tokens."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from decodekit import ConfigError, generate
from decodekit.models.gpt import GPT, GPTConfig
from decodekit.models.llama import Llama, LlamaConfig
from decodekit.processors import Temperature, TopP
from decodekit.samplers import BeamSearch, Multinomial


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=32)).eval()


def tiny_llama() -> Llama:
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=50, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64)).eval()
    for p in model.parameters():  # a trained model's scale, not torch's default init
        torch.nn.init.normal_(p, std=0.1) if p.dim() > 1 else torch.nn.init.normal_(p, mean=1.0, std=0.1)
    return model


PROMPT = torch.tensor([[0, 0, 3, 9, 4], [5, 1, 2, 8, 7], [0, 0, 0, 6, 2]])
MASK = (torch.arange(5) >= torch.tensor([[2], [0], [3]])).long()  # left padding of 2, 0 and 3


class Recording:
    """A model whose ``step`` records the shapes of what it is given."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.shapes = inner, []
        self.vocab_size, self.max_context, self.device, self.dtype = inner.vocab_size, inner.max_context, inner.device, inner.dtype

    def new_cache(self, b: int, n: int) -> Any:
        return self.inner.new_cache(b, n)

    def new_slot_cache(self, b: int, n: int) -> Any:
        return self.inner.new_slot_cache(b, n)

    def step(self, input_ids: torch.Tensor, **kw: Any) -> Any:
        self.shapes.append((tuple(input_ids.shape), tuple(kw["position_ids"].shape), tuple(kw["attention_mask"].shape)))
        return self.inner.step(input_ids, **kw)


@pytest.mark.parametrize("make", [tiny_gpt, tiny_llama])
@pytest.mark.parametrize("sampling", [False, True])
def test_static_cache_gives_the_default_caches_tokens_and_logprobs(make: Any, sampling: bool) -> None:
    model = make()
    kw: dict[str, Any] = dict(attention_mask=MASK, max_new_tokens=20, seed=[4, 5, 6], logprobs=3, eos_token_id=7)
    if sampling:
        kw |= dict(processors=[Temperature(1.3), TopP(0.9)], sampler=Multinomial())
    dynamic = generate(model, PROMPT, **kw)
    static = generate(model, PROMPT, static_cache=True, **kw)
    assert static.tokens.tolist() == dynamic.tokens.tolist()
    assert static.finish_reasons == dynamic.finish_reasons and static.lengths.tolist() == dynamic.lengths.tolist()
    torch.testing.assert_close(static.logprobs, dynamic.logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(static.top_logprobs, dynamic.top_logprobs, rtol=0, atol=1e-5)


def test_every_static_step_has_the_same_shapes() -> None:
    model = Recording(tiny_gpt())
    generate(model, PROMPT, attention_mask=MASK, max_new_tokens=12, static_cache=True)
    steps = model.shapes[1:]  # after the prefill
    assert len(steps) == 11 and len(set(steps)) == 1
    assert steps[0] == ((3, 1), (3, 1), (3, 5 + 12))  # one token, one position, the whole cache's mask
    dynamic = Recording(tiny_gpt())
    generate(dynamic, PROMPT, attention_mask=MASK, max_new_tokens=12)
    assert len(set(dynamic.shapes[1:])) == 11  # the default's mask grows by one each step


def test_what_static_cache_refuses_is_one_line() -> None:
    model = tiny_gpt()
    with pytest.raises(ConfigError, match="static_cache=True: the prompt .* exceed the model's context of 64"):
        generate(model, PROMPT, max_new_tokens=60, static_cache=True)
    with pytest.raises(ConfigError, match="static_cache='yes' is not allowed"):
        generate(model, PROMPT, static_cache="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="drives its own loop"):
        generate(model, PROMPT, sampler=BeamSearch(num_beams=2), static_cache=True)


def test_a_model_without_slot_caches_is_refused_by_name() -> None:
    class Plain(Recording):
        def __getattribute__(self, name: str) -> Any:
            if name == "new_slot_cache":
                raise AttributeError(name)
            return super().__getattribute__(name)

    with pytest.raises(ConfigError, match="needs a native model .*Plain has no slot cache"):
        generate(Plain(tiny_gpt()), PROMPT, max_new_tokens=3, static_cache=True)


def test_a_static_step_is_one_graph_that_never_recompiles() -> None:
    """What a CUDA graph needs, checked on CPU: ``torch.compile(fullgraph=True)`` traces the step
    whole (no graph break: no host value read), once for every step (no recompile)."""
    from decodekit.stepping import StaticSteps, prefill

    graphs: list[int] = []

    def counting(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        graphs.append(1)
        return gm.forward

    model, mask = tiny_llama(), MASK.bool()
    full = torch.ones(3, 5 + 8, dtype=torch.bool)
    full[:, :5] = mask
    eager, traced = (StaticSteps(model, prefill(model, PROMPT, mask, 13)[1], full, mask) for _ in range(2))
    step = torch.compile(traced._step, fullgraph=True, backend=counting)
    for token in ([4, 8, 1], [2, 2, 9], [0, 6, 3], [7, 5, 5]):
        eager.token.copy_(torch.tensor(token)[:, None])
        traced.token.copy_(torch.tensor(token)[:, None])
        torch.testing.assert_close(step(), eager._step(), rtol=0, atol=1e-6)
    assert graphs == [1] and traced.cache.lengths.tolist() == [9, 9, 9] and traced.pos[:, 0].tolist() == [7, 9, 6]
    torch._dynamo.reset()
