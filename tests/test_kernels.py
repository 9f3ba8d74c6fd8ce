"""decodekit's native one-row CPU kernels (decodekit/kernels): each format's operator against the
library's arithmetic, the model paths that take them, and the setting's errors and fallback."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch.nn import functional as F

import decodekit.kernels as kernels_module
from decodekit import generate
from decodekit.errors import ConfigError
from decodekit.kernels import native_kernels, use_kernels
from decodekit.models import load_model
from decodekit.models.packing import Linear
from decodekit.models.weights import BF16Linear, Int8Linear, W8A8Linear, convert_weights

NATIVE, WHY_NOT = native_kernels()
needs_native = pytest.mark.skipif(NATIVE is None, reason=f"native kernels unavailable here: {WHY_NOT}")
LOOP_OPS = {"decodekit_cpu::argmax_rows", "decodekit_cpu::invalid_rows", "decodekit_cpu::settle_rows"}  # the loop's
SHAPES = [(1, 1), (3, 5), (17, 33), (100, 64), (64, 100), (250, 768), (40, 129)]  # (N, K): tails of every width


def _xw(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, generator=g), torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)


@needs_native
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_float32_row_equals_f_linear_in_both_layouts(n: int, k: int) -> None:
    x, w, b = _xw(n, k, 0)
    want = F.linear(x.double(), w.double(), b.double()).float()
    column_major = w.t().contiguous().t()
    for weight in (w, column_major):
        for bias in (b, None):
            got = NATIVE.ops.linear_f32(x, weight, bias)
            torch.testing.assert_close(got, want if bias is not None else want - b, atol=2e-5, rtol=1e-5)


@needs_native
@pytest.mark.skipif(NATIVE is not None and not NATIVE.bf16, reason="this CPU lacks AVX512-BF16")
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_bf16_row_is_the_bfloat16_product_summed_in_float32(n: int, k: int) -> None:
    x, w, b = _xw(n, k, 1)
    layer = BF16Linear(w, b)
    want = F.linear(x.bfloat16().double(), layer.weight.double(), b.double()).float()  # x rounded, exact sums
    torch.testing.assert_close(NATIVE.ops.linear_bf16(x, layer.weight, layer.bias), want, atol=2e-5, rtol=1e-5)


def _int16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``x`` as the native int8 kernel rounds it: ``q = round(x / step)``, ``step = max|x| / 32767``."""
    step = (x.abs().amax(dim=-1, keepdim=True) / 32767).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round(x / step), step


@needs_native
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_int8_row_is_the_int8_weights_times_the_input_rounded_to_int16(n: int, k: int) -> None:
    x, w, b = _xw(n, k, 2)
    layer = Int8Linear(w, b)
    q, step = _int16(x[None])
    exact = (q.double() @ layer.weight.double().T).float()  # integer sums, exact in float64
    want = (exact * step * layer.scale + b)[0]  # the kernel's order of float32 operations
    assert torch.equal(NATIVE.ops.linear_int8(x, layer.weight, layer.scale, layer.bias), want)
    close = (F.linear(x.double(), layer.weight.double()) * layer.scale.double() + b.double()).float()
    torch.testing.assert_close(want, close, atol=1e-4, rtol=1e-4)  # near the float32 input's product


