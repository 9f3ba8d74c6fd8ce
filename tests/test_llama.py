"""The native Llama: transformers' LlamaForCausalLM logits, cached decoding, padding, the engine."""

from __future__ import annotations

import pytest
import torch

from decodekit import generate
from decodekit.engine import Engine, Request
from decodekit.models import CausalLM, KVCache
from decodekit.models.llama import Llama, LlamaConfig, permute_for_gguf

TINY = LlamaConfig(vocab_size=67, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48)


@pytest.fixture
def model() -> Llama:
    torch.manual_seed(0)
    return Llama(TINY).eval()


def test_llama_follows_the_model_protocol(model: Llama) -> None:
    assert isinstance(model, CausalLM)
    assert (model.vocab_size, model.max_context) == (67, 64)
    cache = model.new_cache(3, 10)
    assert isinstance(cache, KVCache) and cache.k.shape == (2, 3, 2, 10, 8)  # n_kv_head keys, not n_head


def test_prefill_then_cached_steps_match_the_full_forward(model: Llama) -> None:
    ids = torch.randint(0, 67, (3, 16))
    full = model(ids)  # [B, T, V]
    cache = model.new_cache(3, 16)
    mask = torch.ones(3, 6, dtype=torch.bool)
    logits, cache = model.step(ids[:, :6], position_ids=torch.arange(6).expand(3, 6), attention_mask=mask, cache=cache)
    torch.testing.assert_close(logits, full[:, 5], rtol=1e-5, atol=1e-5)
    for t in range(6, 16):
        mask = torch.ones(3, t + 1, dtype=torch.bool)
        logits, cache = model.step(ids[:, t : t + 1], position_ids=torch.full((3, 1), t), attention_mask=mask, cache=cache)
        torch.testing.assert_close(logits, full[:, t], rtol=1e-5, atol=1e-5)


def test_left_padded_batch_decodes_each_prompt_as_alone(model: Llama) -> None:
    prompts = [[5, 9, 2, 7, 1], [3, 4], [8, 8, 8]]
    alone = [generate(model, torch.tensor([p]), max_new_tokens=6).sequences[0, len(p):].tolist() for p in prompts]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    together = generate(model, ids, attention_mask=mask, max_new_tokens=6).sequences[:, width:].tolist()
    assert together == alone


def test_request_engine_runs_llama_on_its_slot_cache(model: Llama) -> None:
    prompts = [[5, 9, 2, 7, 1], [3, 4], [8, 8, 8, 1, 2, 3, 4]]
    expected = [generate(model, torch.tensor([p]), max_new_tokens=5).sequences[0, len(p):].tolist() for p in prompts]
    engine = Engine(model, max_slots=2, settings={"temperature": 0})
    outs = {o.id: o.tokens for o in engine.run([Request(prompt_ids=p, max_new_tokens=5, id=i) for i, p in enumerate(prompts)])}
    assert [list(outs[i]) for i in range(3)] == expected


def test_logits_match_transformers_llama_on_gguf_permuted_weights() -> None:
    """Adjacent-pair RoPE on GGUF's permuted q/k rows equals transformers' rotate_half on the originals."""
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(
        vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=5000.0, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    config = LlamaConfig(vocab_size=67, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                         intermediate_size=48, rms_norm_eps=1e-6, rope_theta=5000.0)  # fmt: skip
    ours = Llama(config).eval()
    state = {"tok_embeddings.weight": hf.model.embed_tokens.weight, "norm.weight": hf.model.norm.weight,
             "output.weight": hf.lm_head.weight}  # fmt: skip
    for i, layer in enumerate(hf.model.layers):
        attn, mlp, p = layer.self_attn, layer.mlp, f"layers.{i}."
        state |= {
            p + "attention.wq.weight": permute_for_gguf(attn.q_proj.weight, 4),
            p + "attention.wk.weight": permute_for_gguf(attn.k_proj.weight, 2),
            p + "attention.wv.weight": attn.v_proj.weight, p + "attention.wo.weight": attn.o_proj.weight,
            p + "feed_forward.w1.weight": mlp.gate_proj.weight, p + "feed_forward.w3.weight": mlp.up_proj.weight,
            p + "feed_forward.w2.weight": mlp.down_proj.weight,
            p + "attention_norm.weight": layer.input_layernorm.weight, p + "ffn_norm.weight": layer.post_attention_layernorm.weight,
        }  # fmt: skip
    ours.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True)
    ids = torch.randint(0, 67, (2, 40))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
