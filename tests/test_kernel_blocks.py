"""decodekit's native attention step and few-row GPT and Llama steps (decodekit/kernels): attention
against a float64 reference with each row's key and value written at its own position, batches and
the engine's slots through the native steps, larger batches through the native attention layer by
layer, and the loop's native operators against their torch versions."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from decodekit import generate
from decodekit.kernels import native_kernels
from decodekit.models import load_model

NATIVE, WHY_NOT = native_kernels()
pytestmark = pytest.mark.skipif(NATIVE is None, reason=f"native kernels unavailable here: {WHY_NOT}")
LOOP_OPS = {"decodekit_cpu::argmax_rows", "decodekit_cpu::invalid_rows", "decodekit_cpu::settle_rows"}  # the loop's


def _reference(qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: list[int], mask: torch.Tensor,
               heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Attention in float64, one row and head at a time, after writing the new keys and values."""
    B, C = qkv.shape[0], qkv.shape[1] // 3
    D, S = C // heads, mask.shape[1]
    q, k, v = qkv.double().split(C, dim=1)
    keys, values = keys.clone(), values.clone()
    out = torch.zeros(B, C, dtype=torch.float64)
    for b in range(B):
        for h in range(heads):
            cols = slice(h * D, (h + 1) * D)
            keys[b, h, pos[b]], values[b, h, pos[b]] = k[b, cols].float(), v[b, cols].float()
            scores = keys[b, h, :S].double() @ q[b, cols] / math.sqrt(D) + mask[b].double()
            out[b, cols] = torch.softmax(scores, dim=0) @ values[b, h, :S].double()
    return out.float(), keys, values


@pytest.mark.parametrize(("heads", "dim", "span"), [(1, 16, 1), (3, 24, 17), (2, 80, 40), (12, 64, 33)])
def test_attention_step_writes_each_row_at_its_position_and_attends_in_float32(heads: int, dim: int, span: int) -> None:
    g = torch.Generator().manual_seed(heads * 100 + dim)
    B, L, C = 3, span + 5, heads * dim
    keys, values = torch.randn(B, heads, L, dim, generator=g), torch.randn(B, heads, L, dim, generator=g)
    qkv = torch.randn(B, 3 * C, generator=g)
    pos = [span - 1, 0, span // 2]  # each row's own length, as in the request engine's slots
    mask = torch.zeros(B, span)
    for b, p in enumerate(pos):
        mask[b, p + 1 :] = float("-inf")  # later positions: another sequence's, or nothing yet
    if span > 2:
        mask[2, 0] = float("-inf")  # a left-padding position
    want, want_keys, want_values = _reference(qkv, keys, values, pos, mask, heads)
    got = NATIVE.ops.attention_step(qkv, keys, values, pos, mask, heads)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)  # only the new positions changed


def test_attention_step_refuses_bad_arguments_in_one_line() -> None:
    keys = torch.zeros(2, 2, 8, 4)
    qkv, mask = torch.zeros(2, 24), torch.zeros(2, 5)
    with pytest.raises(RuntimeError, match="new position must be among the S attended"):
        NATIVE.ops.attention_step(qkv, keys, keys.clone(), [5, 1], mask, 2)
    with pytest.raises(RuntimeError, match="one position per row"):
        NATIVE.ops.attention_step(qkv, keys, keys.clone(), [1], mask, 2)
    with pytest.raises(RuntimeError, match="qkv must be a contiguous float32 CPU tensor of 2 rows of 24 values"):
        NATIVE.ops.attention_step(torch.zeros(2, 23), keys, keys.clone(), [1, 1], mask, 2)
    with pytest.raises(RuntimeError, match=r"float32 or bfloat16 \[B, H, L, D\] caches of the same dtype and layout"):
        NATIVE.ops.attention_step(qkv, keys, torch.zeros(2, 2, 7, 4), [1, 1], mask, 2)
    with pytest.raises(RuntimeError, match="caches of the same dtype and layout"):  # bfloat16 keys, float32 values
        NATIVE.ops.attention_step(qkv, keys.bfloat16(), keys.clone(), [1, 1], mask, 2)
    with pytest.raises(RuntimeError, match="caches of the same dtype and layout"):  # float16: neither
        NATIVE.ops.attention_step(qkv, keys.half(), keys.half(), [1, 1], mask, 2)


