"""The key / value cache in bfloat16 (``model.kv_cache=bf16``): half the bytes, each key and value
rounded once when written (as torch rounds), read back in the model's dtype by every path (the
library's attention, the native steps, the engine's slots, static caches); within measured bounds
of the float32 cache on the embedded model (docs/models.md, "Key / value cache")."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from decodekit import ConfigError, generate
from decodekit.kernels import native_kernels, use_kernels
from decodekit.models import GPT, GPTConfig, load_model
from decodekit.models.cache import set_kv_cache
from decodekit.models.llama import Llama, LlamaConfig

NATIVE, WHY_NOT = native_kernels()
needs_native = pytest.mark.skipif(NATIVE is None, reason=f"native kernels unavailable here: {WHY_NOT}")
HELDOUT = Path(__file__).parent / "fixtures" / "heldout" / "english.txt"


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=300, n_layer=2, n_head=2, n_embd=48)).eval()
    for name, p in model.named_parameters():  # a scale at which attention is not uniform and tokens vary
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)
        else:
            torch.nn.init.normal_(p, mean=1.0 if name.endswith("weight") else 0.0, std=0.1)
    return model


def tiny_llama() -> Llama:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96)
    model = Llama(config).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1) if p.dim() > 1 else torch.nn.init.normal_(p, mean=1.0, std=0.1)
    return model


def bf16_cache(model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(model)
    set_kv_cache(model, "bf16")
    return model


def teacher_forced(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T - 1, V]`` after each prefix ``ids[:, :t]`` (t >= 1), one cached step per position."""
    B, T = ids.shape
    cache, mask, out = model.new_cache(B, T), torch.ones(B, T, dtype=torch.bool), []
    for t in range(T - 1):
        logits, cache = model.step(ids[:, t : t + 1], position_ids=torch.full((B, 1), t), attention_mask=mask[:, : t + 1],
                                   cache=cache)  # fmt: skip
        out.append(logits)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("make", [tiny_gpt, tiny_llama])
def test_the_cache_is_bfloat16_and_holds_the_float32_caches_values_rounded(make) -> None:
    model = use_kernels(make(), "library")
    half = bf16_cache(model)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    mask, pos = torch.ones(2, 9, dtype=torch.bool), torch.arange(9).expand(2, 9)
    full_cache, half_cache = model.new_cache(2, 12), half.new_cache(2, 12)
    assert full_cache.k.dtype == torch.float32 and half_cache.k.dtype == half_cache.v.dtype == torch.bfloat16
    assert half_cache.k.element_size() * 2 == full_cache.k.element_size()
    full, _ = model.step(ids, position_ids=pos, attention_mask=mask, cache=full_cache)
    low, _ = half.step(ids, position_ids=pos, attention_mask=mask, cache=half_cache)
    # layer 0's keys and values come from the embeddings alone: the same float32 values, rounded once
    assert torch.equal(half_cache.k[0, :, :, :9], full_cache.k[0, :, :, :9].to(torch.bfloat16))
    assert torch.equal(half_cache.v[0, :, :, :9], full_cache.v[0, :, :, :9].to(torch.bfloat16))
    assert low.dtype == torch.float32
    difference = (low - full).abs().max().item()
    assert 0 < difference < 0.05 * full.abs().max().item()  # attention read the rounded values, and little moved


@needs_native
@pytest.mark.parametrize("make", [tiny_gpt, tiny_llama])
def test_the_native_steps_write_and_read_a_bfloat16_cache_as_the_library_path(make) -> None:
    library = bf16_cache(use_kernels(make(), "library"))
    native = use_kernels(copy.deepcopy(library), "native")
    ids = torch.randint(1, 299, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :2] = False  # a left-padded row
    op = "decodekit_cpu::gpt_step" if isinstance(native, GPT) else "decodekit_cpu::llama_step"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = generate(native, ids, attention_mask=mask, max_new_tokens=14, output_scores=True)
    assert sum(e.name == op for e in prof.events()) == 13  # every step after the prefill, natively
    want = generate(library, ids, attention_mask=mask, max_new_tokens=14, output_scores=True)
    assert torch.equal(got.tokens, want.tokens)
    # the two paths' keys and values agree to float32 rounding (LayerNorm, GELU), and one that lies that
    # close to the middle of two bfloat16s rounds to the other in one path: a bfloat16 step in that
    # value (measured: logits up to 6.6 apart by up to 1.5e-4, where a float32 cache gives 4e-6)
    for x, y in zip(got.scores, want.scores):
        torch.testing.assert_close(x, y, atol=1e-3, rtol=0)


