"""The native GPT: cached decoding matches a full forward pass, padding changes nothing."""

from __future__ import annotations

import pytest
import torch

from decodekit.errors import ConfigError
from decodekit.models import GPT, CausalLM, GPTConfig, KVCache

TINY = GPTConfig(block_size=32, vocab_size=61, n_layer=2, n_head=4, n_embd=32)


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(TINY).eval()


def prefill(model: GPT, ids: torch.Tensor, mask: torch.Tensor, max_length: int):
    """One ``step`` over a (left-padded) prompt, positions as the loop makes them."""
    cache = model.new_cache(ids.shape[0], max_length)
    position_ids = mask.long().cumsum(-1) - 1
    return model.step(ids, position_ids=position_ids, attention_mask=mask, cache=cache)


def test_gpt_follows_the_model_protocol(model: GPT) -> None:
    assert isinstance(model, CausalLM)
    assert (model.vocab_size, model.max_context) == (61, 32)
    assert model.device == torch.device("cpu") and model.dtype == torch.float32


def test_lm_head_is_tied_to_the_token_embedding(model: GPT) -> None:
    assert model.lm_head.weight is model.transformer.wte.weight


def test_prefill_then_cached_steps_match_the_full_forward(model: GPT) -> None:
    ids = torch.randint(0, TINY.vocab_size, (3, 20))
    full = model(ids)  # [B, T, V]
    logits, cache = prefill(model, ids[:, :8], torch.ones(3, 8, dtype=torch.bool), 20)
    torch.testing.assert_close(logits, full[:, 7], rtol=1e-5, atol=1e-5)
    for t in range(8, 20):
        mask = torch.ones(3, t + 1, dtype=torch.bool)
        logits, cache = model.step(ids[:, t : t + 1], position_ids=torch.full((3, 1), t), attention_mask=mask, cache=cache)
        torch.testing.assert_close(logits, full[:, t], rtol=1e-5, atol=1e-5)
    assert cache.length == 20


def test_step_returns_float_logits_of_the_last_position_only(model: GPT) -> None:
    logits, cache = prefill(model, torch.randint(0, 61, (2, 5)), torch.ones(2, 5, dtype=torch.bool), 8)
    assert logits.shape == (2, 61) and logits.dtype == torch.float32
    assert isinstance(cache, KVCache) and cache.k.shape == (2, 2, 4, 8, 8)


def test_left_padded_rows_match_each_prompt_alone(model: GPT) -> None:
    prompts = [torch.randint(0, 61, (n,)) for n in (7, 3, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = p, True
    batch_logits, cache = prefill(model, ids, mask, width + 4)
    next_tokens = torch.randint(0, 61, (len(prompts), 4))
    for t in range(4):  # a few cached steps too
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.bool)], dim=1)
        position_ids = mask.long().sum(-1, keepdim=True) - 1
        step_logits, cache = model.step(next_tokens[:, t : t + 1], position_ids=position_ids, attention_mask=mask, cache=cache)
    for row, p in enumerate(prompts):
        alone = model(p[None])[0, -1]
        torch.testing.assert_close(batch_logits[row], alone, rtol=1e-5, atol=1e-5)
        alone_after = model(torch.cat([p, next_tokens[row]])[None])[0, -1]
        torch.testing.assert_close(step_logits[row], alone_after, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(step_logits).all()


def test_reorder_cache_takes_rows_by_index_and_repeats(model: GPT) -> None:
    ids = torch.randint(0, 61, (3, 6))
    _, cache = prefill(model, ids, torch.ones(3, 6, dtype=torch.bool), 8)
    index = torch.tensor([2, 2, 0])
    reordered = model.reorder_cache(cache, index)
    assert reordered.length == 6
    torch.testing.assert_close(reordered.k, cache.k[:, index])
    nxt = torch.randint(0, 61, (3, 1))
    logits, _ = model.step(nxt, position_ids=torch.full((3, 1), 6), attention_mask=torch.ones(3, 7, dtype=torch.bool), cache=reordered)
    expected = model(torch.cat([ids[index], nxt], dim=1))[:, -1]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_cache_overflow_and_bad_mask_are_config_errors(model: GPT) -> None:
    with pytest.raises(ConfigError, match="block_size"):
        model.new_cache(1, 33)
    cache = model.new_cache(1, 4)
    with pytest.raises(ConfigError, match="cache holds 4"):
        model.step(torch.zeros(1, 5, dtype=torch.long), position_ids=torch.zeros(1, 5, dtype=torch.long),
                   attention_mask=torch.ones(1, 5, dtype=torch.bool), cache=cache)
    with pytest.raises(ConfigError, match="attention_mask"):
        model.step(torch.zeros(1, 2, dtype=torch.long), position_ids=torch.zeros(1, 2, dtype=torch.long),
                   attention_mask=torch.ones(1, 3, dtype=torch.bool), cache=cache)


def test_config_rejects_width_not_divisible_by_heads() -> None:
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(n_embd=30, n_head=4)


def test_bfloat16_model_steps_and_returns_float32() -> None:
    torch.manual_seed(0)
    model = GPT(TINY).to(torch.bfloat16).eval()
    logits, _ = prefill(model, torch.randint(0, 61, (2, 4)), torch.ones(2, 4, dtype=torch.bool), 6)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_the_tied_embedding_is_stored_column_major_and_saved_contiguous(model: GPT) -> None:
    weight = model.transformer.wte.weight
    assert weight.shape == (61, 32) and weight.stride() == (1, 61)  # [C, V] storage: the head reads it in order
    state = model.state_dict()
    assert state["transformer.wte.weight"].is_contiguous()  # what safetensors' save_file needs
    assert state["lm_head.weight"] is state["transformer.wte.weight"]
    fresh = GPT(TINY, init=False)
    fresh.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)  # replaces the parameters
    assert fresh.lm_head.weight is fresh.transformer.wte.weight and fresh.transformer.wte.weight.stride() == (1, 61)
    ids = torch.randint(0, TINY.vocab_size, (2, 9))
    assert torch.equal(fresh.eval()(ids), model(ids))


