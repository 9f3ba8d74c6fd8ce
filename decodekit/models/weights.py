"""Weight formats for CPU decoding: float32 (exact), bfloat16, int8 with per-channel scales, and
int8 weights with int8 activations.

Decoding one token reads every weight once, so at small batches a step costs about the bytes of
its weights: bfloat16 halves them, int8 quarters them. :func:`convert_weights` swaps a model's
projections (``nn.Linear``, and transformers' ``Conv1D`` of GPT-2) for :class:`BF16Linear`,
:class:`Int8Linear` or :class:`W8A8Linear`, in place; everything else (embedding lookups, LayerNorm, attention, the
residual stream, the key/value cache) stays in the model's dtype, and the logits come back in
float32. The output head is converted too (it is the largest matrix of a small model: 31% of
GPT-2 124M's weights); a tied input embedding keeps its float32 table for the lookup, so the
head gets its own converted copy.

- ``bf16``: weights rounded to bfloat16 (8 bits of mantissa), multiplied through oneDNN's
  prepacked bfloat16 kernels (AVX512-BF16 / AMX where the CPU has them) with float32
  accumulation; activations are rounded to bfloat16 on the way in.
- ``int8``: symmetric int8 per output channel (``w ~ q * scale``, ``q`` in ``[-127, 127]``,
  ``scale = max|w_row| / 127``), multiplied by ``torch._weight_int8pack_mm`` as gpt-fast does
  (weight-only: the int8 weights are widened inside the kernel; activations are rounded to
  bfloat16 on the way in: with float32 inputs that kernel is over ten times slower on torch 2.13,
  5.4 ms against 0.45 for a ``[3072, 768]`` weight and one row, one thread).

- ``w8a8``: the same int8 weights, and each input row rounded to int8 with its own scale on the
  way in; int8 times int8 into int32 (``torch._int_mm``, VNNI on x86), then both scales. The
  fastest on CPU (the kernel streams the int8 weights near the memory bandwidth, and it is fast
  for many rows too), and the least exact: the activations lose precision as well.

``bf16`` and ``int8`` use their kernels for a decoding step's few rows (up to ``max_rows``); a
prefill's many rows multiply by the weight widened to float32 for the call, which is faster
there. ``w8a8`` takes its kernel for every call.

The error each format makes is measured in ``docs/models.md`` and bounded in
``tests/test_weights.py``.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from decodekit.errors import ConfigError

__all__ = [
    "WEIGHTS",
    "BF16Linear",
    "Int8Linear",
    "W8A8Linear",
    "WeightFormat",
    "check_weights",
    "compare_logits",
    "convert_model_weights",
    "convert_weights",
    "converted_layers",
]

_TINY = torch.finfo(torch.float32).tiny
# decodekit.kernels' operator for each kind native_args names (cpu.cpp's project() numbers them alike)
_NATIVE_OPS = ("linear_f32", "linear_bf16", "linear_int8", "linear_w8a8")

WeightFormat = Literal["float32", "bf16", "int8", "w8a8"]
WEIGHTS: tuple[str, ...] = ("float32", "bf16", "int8", "w8a8")


def check_weights(weights: object) -> str:
    """``weights`` itself if it names a format, else one :class:`ConfigError` line."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights={weights!r} is not allowed: expected one of {', '.join(WEIGHTS)}")
    return weights  # type: ignore[return-value]