@needs_native
def test_the_native_attention_rounds_each_new_key_and_value_as_torch_does() -> None:
    g = torch.Generator().manual_seed(3)
    B, H, L, D, S = 2, 3, 12, 40, 9
    keys = torch.randn(B, H, L, D, generator=g).to(torch.bfloat16)
    values = torch.randn(B, H, L, D, generator=g).to(torch.bfloat16)
    qkv = torch.randn(B, 3 * H * D, generator=g) * 3
    qkv[0, H * D : H * D + 2] = torch.tensor([float("inf"), 3.4028235e38])  # row 0's keys: inf, and past bf16's range
    ties = torch.tensor([1.00390625, 1.01171875, -1.00390625])  # halfway between two bfloat16s: to the even one
    qkv[1, H * D + 5 : H * D + 8], qkv[1, 2 * H * D : 2 * H * D + 3] = ties, ties
    pos, mask = [S - 1, 4], torch.zeros(B, S)
    mask[1, 5:] = float("-inf")
    want_keys, want_values = keys.clone(), values.clone()
    q, k, v = qkv.split(H * D, dim=1)
    for b in range(B):
        want_keys[b, :, pos[b]] = k[b].view(H, D).to(torch.bfloat16)
        want_values[b, :, pos[b]] = v[b].view(H, D).to(torch.bfloat16)
    got = NATIVE.ops.attention_step(qkv, keys, values, pos, mask, H)
    assert torch.equal(keys.view(torch.int16), want_keys.view(torch.int16))  # the same bits as torch's rounding
    assert torch.equal(values.view(torch.int16), want_values.view(torch.int16))
    assert want_values[1, 0, 4, :3].tolist() == [1.0, 1.015625, -1.0]
    for b in range(B):  # in float64 from the rounded cache; row 0's head 0 meets infinite keys as torch does
        scores = (want_keys[b, :, :S].double() @ q[b].view(H, D, 1).double()).squeeze(-1) / math.sqrt(D) + mask[b].double()
        want = (torch.softmax(scores, dim=1)[:, None, :] @ want_values[b, :, :S].double()).flatten()
        torch.testing.assert_close(got[b], want.float(), atol=2e-6, rtol=1e-5, equal_nan=True)
    assert torch.isfinite(got[1]).all() and torch.isfinite(got[0, D:]).all()


def test_the_engine_static_caches_and_beams_keep_a_bfloat16_cache() -> None:
    from decodekit.engine import Engine, Request
    from decodekit.samplers import BeamSearch
    from decodekit.text import generate_text
    from decodekit.tokenization import load_tokenizer

    model = bf16_cache(tiny_gpt())
    ids = torch.randint(1, 299, (2, 6), generator=torch.Generator().manual_seed(4))
    dynamic = generate(model, ids, max_new_tokens=10, output_scores=True)
    static = generate(model, ids, max_new_tokens=10, static_cache=True, output_scores=True)
    assert torch.equal(static.tokens, dynamic.tokens) and len(set(dynamic.tokens.flatten().tolist())) > 3
    for x, y in zip(static.scores, dynamic.scores):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    full = generate(tiny_gpt(), ids, max_new_tokens=10, output_scores=True)  # a float32 cache: other logits
    assert any(not torch.equal(x, y) for x, y in zip(full.scores, dynamic.scores))
    beams = generate(model, ids, sampler=BeamSearch(num_beams=3), max_new_tokens=6)
    assert beams.tokens.shape == (2, 6)
    embedded, extras = load_model("default", device="cpu", kv_cache="bf16")
    tokenizer = load_tokenizer("auto", extras)
    requests = [Request(prompt=p, max_new_tokens=8 + 5 * i, id=i) for i, p in enumerate(["Once upon", "The sea", "Why", "A"])]
    got = Engine(embedded, tokenizer, processors=[], max_slots=3).generate(requests)
    for request, out in zip(requests, got):  # each slot's tokens are its request's alone
        want = generate_text(embedded, tokenizer, [request.prompt], max_new_tokens=request.max_new_tokens, seed=request.seed,
                             stop=request.stop, eos_token_id=request.eos_token_id, output=[])[0]  # fmt: skip
        assert out.tokens == want.tokens, request