def test_packed_weights_give_the_plain_weights_logits_and_follow_weight_changes(model: GPT) -> None:
    from decodekit.models.packing import Linear

    ids = torch.randint(0, TINY.vocab_size, (3, 12))
    with torch.no_grad():
        model(ids)  # products this small stay on the plain path: nothing is packed
        assert all(getattr(m, "_pack", None) is None for m in model.modules() if isinstance(m, Linear))
        for m in model.modules():
            if isinstance(m, Linear):
                m.min_macs = 0  # pack whatever the size, to test the packed path on a tiny model
        packed = model(ids)
        made = [m._pack is not None for m in model.modules() if isinstance(m, Linear)]
        plain = model.pack_weights(False)(ids)
        assert all(m._pack is None for m in model.modules() if isinstance(m, Linear))
        torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
        if torch.backends.mkldnn.is_available():
            assert all(made) and len(made) == 4 * TINY.n_layer + 1  # every block matrix and the head
        model.pack_weights(True)
        model(ids)
        model.transformer.h[0].mlp.c_fc.weight.mul_(2.0)  # an in-place change makes the pack stale
        changed = model(ids)
        torch.testing.assert_close(changed, model.pack_weights(False)(ids), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(changed, plain)
        model.pack_weights(True)
        layer = model.transformer.h[1].attn.c_attn
        layer.weight = torch.nn.Parameter(layer.weight.detach() * 0.5)  # a new parameter: packed anew
        replaced = model(ids)
        torch.testing.assert_close(replaced, model.pack_weights(False)(ids), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(replaced, changed)
    model.pack_weights(True)
    loss = model(ids).logsumexp(-1).mean()  # with autograd: the plain weights, gradients flow
    loss.backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None


def test_one_row_takes_the_plain_weight_and_two_rows_the_packed_one() -> None:
    from decodekit.models.packing import Linear

    torch.manual_seed(0)
    layer = Linear(64, 96)
    layer.min_macs = 0  # the row count decides, not the size
    with torch.no_grad():
        one = torch.randn(1, 1, 64)
        assert torch.equal(layer(one), torch.nn.functional.linear(one, layer.weight, layer.bias))  # exactly: plain
        assert getattr(layer, "_pack", None) is None
        two = torch.randn(2, 64)
        torch.testing.assert_close(layer(two), torch.nn.functional.linear(two, layer.weight, layer.bias))
    if torch.backends.mkldnn.is_available():
        assert layer._pack is not None


def test_a_failing_packed_call_falls_back_to_the_plain_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    from decodekit.models.packing import Linear

    torch.manual_seed(0)
    layer = Linear(32, 48)
    layer.min_macs = 0
    x = torch.randn(3, 32)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)

    def refuse(*args: object) -> torch.Tensor:
        raise RuntimeError("unsupported")

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", refuse)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
    assert not layer.packing and layer._pack is None


def test_torch_compile_traces_the_plain_linear_not_the_packed_one() -> None:
    """Under torch.compile the layers give the compiler F.linear (it packs weights its own way;
    inductor cannot lower oneDNN's packed op), and the result is the same."""
    from decodekit.models.packing import Linear

    targets: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):  # records what was traced
        targets.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    torch.manual_seed(0)
    layer = Linear(256, 1024)  # 8 rows x 256 x 1024: large enough to be packed when not compiling
    x = torch.randn(8, 256)
    with torch.no_grad():
        eager = layer(x)
        assert layer._pack is not None or not torch.backends.mkldnn.is_available()
        compiled = torch.compile(layer, backend=backend)(x)
    assert targets and not any("mkldnn" in t for t in targets)
    assert any("linear" in t for t in targets)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_a_one_position_mask_is_the_general_causal_formula() -> None:
    from decodekit.models.cache import KVCache

    g = torch.Generator().manual_seed(0)
    for B, L, length in [(1, 8, 0), (3, 10, 4), (2, 6, 5)]:
        cache = KVCache(torch.zeros(1, B, 1, L, 2), torch.zeros(1, B, 1, L, 2), length)
        padding = torch.rand(B, length + 1, generator=g) > 0.4  # some earlier positions hidden
        query, key = torch.arange(length, length + 1)[:, None], torch.arange(length + 1)[None, :]
        want = ((key <= query) & padding[:, None, None, :]) | (key == query)  # causal, the padding, itself
        before = padding.clone()
        assert torch.equal(cache.attention_mask(padding, 1), want)
        assert torch.equal(cache.attention_mask(padding.long(), 1), want)
        assert torch.equal(padding, before)  # the caller's mask is left as it was