def test_a_nan_input_row_gives_nan_outputs_through_w8a8() -> None:
    if not NATIVE.vnni:
        pytest.skip("this CPU lacks AVX512-VNNI")
    from decodekit.models.weights import W8A8Linear

    layer = W8A8Linear(torch.randn(40, 96) * 0.05, torch.zeros(40))
    x = torch.randn(2, 96)
    x[1, 50] = float("nan")
    got = NATIVE.ops.linear_w8a8(x, layer.weight, layer._row_sums(), layer.scale, layer.bias)
    assert got[1].isnan().all()  # the model's invalid-logits check then sees it
    assert torch.equal(got[0], NATIVE.ops.linear_w8a8(x[0], layer.weight, layer._row_sums(), layer.scale, layer.bias))


def _ops(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> tuple[dict[str, int], object]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = generate(model, ids, output_scores=True, **kwargs)
    counts: dict[str, int] = {}
    for event in prof.events():
        if event.name.startswith("decodekit_cpu::") and event.name not in LOOP_OPS:
            counts[event.name] = counts.get(event.name, 0) + 1
    return counts, out


@pytest.mark.parametrize("weights", ["float32", "w8a8"])
def test_a_batch_steps_in_one_native_call_with_the_layer_by_layer_tokens(weights: str) -> None:
    if weights == "w8a8" and not NATIVE.vnni:
        pytest.skip("this CPU lacks AVX512-VNNI")
    model, _ = load_model("default", device="cpu", weights=weights, kernels="native")
    ids = torch.tensor([[0, 0, 5, 40, 41, 42, 43, 44], [99, 7, 8, 9, 10, 11, 12, 13], [0, 72, 101, 108, 108, 111, 3, 4]])
    mask = (ids != 0) | (torch.arange(8) >= 2)
    mask[0, :2] = False
    mask[2, 0] = False  # two rows left padded
    counts, whole = _ops(model, ids, attention_mask=mask, max_new_tokens=10)
    assert counts["decodekit_cpu::gpt_step"] == 9  # every step after the prefill, in one call
    layered = copy.deepcopy(model)
    layered._step_plan = lambda *args: None  # layer by layer: the same products and attention
    counts, by_layer = _ops(layered, ids, attention_mask=mask, max_new_tokens=10)
    assert "decodekit_cpu::gpt_step" not in counts
    assert counts["decodekit_cpu::attention_step"] == 9 * model.config.n_layer
    assert torch.equal(whole.tokens, by_layer.tokens)
    tolerance = 1e-4 if weights == "float32" else 0.2  # w8a8 rounds each input to int8: a last-bit change moves a step
    for x, y in zip(whole.scores, by_layer.scores):  # LayerNorm and GELU: native loops against torch's
        torch.testing.assert_close(x, y, atol=tolerance, rtol=0)
    alone = generate(model, ids[1:2], max_new_tokens=10, output_scores=True)  # the unpadded row by itself
    assert all(torch.equal(x[1], y[0]) for x, y in zip(whole.scores, alone.scores))  # the same bits as in the batch


@pytest.mark.parametrize("config", [{"activation": "gelu"}, {"activation": "gelu_tanh", "bias": False}])
def test_the_native_steps_layernorm_and_gelu_follow_torchs(config: dict) -> None:
    from decodekit.kernels import use_kernels
    from decodekit.models import GPT, GPTConfig

    torch.manual_seed(0)
    library = GPT(GPTConfig(block_size=64, vocab_size=300, n_layer=2, n_head=2, n_embd=48, **config)).eval()
    for name, p in library.named_parameters():  # norms away from 1 and 0, activations over GELU's curve
        torch.nn.init.normal_(p, mean=0.5 if name.endswith("ln_1.weight") else 0.0, std=0.3)
    native = use_kernels(copy.deepcopy(library), "native")
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    counts, got = _ops(native, ids, max_new_tokens=12)
    assert counts["decodekit_cpu::gpt_step"] == 11
    want = generate(use_kernels(library, "library"), ids, max_new_tokens=12, output_scores=True)
    assert torch.equal(got.tokens, want.tokens)
    for x, y in zip(got.scores, want.scores):  # erf to 1.5e-7, tanh through exp: float32 rounding apart
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-5)
        assert x.std() > 0.1  # logits that move with the input, not a constant