def test_bad_values_and_models_with_their_own_cache_get_one_line() -> None:
    with pytest.raises(ConfigError, match=r"kv_cache='fp8' is not allowed: must be one of 'auto', 'bf16'"):
        load_model("default", device="cpu", kv_cache="fp8")

    class Adapter:  # a model that keeps a cache of its own (as the transformers adapter does)
        pass

    with pytest.raises(ConfigError, match=r"kv_cache='bf16': Adapter keeps a cache of its own"):
        set_kv_cache(Adapter(), "bf16")
    set_kv_cache(Adapter(), "auto")  # nothing to change
    model, _ = load_model("default", device="cpu", kv_cache="bf16")
    assert model.new_cache(1, 4).k.dtype == torch.bfloat16
    set_kv_cache(model, "auto")
    assert model.new_cache(1, 4).k.dtype == torch.float32


def test_a_job_names_a_bfloat16_cache_so_it_is_not_resumed_with_another() -> None:
    from decodekit.jobs.local import ModelSpec

    assert ModelSpec(source="default", kv_cache="bf16").label() == "default [kv_cache=bf16]"
    assert ModelSpec(source="default", weights="int8", kv_cache="bf16").label() == "default [weights=int8] [kv_cache=bf16]"


def test_the_embedded_models_logits_and_perplexity_stay_close_to_the_float32_caches() -> None:
    ids = torch.tensor([256, *HELDOUT.read_bytes()])
    windows = torch.cat([ids[i * 256 : (i + 1) * 256][None] for i in range(6)])  # 6 held-out windows of 256 bytes
    full, _ = load_model("default", device="cpu")
    half, _ = load_model("default", device="cpu", kv_cache="bf16")
    with torch.no_grad():
        reference, logits = teacher_forced(full, windows), teacher_forced(half, windows)
    targets = windows[:, 1:]
    error = (logits - reference).abs()
    ppl = {k: F.cross_entropy(v.flatten(0, 1), targets.flatten()).exp().item() for k, v in (("auto", reference), ("bf16", logits))}
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(f"bf16 cache: max |d| {error.max():.4f}, mean |d| {error.mean():.2e}, top-1 {top1:.2%}, ppl {ppl}")
    assert error.max() > 0  # the cache really is rounded
    assert error.max() < 0.1 and top1 > 0.99, (error.max(), top1)
    assert abs(ppl["bf16"] / ppl["auto"] - 1) < 0.002, ppl


def test_a_large_cache_is_on_huge_pages_and_decodes_as_an_ordinary_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import decodekit.models.cache as cache_module
    from decodekit.kernels import HUGE_ZEROS, huge_pages_available

    if not huge_pages_available():
        pytest.skip("no transparent huge pages here")
    model, _ = load_model("default", device="cpu")
    small, large = model.new_cache(1, 16), model.new_cache(64, 256)  # 18 KiB and 72 MiB of keys
    assert large.k.numel() * 4 >= HUGE_ZEROS > small.k.numel() * 4
    assert large.k.data_ptr() % (2 << 20) == 0 and large.v.data_ptr() % (2 << 20) == 0 and large.k.is_contiguous()
    assert small.k.data_ptr() % (2 << 20) != 0 or small.k.untyped_storage().nbytes() < (2 << 20)
    assert not large.k.any() and not large.v.any()
    ids = torch.randint(1, 250, (64, 12), generator=torch.Generator().manual_seed(5))
    made = []
    real = cache_module.huge_zeros
    monkeypatch.setattr(cache_module, "huge_zeros", lambda *args: made.append(real(*args)) or made[-1])
    huge = generate(model, ids, max_new_tokens=20, output_scores=True)
    assert len(made) == 2 and all(t is not None and t.data_ptr() % (2 << 20) == 0 for t in made)  # keys, values
    monkeypatch.setattr(cache_module, "huge_zeros", lambda *args: None)
    plain = generate(model, ids, max_new_tokens=20, output_scores=True)
    assert torch.equal(huge.tokens, plain.tokens) and all(torch.equal(x, y) for x, y in zip(huge.scores, plain.scores))