@needs_native
def test_int8_rows_longer_than_a_chunk_add_the_chunks_in_float32() -> None:
    x, w, b = _xw(6, 20000, 7)  # 20000 inputs: three chunks of integer sums
    layer = Int8Linear(w, b)
    q, step = _int16(x[None])
    want = ((q.double() @ layer.weight.double().T) * step.double() * layer.scale.double() + b.double()).float()[0]
    torch.testing.assert_close(NATIVE.ops.linear_int8(x, layer.weight, layer.scale, layer.bias), want,
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    big = torch.full((1, 20000), 3.0)  # every product at its largest: no int32 lane overflows
    weight = torch.full((6, 20000), 127, dtype=torch.int8)
    got = NATIVE.ops.linear_int8(big, weight, torch.ones(6), None)
    torch.testing.assert_close(got, torch.full((1, 6), 3.0 * 127 * 20000), rtol=1e-6, atol=0)


@needs_native
@pytest.mark.skipif(NATIVE is not None and not NATIVE.vnni, reason="this CPU lacks AVX512-VNNI")
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_w8a8_row_has_the_library_paths_exact_bits(n: int, k: int) -> None:
    for seed in range(4):
        x, w, b = _xw(n, k, 10 + seed)
        x[seed % k] = 0.0 if seed == 3 else x[seed % k]
        layer = W8A8Linear(w, b)
        want = layer._few_rows(x[None])[0] + layer.bias
        assert torch.equal(NATIVE.ops.linear_w8a8(x, layer.weight, layer._row_sums(), layer.scale, layer.bias), want)
    zero = torch.zeros(k)  # an all-zero row: the smallest scale, zeros out (plus the bias)
    assert torch.equal(NATIVE.ops.linear_w8a8(zero, layer.weight, layer._row_sums(), layer.scale, None), torch.zeros(n))


@needs_native
@pytest.mark.parametrize("weights", ["float32", "bf16", "int8", "w8a8"])
def test_a_rows_result_does_not_depend_on_the_other_rows(weights: str) -> None:
    if (weights == "bf16" and not NATIVE.bf16) or (weights == "w8a8" and not NATIVE.vnni):
        pytest.skip("this CPU lacks the format's instructions")
    g = torch.Generator().manual_seed(5)
    n, k = 70, 200  # tails in every kernel
    w, b = torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)
    layer = {"bf16": BF16Linear, "int8": Int8Linear, "w8a8": W8A8Linear}.get(weights)
    layer = layer(w, b) if layer else None

    def product(x: torch.Tensor) -> torch.Tensor:
        if layer is None:
            return NATIVE.ops.linear_f32(x, w, b)
        if weights == "bf16":
            return NATIVE.ops.linear_bf16(x, layer.weight, layer.bias)
        if weights == "int8":
            return NATIVE.ops.linear_int8(x, layer.weight, layer.scale, layer.bias)
        return NATIVE.ops.linear_w8a8(x, layer.weight, layer._row_sums(), layer.scale, layer.bias)

    x = torch.randn(8, k, generator=g) * torch.logspace(-3, 2, 8)[:, None]  # rows of very different scales
    alone = torch.stack([product(row) for row in x])
    for m in range(1, 9):
        assert torch.equal(product(x[:m]), alone[:m])  # the same bits in a batch of any size
    assert product(x[:3].view(1, 3, k)).shape == (1, 3, n)
    if layer is None:
        torch.testing.assert_close(alone, F.linear(x.double(), w.double(), b.double()).float(), atol=1e-4, rtol=1e-5)
    elif weights == "w8a8":
        assert torch.equal(alone, layer._few_rows(x) + layer.bias)  # the library path's bits, row by row


@needs_native
def test_results_do_not_depend_on_the_thread_count() -> None:
    x, w, b = _xw(1000, 768, 3)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append([NATIVE.ops.linear_f32(x, w, b), NATIVE.ops.linear_f32(x, w.t().contiguous().t(), b)])
        assert all(torch.equal(a, c) for a, c in zip(*results))
    finally:
        torch.set_num_threads(before)


@needs_native
def test_operators_refuse_bad_shapes_in_one_line() -> None:
    x, w, b = _xw(8, 16, 4)
    with pytest.raises(RuntimeError, match=r"x must be a contiguous float32 CPU tensor \[\.\.\., 16\] of 1 to 8 rows"):
        NATIVE.ops.linear_f32(torch.randn(15), w, b)
    with pytest.raises(RuntimeError, match="of 1 to 8 rows"):
        NATIVE.ops.linear_f32(torch.randn(9, 16), w, b)
    with pytest.raises(RuntimeError, match="column-major, for a single row"):
        NATIVE.ops.linear_f32(torch.randn(2, 16), w.t().contiguous().t(), b)
    with pytest.raises(RuntimeError, match="b must be"):
        NATIVE.ops.linear_f32(x, w, torch.randn(7))
    with pytest.raises(RuntimeError, match="w must be a contiguous Char"):
        NATIVE.ops.linear_int8(x, w, torch.ones(8), None)