def test_a_larger_batch_attends_natively_layer_by_layer_with_the_library_paths_tokens() -> None:
    native, _ = load_model("default", device="cpu", kernels="native")
    library, _ = load_model("default", device="cpu", kernels="library")
    ids = torch.randint(1, 250, (6, 7), generator=torch.Generator().manual_seed(0))  # 6 rows: past float32's 4
    counts, got = _ops(native, ids, max_new_tokens=12)
    assert "decodekit_cpu::gpt_step" not in counts
    assert counts["decodekit_cpu::attention_step"] == 11 * native.config.n_layer
    counts, want = _ops(library, ids, max_new_tokens=12)
    assert counts == {}
    assert torch.equal(got.tokens, want.tokens)
    for x, y in zip(got.scores, want.scores):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)


def test_the_engine_steps_its_slots_through_native_blocks_at_their_own_lengths() -> None:
    from decodekit.engine import Engine, Request
    from decodekit.tokenization import load_tokenizer

    native, extras = load_model("default", device="cpu", kernels="native")
    library, _ = load_model("default", device="cpu", kernels="library")
    tokenizer = load_tokenizer("auto", extras)
    prompts = ["Once upon a time", "The sea", "Why", "A long time ago in a land", "Hi"]
    requests = [Request(prompt=p, max_new_tokens=6 + 3 * i, id=i) for i, p in enumerate(prompts)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        got = Engine(native, tokenizer, processors=[], max_slots=3).generate(requests)
    rows = [e.input_shapes[0][0] for e in prof.events() if e.name == "decodekit_cpu::gpt_step"]
    assert rows.count(3) >= 5  # three slots at once, each at its own length
    want = Engine(library, tokenizer, processors=[], max_slots=3).generate(requests)
    assert [o.tokens for o in got] == [o.tokens for o in want]


def _llama(**changes) -> torch.nn.Module:
    from decodekit.models.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    config = dict(vocab_size=300, block_size=96, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96)
    model = Llama(LlamaConfig(**{**config, **changes})).eval()
    for p in model.parameters():  # a trained model's scale, not torch's default init
        torch.nn.init.normal_(p, std=0.1) if p.dim() > 1 else torch.nn.init.normal_(p, mean=1.0, std=0.1)
    return model


@pytest.mark.parametrize("changes", [{}, {"rope_dim": 8, "rope_scaling": "linear", "rope_scale": 2.0}, {"n_kv_head": 4}])
def test_a_llama_steps_through_native_blocks_with_the_library_paths_tokens(changes: dict) -> None:
    from decodekit.kernels import use_kernels

    library = _llama(**changes)
    native = use_kernels(copy.deepcopy(library), "native")
    ids = torch.randint(1, 299, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :2] = False  # a left-padded row: its rotary positions start later than its cache's
    counts, got = _ops(native, ids, attention_mask=mask, max_new_tokens=16)
    assert counts["decodekit_cpu::llama_step"] == 15  # every step after the prefill, in one call
    want = generate(library, ids, attention_mask=mask, max_new_tokens=16, output_scores=True)
    assert torch.equal(got.tokens, want.tokens)
    for x, y in zip(got.scores, want.scores):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
    with torch.no_grad():  # a changed norm makes the kept arguments again
        native.layers[1].ffn_norm.weight = torch.nn.Parameter(native.layers[1].ffn_norm.weight * 0.5)
        library.layers[1].ffn_norm.weight = torch.nn.Parameter(library.layers[1].ffn_norm.weight * 0.5)
    a = generate(native, ids, attention_mask=mask, max_new_tokens=8, output_scores=True)
    b = generate(library, ids, attention_mask=mask, max_new_tokens=8, output_scores=True)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, got.tokens[:, :8])
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)