def _projection(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight [N, K], bias [N] or None)`` of a linear projection, or ``None`` for anything else.

    ``nn.Linear`` (and its subclasses, decodekit's packing ``Linear`` among them) stores
    ``[out, in]``; transformers' ``Conv1D`` (GPT-2) stores the transpose, ``[in, out]``.
    """
    if isinstance(module, nn.Linear):
        return module.weight.detach(), None if module.bias is None else module.bias.detach()
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2:
        return module.weight.detach().t(), None if module.bias is None else module.bias.detach()
    return None


class _Converted(nn.Module):
    """What both converted projections share: the sizes, a float32 bias, the row threshold.

    The reduced-precision kernels win where a step reads each weight for a few rows (decoding);
    above :attr:`max_rows` rows (a prefill) the weight is widened to float32 for that call and
    multiplied by MKL, which is then faster (measured on the 2-core AVX512-BF16 machine, one
    thread, ``[3072, 768]``: 64 rows in 3.9-4.3 ms that way against 5.0 bf16 and 8.1 int8).
    """

    max_rows: int = 16
    kernels: Any = None  # decodekit.kernels.NativeKernels for a step's few rows (set by use_kernels)
    native_rows: int = 8  # up to this many rows take the native kernel (at most the kernels' 8; see each format)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())

    def use_kernels(self, kernels: Any) -> None:
        """Take ``kernels`` (:class:`decodekit.kernels.NativeKernels`, or ``None`` for the
        library's) for up to :attr:`native_rows` float32 rows on CPU, where this CPU runs this
        format's kernel."""
        self.kernels = kernels if kernels is not None and self._runs_on(kernels) else None

    def _runs_on(self, kernels: Any) -> bool:  # whether this CPU has the format's instructions
        return True

    def _native_rows(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N] float32, the bias added
        kind, parts = self.native_args()  # the operator takes x, then the block's parts in order
        return getattr(self.kernels.ops, _NATIVE_OPS[kind])(x, *parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N], in x's dtype
        shape, dtype = x.shape, x.dtype
        if (
            self.kernels is not None and self.in_features <= x.numel() <= self.native_rows * self.in_features
            and dtype == torch.float32 and x.device.type == "cpu" and self.weight.device.type == "cpu"
            and not torch.compiler.is_compiling()
        ):  # fmt: skip
            return self._native_rows(x.contiguous())
        x2 = x.reshape(-1, self.in_features)
        if 0 < x2.shape[0] <= self.max_rows and x.device.type == "cpu" and not torch.compiler.is_compiling():
            y = self._few_rows(x2).to(dtype)
            if self.bias is not None:
                y = y.add_(self.bias.to(dtype))
        else:
            y = F.linear(x2, self.dequantized().to(dtype), None if self.bias is None else self.bias.to(dtype))
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class BF16Linear(_Converted):
    """A projection with bfloat16 weights (oneDNN-prepacked on CPU), float32 in and out.

    Up to :attr:`max_rows` rows, the input is rounded to bfloat16 and multiplied by the
    prepacked weight (float32 accumulation); the result is widened back.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(weight, bias)
        self.register_buffer("weight", weight.to(torch.bfloat16).contiguous())
        self._pack: torch.Tensor | None = None

    # all 8 rows (GPT-2 124M, 2-core AMD EPYC, tok/s native against oneDNN: batch 6 250 / 238 on one
    # thread, 348 / 316 on two; batch 8 291 / 249, 507 / 358)

    def _runs_on(self, kernels: Any) -> bool:
        return kernels.bf16

    def native_args(self) -> tuple[int, list[torch.Tensor | None]]:  # for a native block (cpu.cpp project)
        own = self._buffers  # not through nn.Module.__getattr__: a step asks 48 layers
        return 1, [own["weight"], own["bias"]]

    def _few_rows(self, x: torch.Tensor) -> torch.Tensor:
        if self._pack is None:
            try:
                self._pack = torch.ops.mkldnn._reorder_linear_weight(self.weight, None)
            except (RuntimeError, AttributeError):  # a build without oneDNN's bfloat16 path
                self._pack = self.weight
        if self._pack is self.weight:
            return F.linear(x.to(torch.bfloat16), self.weight)
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self._pack, None, "none", [], "")

    def dequantized(self) -> torch.Tensor:
        """The float32 weight ``[N, K]`` this layer multiplies by."""
        return self.weight.float()

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]  # .to(): the pack is stale
        self._pack = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, object]:  # copies and pickles leave the pack behind
        return {**self.__dict__, "_pack": None}


class Int8Linear(_Converted):
    """A projection with int8 weights and a scale per output channel, float32 in and out.

    Up to :attr:`max_rows` rows, ``torch._weight_int8pack_mm`` multiplies (its fast CPU path
    takes bfloat16 activations: the input is rounded to bfloat16, the int8 weights widened
    inside the kernel, float32 accumulation, the result rounded to bfloat16 and widened back).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(weight, bias)
        q, scale = _per_channel_int8(weight)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16), persistent=False)

    def native_args(self) -> tuple[int, list[torch.Tensor | None]]:  # native: each input row rounded to int16
        own = self._buffers
        return 2, [own["weight"], own["scale"], own["bias"]]

    def _few_rows(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.weight, self.scale_bf16)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight ``[N, K]`` this layer multiplies by (``q * scale``)."""
        return self.weight.float() * self.scale[:, None]


class W8A8Linear(_Converted):
    """A projection with int8 weights (a scale per output channel) and int8 activations, float32
    in and out: each call rounds every input row to int8 with its own scale (``max|x_row| / 127``),
    multiplies int8 by int8 into int32 (``torch._int_mm``: oneDNN's VNNI kernels on x86), then
    scales by the row's and the channel's scales. Rows stay independent: a row's result never
    depends on the others in the batch. llama.cpp's Q8_0 dot products round activations to int8
    too, per block of 32; a row's single scale is coarser, and faster.

    On CPU every call takes that path, a prefill's many rows included (3-5x faster there than
    widening the weight: ``[3072, 768]``, 128 rows, 1.9 ms against 13.6 on one thread); elsewhere,
    and inside ``torch.compile``, the weight is widened for the call.
    """

    max_rows = sys.maxsize  # the kernel for every call on CPU, however many rows

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(weight, bias)
        q, scale = _per_channel_int8(weight)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)

    def _runs_on(self, kernels: Any) -> bool:
        return kernels.vnni

    def native_args(self) -> tuple[int, list[torch.Tensor | None]]:  # native: the same bits as _few_rows + bias
        own = self._buffers
        return 3, [own["weight"], self._row_sums(), own["scale"], own["bias"]]

    def _row_sums(self) -> torch.Tensor:
        """``sum_k q[n, k]`` as int32 (the native kernel's correction for its unsigned input)."""
        weight, sums = self._buffers["weight"], self.__dict__.get("_sums")
        if sums is None or sums[0] is not weight:  # made again for a new weight (.to(), a load)
            sums = (weight, weight.sum(dim=1, dtype=torch.int32))
            self.__dict__["_sums"] = sums
        return sums[1]

    def _few_rows(self, x: torch.Tensor) -> torch.Tensor:  # [M, K] -> [M, N] float32
        x = x.float()
        step = x.abs().amax(dim=-1, keepdim=True).div_(127).clamp_(min=_TINY)  # [M, 1]
        q = torch.div(x, step).round_().to(torch.int8)
        return torch._int_mm(q, self.weight.t()).float().mul_(step).mul_(self.scale)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight ``[N, K]`` (``q * scale``); activations are rounded on the CPU path only."""
        return self.weight.float() * self.scale[:, None]


def _per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [N, K] int8, scale [N])``: symmetric, ``scale = max|w_row| / 127``, ``q = round(w / scale)``."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=_TINY) / 127  # [N]
    return (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8).contiguous(), scale


FORMATS = {"bf16": BF16Linear, "int8": Int8Linear, "w8a8": W8A8Linear}


def convert_weights(model: nn.Module, weights: str) -> nn.Module:
    """Store ``model``'s projections in the format ``weights`` names, in place; returns ``model``.

    ``"float32"`` changes nothing. ``"bf16"`` and ``"int8"`` replace every ``nn.Linear`` and
    ``Conv1D`` (the output head included) with :class:`BF16Linear` / :class:`Int8Linear`, made
    from the current weights; the model is then for inference only (the new layers hold buffers,
    not parameters). A model whose weights are already in a reduced dtype is refused: convert
    from float32.
    """
    check_weights(weights)
    if weights == "float32":
        return model
    make = FORMATS[weights]
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            found = _projection(child)
            if found is None:
                continue
            weight, bias = found
            if weight.dtype != torch.float32:
                raise ConfigError(
                    f"weights={weights!r} converts float32 weights; this model's are {weight.dtype} (use dtype=float32)"
                )
            setattr(parent, name, make(weight, bias))
    return model


def convert_model_weights(model: object, weights: str) -> object:
    """:func:`convert_weights` for a loaded model: a ``torch.nn`` model itself, or the module
    inside an adapter (``HFCausalLM.model``); returns ``model``."""
    if check_weights(weights) == "float32":
        return model
    module = model if isinstance(model, nn.Module) else getattr(model, "model", None)
    if not isinstance(module, nn.Module):
        raise ConfigError(f"weights={weights!r}: {type(model).__name__} holds no torch module to convert")
    convert_weights(module, weights)
    return model


def converted_layers(model: nn.Module) -> list[_Converted]:
    """Every converted projection in ``model``."""
    return [m for m in model.modules() if isinstance(m, _Converted)]


def compare_logits(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """How far ``logits`` are from ``reference`` (same shape, ``[..., V]``): the largest absolute
    difference, the relative error ``||logits - reference|| / ||reference||`` (Frobenius), and
    the fraction of positions whose argmax agrees (``top1``)."""
    reference, logits = reference.float(), logits.float()
    diff = logits - reference
    return {
        "max_abs": diff.abs().max().item(),
        "relative": (diff.norm() / reference.norm()).item(),
        "top1": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
    }