def _one_row_ops(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, int]:
    """How many times each decodekit_cpu operator ran in a 2-token greedy run on ``ids`` (one row)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        generate(model, ids, max_new_tokens=2)
    counts: dict[str, int] = {}
    for event in prof.events():
        if event.name.startswith("decodekit_cpu::") and event.name not in LOOP_OPS:
            counts[event.name] = counts.get(event.name, 0) + 1
    return counts


@needs_native
@pytest.mark.parametrize("weights", ["float32", "bf16", "int8", "w8a8"])
def test_the_default_model_decodes_through_them_with_the_library_paths_tokens(weights: str) -> None:
    if (weights == "bf16" and not NATIVE.bf16) or (weights == "w8a8" and not NATIVE.vnni):
        pytest.skip("this CPU lacks the format's instructions")
    native, _ = load_model("default", device="cpu", weights=weights, kernels="native")
    library, _ = load_model("default", device="cpu", weights=weights, kernels="library")
    ids = torch.tensor([[5, 40, 41, 42, 99, 7]])
    counts = _one_row_ops(native, ids)
    op = {"float32": "linear_f32", "bf16": "linear_bf16", "int8": "linear_int8", "w8a8": "linear_w8a8"}[weights]
    # the step after the prefill: one native call (its products inside it); the prefill's head (its
    # last position only) is a single row too, and a prefill of few rows (up to the format's
    # native_rows) takes the native products for every projection
    layer = native.lm_head
    projections = 4 * native.config.n_layer if layer.native_rows >= ids.shape[1] else 0
    assert counts == {"decodekit_cpu::gpt_step": 1, f"decodekit_cpu::{op}": 1 + projections}
    assert _one_row_ops(library, ids) == {}
    a = generate(native, ids, max_new_tokens=24)
    b = generate(library, ids, max_new_tokens=24)
    if weights == "int8":  # the native kernel rounds the input to int16, the library one to bfloat16
        assert (a.tokens == b.tokens).float().mean() > 0.5
    else:
        assert torch.equal(a.tokens, b.tokens)
    long = torch.arange(20, 32)[None]  # 12 rows: more than any format's native_rows
    with torch.no_grad():  # a prefill of many rows takes the library path either way
        torch.testing.assert_close(native(long)[0], library(long)[0], atol=1e-4, rtol=1e-4)


@needs_native
def test_native_float32_weights_are_row_major_and_the_state_dict_unchanged() -> None:
    native, _ = load_model("default", device="cpu", kernels="native")
    library, _ = load_model("default", device="cpu", kernels="library")
    linears = [m for m in native.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight.is_contiguous() and m.kernels is NATIVE for m in linears)
    assert native.lm_head.weight is native.transformer.wte.weight  # still tied
    a, b = native.state_dict(), library.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_native
def test_copies_and_pickles_keep_the_native_kernels() -> None:
    model, _ = load_model("default", device="cpu", weights="w8a8", kernels="native")
    ids = torch.tensor([[1, 2, 3]])
    want = generate(model, ids, max_new_tokens=8).tokens
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        layers = [m for m in other.modules() if isinstance(m, W8A8Linear)]
        assert layers and all(m.kernels is NATIVE for m in layers)
        assert torch.equal(generate(other, ids, max_new_tokens=8).tokens, want)


@needs_native
def test_autograd_and_batches_take_the_library_path() -> None:
    layer = Linear(64, 32)
    use_kernels(layer, "native")
    assert layer.kernels is NATIVE
    x = torch.randn(1, 64, requires_grad=True)
    layer(x).sum().backward()  # the native operator has no gradient: this row went through F.linear
    torch.testing.assert_close(x.grad, layer.weight.detach().sum(0, keepdim=True))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, torch.no_grad():
        layer(torch.randn(layer.native_rows + 1, 64))
        layer(torch.randn(1, 1, 64))
    names = [e.name for e in prof.events() if e.name.startswith("decodekit_cpu::")]
    assert names == ["decodekit_cpu::linear_f32"]  # the single row only


def _per_op(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose blocks run op by op (the native one-row products still on)."""
    other = copy.deepcopy(model)
    other._step_plan = lambda *args: None
    return other


@needs_native
@pytest.mark.parametrize("weights", ["float32", "w8a8"])
def test_a_native_block_step_equals_the_blocks_op_by_op(weights: str) -> None:
    if weights == "w8a8" and not NATIVE.vnni:
        pytest.skip("this CPU lacks AVX512-VNNI")
    model, _ = load_model("default", device="cpu", weights=weights, kernels="native")
    ids = torch.tensor([[0, 0, 0, 72, 101, 108, 108, 111]])  # one row, left padded
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    a = generate(model, ids, attention_mask=mask, max_new_tokens=20, output_scores=True)
    b = generate(_per_op(model), ids, attention_mask=mask, max_new_tokens=20, output_scores=True)
    assert torch.equal(a.tokens, b.tokens)
    tolerance = 1e-4 if weights == "float32" else 0.2  # w8a8 rounds each input to int8: a last-bit change moves a step
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, atol=tolerance, rtol=0)