def test_a_w8a8_llama_in_the_engines_slots_through_native_blocks() -> None:
    if not NATIVE.vnni:
        pytest.skip("this CPU lacks AVX512-VNNI")
    from decodekit.engine import Engine, Request
    from decodekit.kernels import use_kernels
    from decodekit.models.weights import convert_weights
    from decodekit.tokenization import ByteTokenizer

    base = convert_weights(_llama(vocab_size=257), "w8a8")
    native, library = use_kernels(copy.deepcopy(base), "native"), use_kernels(base, "library")
    requests = [Request(prompt=p, max_new_tokens=5 + 4 * i, id=i) for i, p in enumerate(["Once", "The sea", "Why", "Hi"])]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        got = Engine(native, ByteTokenizer(), processors=[], max_slots=3).generate(requests)
    rows = [e.input_shapes[0][0] for e in prof.events() if e.name == "decodekit_cpu::llama_step"]
    assert rows.count(3) >= 3
    want = Engine(library, ByteTokenizer(), processors=[], max_slots=3).generate(requests)
    assert [o.tokens for o in got] == [o.tokens for o in want]


def test_the_whole_steps_refuse_bad_arguments_in_one_line() -> None:
    keys = torch.zeros(1, 1, 2, 8, 4)  # one layer, one row, two heads of 4
    ids, pos, mask = torch.tensor([[3]]), torch.tensor([[2]]), torch.ones(1, 3, dtype=torch.bool)
    emb, table, w = torch.zeros(10, 8), torch.zeros(8, 2), torch.zeros(8, 8)
    llama = [torch.ones(8), torch.ones(8), *[w] * 7, torch.ones(8), torch.zeros(10, 8)]
    args = (mask, None, 2, 3, emb, llama)
    with pytest.raises(RuntimeError, match="kinds must give 8 projections"):
        NATIVE.ops.llama_step(ids, pos, *args, [0] * 7, keys, keys.clone(), 2, 1e-5, table, table)
    with pytest.raises(RuntimeError, match="parts must hold 19 tensors for these kinds"):
        NATIVE.ops.llama_step(ids, pos, *args, [0] * 8, keys, keys.clone(), 2, 1e-5, table, table)
    llama = [torch.ones(8), torch.ones(8), *[w, None] * 7, torch.ones(8), torch.zeros(10, 8), None]
    with pytest.raises(RuntimeError, match="a rotary position is past the tables"):
        NATIVE.ops.llama_step(ids, torch.tensor([[8]]), mask, None, 2, 3, emb, llama, [0] * 8, keys, keys.clone(), 2,
                              1e-5, table, table)  # fmt: skip
    with pytest.raises(RuntimeError, match="index 10 is outside the embedding table of 10"):
        NATIVE.ops.llama_step(torch.tensor([[10]]), pos, mask, None, 2, 3, emb, llama, [0] * 8, keys, keys.clone(), 2,
                              1e-5, table, table)  # fmt: skip
    gpt = [None] * 4 + [torch.zeros(24, 8), None, w, None, torch.zeros(32, 8), None, torch.zeros(8, 32), None]
    gpt += [None, None, torch.zeros(10, 8), None]
    with pytest.raises(RuntimeError, match="index 9 is outside the embedding table of 9"):
        NATIVE.ops.gpt_step(ids, torch.tensor([[9]]), mask, None, 2, 3, emb, torch.zeros(9, 8), gpt, [0] * 5, keys,
                            keys.clone(), 2, 1e-5, True)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"attention_mask must be a bool \[B, S\]"):
        NATIVE.ops.gpt_step(ids, pos, mask[:, :2], None, 2, 3, emb, torch.zeros(9, 8), gpt, [0] * 5, keys,
                            keys.clone(), 2, 1e-5, True)  # fmt: skip
    with pytest.raises(RuntimeError, match="one of each per row"):
        NATIVE.ops.gpt_step(torch.tensor([[1], [2]]), pos, mask, None, 2, 3, emb, torch.zeros(9, 8), gpt, [0] * 5,
                            keys, keys.clone(), 2, 1e-5, True)  # fmt: skip
    got = NATIVE.ops.gpt_step(ids, pos, mask, None, 2, 3, emb, torch.zeros(9, 8), gpt, [0] * 5, keys, keys.clone(), 2,
                              1e-5, True)  # fmt: skip
    assert got.shape == (1, 10) and torch.equal(got, torch.zeros(1, 10))  # zero weights: zero logits


