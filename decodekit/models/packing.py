"""Prepacked weights for CPU decoding: a drop-in ``nn.Linear`` and a switch for whole models.

On x86 CPUs, oneDNN's prepacked (blocked) weights multiply faster than the plain row-major
weights that ``F.linear`` hands to MKL, for the skinny products of decoding (2-64 rows); a
single row is faster plain.
:class:`Linear` keeps a packed copy next to its weight and uses it when it pays;
:func:`pack_weights` turns it on or off for every linear layer of a model, its own or any
``torch.nn`` model's (the ``nn.Linear`` layers of a Hugging Face model, for instance).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Linear", "column_major", "contiguous_state", "hand_out_contiguous", "pack_weights", "row_major"]


def _can_pack() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except Exception:  # pragma: no cover - builds without oneDNN
        return False


class Linear(nn.Linear):
    """``nn.Linear`` that, on CPU in float32 without autograd, multiplies by a prepacked weight.

    oneDNN's prepacked (blocked) weights are what ``torch.compile`` uses on CPU after freezing;
    here they are made on the first call and kept next to the weight (re-made if the weight is
    changed or moved). They pay from two rows up: on a 2-core x86 machine, one thread, GPT-2
    124M's 48 block matrices (340 MB, read from memory) take 39 ms per decoding step at batch 8
    packed against 62 ms plain, and a 256-token prefill 229 ms instead of 500. A single row (a
    batch-1 decoding step) is a matrix-vector product, which MKL streams faster from the plain
    row-major weight: 25.7 ms against 28.6 packed (16.4 against 18.3 with two threads; GPT-2 124M
    decodes at 23.2 tok/s that way against 22.1, 41.3 against 36.0 with two, the two paths
    interleaved in one process), so one row takes the plain path, as do small
    products (under :attr:`min_macs` multiply-adds), where oneDNN's fixed cost per call would
    dominate. The price is a second copy of the weights in memory; :func:`pack_weights` turns it
    off. Results equal ``F.linear``'s to float rounding (one row: exactly).
    """

    packing: bool = True
    kernels: Any = None  # decodekit.kernels.NativeKernels for a step's few rows (decodekit.kernels.use_kernels)
    # up to this many rows take the native kernel; more take the packed weight, faster there (GPT-2
    # 124M, 2-core AMD EPYC, tok/s native against packed: batch 4 115 / 114 on one thread, 187 / 139 on
    # two; batch 8 132 / 168 on one thread, 263 / 257 on two)
    native_rows: int = 4
    # oneDNN costs ~15 us a call more than F.linear: worth it from about a million multiply-adds
    # (measured: [768, 192] at 8 rows 27 us packed against 38 plain, at 1 row 21 against 10).
    min_macs: int = 1 << 20

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.kernels is not None and self.in_features <= x.numel() <= self.native_rows * self.in_features
            and self._native_ok(x) and (x.numel() == self.in_features or self.weight.is_contiguous())
        ):  # fmt: skip
            return self.kernels.ops.linear_f32(x.contiguous(), self.weight, self.bias)
        if (
            self.packing
            and not torch.compiler.is_compiling()  # torch.compile packs weights its own way
            and x.numel() * self.out_features >= self.min_macs
            and x.numel() > self.in_features  # two rows or more; one row streams faster plain
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        ):
            packed = self._packed()
            if packed is not None:
                try:
                    return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
                except RuntimeError:  # oneDNN refused this input: the plain path from now on
                    self.packing = False
                    self.drop_pack()
        return F.linear(x, self.weight, self.bias)

    def native_args(self) -> tuple[int, list[torch.Tensor | None]]:
        """``(kind, parts)`` for a native block (decodekit/kernels/cpu.cpp ``project``): float32."""
        own = self._parameters  # not through nn.Module.__getattr__: a step asks 48 layers
        return 0, [own["weight"], own["bias"]]

    def _native_ok(self, x: torch.Tensor) -> bool:
        """Whether this single row may take the native kernel (CPU float32, no autograd, not compiling)."""
        w = self.weight
        return (
            x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32 and w.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        )  # fmt: skip

    def _packed(self) -> torch.Tensor | None:
        w = self.weight
        key = (w.data_ptr(), w._version, tuple(w.shape))  # in-place changes bump _version
        made = getattr(self, "_pack_key", None)
        if made is None or made[0]() is not w or made[1] != key:  # the same parameter, unchanged?
            self._pack = None
            if _can_pack():
                try:
                    with torch.no_grad():
                        self._pack = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), None)
                except RuntimeError:  # a CPU or build oneDNN cannot pack for: the plain path, not retried
                    self._pack = None
            self._pack_key = (weakref.ref(w), key)
        return self._pack

    def drop_pack(self) -> None:
        """Free the packed copy (it is made again on the next call that needs it)."""
        self._pack, self._pack_key = None, None

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # .to(), .half(), ...: the pack is stale
        self.drop_pack()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles leave the pack behind
        state = dict(self.__dict__)
        state.pop("_pack", None)
        state.pop("_pack_key", None)
        return state


def pack_weights(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn prepacked weights on or off for every linear layer of ``model``; returns ``model``.

    Plain ``nn.Linear`` layers become :class:`Linear` (same parameters, same state dict; only
    the class changes) when ``enabled``; with ``enabled=False`` every :class:`Linear` drops its
    packed copy and uses its plain weight. Subclasses of ``nn.Linear`` other than :class:`Linear`
    (quantised or adapter layers, say) are left alone.
    """
    for module in model.modules():
        if enabled and type(module) is nn.Linear:
            module.__class__ = Linear
        if isinstance(module, Linear):
            module.packing = enabled
            if not enabled:
                module.drop_pack()
    return model