@needs_native
def test_a_changed_model_makes_its_native_arguments_again() -> None:
    model, _ = load_model("default", device="cpu", kernels="native")
    ids = torch.tensor([[72, 101, 108, 108, 111]])
    generate(model, ids, max_new_tokens=3)  # the blocks' arguments are kept from here
    old = model.transformer.h[1].mlp.c_fc
    new = use_kernels(Linear(old.in_features, old.out_features), "native")
    with torch.no_grad():
        new.weight.copy_(old.weight * 0.5)
        new.bias.copy_(old.bias)
    new.requires_grad_(False)
    model.transformer.h[1].mlp.c_fc = new  # a replaced layer
    model.transformer.h[0].ln_2.bias = torch.nn.Parameter(torch.full_like(model.transformer.h[0].ln_2.bias, 0.1))
    a = generate(model, ids, max_new_tokens=12, output_scores=True)
    b = generate(_per_op(model), ids, max_new_tokens=12, output_scores=True)
    assert torch.equal(a.tokens, b.tokens)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
    use_kernels(model, "library")  # new kernels (none): no native block from the next step
    assert _one_row_ops(model, ids) == {}


@needs_native
def test_the_engine_decodes_one_slot_through_native_blocks() -> None:
    from decodekit.engine import Engine, Request
    from decodekit.tokenization import load_tokenizer

    native, extras = load_model("default", device="cpu", kernels="native")
    library, _ = load_model("default", device="cpu", kernels="library")
    tokenizer = load_tokenizer("auto", extras)
    requests = [Request(prompt=p, max_new_tokens=16, id=i) for i, p in enumerate(["Once upon", "The sea", "Why"])]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = Engine(native, tokenizer, processors=[], max_slots=1).generate(requests)
    assert sum(e.name == "decodekit_cpu::gpt_step" for e in prof.events()) >= 3 * 15
    want = Engine(library, tokenizer, processors=[], max_slots=1).generate(requests)
    assert [o.tokens for o in got] == [o.tokens for o in want]


@needs_native
def test_a_transformers_model_takes_them_for_its_linear_layers(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    native, _ = load_model(tmp_path, device="cpu", backend="hf", kernels="native")
    library, _ = load_model(tmp_path, device="cpu", backend="hf", kernels="library")
    layers = [m for m in native.model.modules() if isinstance(m, Linear)]
    assert len(layers) == 2 * 7 + 1 and all(m.kernels is NATIVE and not m.packing for m in layers)
    ids = torch.tensor([[1, 5, 9, 20, 7]])
    a = generate(native, ids, max_new_tokens=10, output_scores=True)
    b = generate(library, ids, max_new_tokens=10, output_scores=True)
    assert torch.equal(a.tokens, b.tokens)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
    assert _one_row_ops(native, ids) == {"decodekit_cpu::linear_f32": len(layers) + 1}  # the prefill head, a step


@needs_native
def test_native_weights_move_to_huge_pages_with_their_values() -> None:
    from decodekit.kernels import huge_pages_available

    if not huge_pages_available():
        pytest.skip("no transparent huge pages here")
    library, _ = load_model("default", device="cpu", weights="bf16", kernels="library")
    native, _ = load_model("default", device="cpu", weights="bf16", kernels="native")
    layers = [m for m in native.modules() if isinstance(m, BF16Linear)]
    starts = sorted(m.weight.data_ptr() for m in layers)
    assert all(b - a < 64 + max(m.weight.numel() * 2 for m in layers) for a, b in zip(starts, starts[1:]))  # one block
    assert all(m.weight.data_ptr() % 64 == 0 for m in layers)
    want, got = library.state_dict(), native.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    f32, _ = load_model("default", device="cpu", kernels="native")
    assert f32.lm_head.weight is f32.transformer.wte.weight  # the tie holds after the move
    copied = copy.deepcopy(native)  # ordinary memory, same results
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    assert torch.equal(generate(copied, ids, max_new_tokens=8).tokens, generate(native, ids, max_new_tokens=8).tokens)


def test_a_bad_setting_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"kernels='fast' is not allowed: expected one of auto, native, library"):
        load_model("default", device="cpu", kernels="fast")


def test_where_they_cannot_run_native_says_why_and_auto_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels_module, "_loaded", None)
    monkeypatch.setattr(kernels_module, "_why_not", None)
    monkeypatch.setattr(kernels_module, "cpu_flags", lambda: {"sse2", "avx2"})
    with pytest.raises(ConfigError, match=r"kernels='native' is not available here: this CPU lacks AVX-512"):
        load_model("default", device="cpu", kernels="native")
    model, _ = load_model("default", device="cpu", kernels="auto")
    assert all(m.kernels is None for m in model.modules() if isinstance(m, Linear))
    assert generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=4).tokens.shape == (1, 4)