def test_argmax_rows_gives_the_python_argmaxs_indices() -> None:
    from decodekit.samplers import base

    g = torch.Generator().manual_seed(3)
    for width in (1, 15, 16, 17, 1000, 50257):
        x = torch.randn(8, width, generator=g)
        x[1] = x[1].round()  # ties: the first index wins
        x[2, width // 2] = float("inf")  # the first +inf; a row holding NaN: 0, as the Python function gives
        x[3, width - 1] = float("nan")
        x[4] = float("-inf")
        x[5, :] = 0.0
        x[5, width - 1] = -0.0
        x[6, width - 1] = x[6].max() + 1  # the maximum in the tail
        got = NATIVE.ops.argmax_rows(x)
        assert torch.equal(got, _python_argmax(x))
        assert torch.equal(base.argmax(x), got)  # the kernels are loaded here: the native operator
        finite = [0, 1, 2, 4, 5, 6, 7]
        assert torch.equal(got[finite], x[finite].argmax(dim=-1))
    with pytest.raises(RuntimeError, match=r"contiguous float32 CPU matrix \[B, V\] with V > 0"):
        NATIVE.ops.argmax_rows(torch.zeros(2, 0))


def _python_argmax(x: torch.Tensor) -> torch.Tensor:
    """decodekit.samplers.base.argmax without the native operator."""
    import decodekit.kernels as kernels_module
    from decodekit.samplers import base

    loaded = kernels_module._loaded
    kernels_module._loaded = None
    try:
        return base.argmax(x)
    finally:
        kernels_module._loaded = loaded


def test_invalid_rows_gives_the_python_answer_in_one_operator() -> None:
    import decodekit.kernels as kernels_module
    from decodekit.processors.base import invalid_rows

    x = torch.randn(6, 37)
    x[1, 36] = float("nan")
    x[2, 0] = float("inf")
    x[3] = float("-inf")  # every token removed
    x[4, :30] = float("-inf")  # some removed: still valid
    want = torch.tensor([False, True, True, True, False, False])
    assert torch.equal(NATIVE.ops.invalid_rows(x), want)
    assert torch.equal(invalid_rows(x), want)
    loaded, kernels_module._loaded = kernels_module._loaded, None
    try:
        assert torch.equal(invalid_rows(x), want)  # the torch operators' answer
    finally:
        kernels_module._loaded = loaded


def test_settle_rows_records_a_step_as_the_torch_version_does() -> None:
    import decodekit.kernels as kernels_module
    from decodekit.loop import settle

    token = torch.tensor([5, 7, 2, 9, 2, 3])
    finished = torch.tensor([False, True, False, False, True, False])
    reason = torch.tensor([0, 1, 0, 0, 2, 0], dtype=torch.int8)
    for eos in (torch.tensor([2, 9]), torch.tensor([3]), torch.empty(0, dtype=torch.long)):
        results = []
        for native in (True, False):
            seq = torch.full((6, 12), -1)[:, ::2]  # a strided view, as the loop's windows may be
            lengths = torch.tensor([3, 1, 0, 4, 2, 5])
            loaded = kernels_module._loaded
            kernels_module._loaded = loaded if native else None
            try:
                out = settle(token, finished, reason, lengths, seq, 4, eos, 0)
            finally:
                kernels_module._loaded = loaded
            results.append((*out, lengths, seq))
        for got, want in zip(*results):
            assert got.dtype == want.dtype and torch.equal(got, want)
        token_out, done, why, lengths, seq = results[0]
        assert token_out.tolist() == [5, 0, 2, 9, 0, 3] and torch.equal(seq[:, 4], token_out)  # finished rows: pad
        assert lengths.tolist() == [4, 1, 1, 5, 2, 6]  # unfinished rows grew
        hits = [not finished[b] and int(token[b]) in eos.tolist() for b in range(6)]
        assert done.tolist() == [bool(f) or h for f, h in zip(finished.tolist(), hits)]
        assert why.tolist() == [1 if h else int(r) for h, r in zip(hits, reason.tolist())]
    assert finished.tolist() == [False, True, False, False, True, False]  # inputs untouched: new tensors out
    with pytest.raises(RuntimeError, match=r"seq must be int64 \[B, T\] with end < T"):
        lengths, seq = torch.zeros(6, dtype=torch.long), torch.zeros(6, 3, dtype=torch.long)
        NATIVE.ops.settle_rows(token, finished, reason, lengths, seq, 3, torch.tensor([2]), 0)