def column_major(model: nn.Module) -> nn.Module:
    """Store each float32 CPU weight of ``model``'s :class:`Linear` layers column-major; returns ``model``.

    The weight keeps its shape and values; its storage becomes the contiguous ``[in, out]``
    transpose, as a Hugging Face GPT-2's ``Conv1D`` weights and a tied GPT-2 head already are.
    A single row (a batch-1 decoding step) then reads the matrix in order: on a 2-core AMD EPYC
    (32 MB L3), one thread, GPT-2 124M decodes at 33 tok/s this way against 29 from row-major
    weights (two threads: 34 against 30); on a machine with a 260 MB L3 the two were even.
    Two rows and more take the packed copy, made from a contiguous one either way.
    ``state_dict`` still hands out contiguous tensors (:func:`contiguous_state`).
    """
    with torch.no_grad():
        for module in model.modules():
            w = module.weight if isinstance(module, Linear) else None
            if (
                w is not None and w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2
                and min(w.shape) > 1 and w.is_contiguous()
            ):  # fmt: skip
                w.data = w.data.t().contiguous().t()
    return model


def row_major(model: nn.Module) -> nn.Module:
    """Store each float32 CPU weight of ``model``'s :class:`Linear` layers row-major (contiguous
    ``[out, in]``), the order the native one-row kernels read (:mod:`decodekit.kernels`); returns
    ``model``. A tied embedding table shares its head's storage and follows it."""
    with torch.no_grad():
        for module in model.modules():
            w = module.weight if isinstance(module, Linear) else None
            if w is not None and w.device.type == "cpu" and w.dtype == torch.float32 and not w.is_contiguous():
                w.data = w.data.contiguous()
    return model


def hand_out_contiguous(model: nn.Module) -> None:
    """Make ``model.state_dict()`` hand out contiguous tensors (see :func:`contiguous_state`)."""
    # the public name arrived in torch 2.5; the private one (same hook signature) is older
    register = getattr(model, "register_state_dict_post_hook", None) or model._register_state_dict_hook
    register(contiguous_state)


def contiguous_state(module: nn.Module, state: dict[str, Any], prefix: str, metadata: Any) -> None:
    """``state_dict`` post-hook: every tensor contiguous (checkpoint writers such as safetensors
    refuse strided ones); tensors shared by several keys stay shared. Parameters, from
    ``keep_vars=True``, are left as they are."""
    made: dict[tuple[Any, ...], torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and not value.is_contiguous():
            same = (value.device, value.data_ptr(), value.shape, value.stride())  # the same view of one storage
            if same not in made:
                made[same] = value.contiguous()
            state[key] = made[same]
