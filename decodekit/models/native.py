"""The arguments of the native CPU steps (:mod:`decodekit.kernels`): read from a model's modules
once, and kept between steps while every module, tensor and setting they came from is still in place.

A decoding step of few rows runs the native GPT or Llama in one native call. The call's arguments
(weights, norms, settings, the operator) are gathered by walking the model, which takes about
200 us for GPT-2 124M; kept, they are checked instead, in about 24 us (both warm), by looking
every value up again where it was read (no Python loop) and comparing identities: a replaced
layer, a converted or moved weight, or new kernels make them again.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from decodekit.models.cache import KVCache, SlotCache
from decodekit.models.packing import Linear

__all__ = ["Reads", "cache_layer", "cache_positions", "kept", "lookup", "one_position", "step_cache", "without_plan"]

_KEY = "_native_plan"


def one_position(T: int, like: torch.Tensor) -> bool:
    """Whether a step of ``T`` new positions per row can take the native blocks: ``T`` is 1, the
    model's float32 on CPU (``like``: a weight, or the hidden states), outside ``torch.compile``."""
    return T == 1 and like.dtype == torch.float32 and like.device.type == "cpu" and not torch.compiler.is_compiling()


def lookup(model: torch.nn.Module, T: int, rows: int, like: torch.Tensor, layer: torch.nn.Module,
           op: str) -> tuple[Any, Any]:  # fmt: skip
    """Where a step of ``rows`` rows of ``T`` new positions stands: ``(plan, None)`` where that is settled (a
    kept plan, or ``None`` where the native blocks cannot take this step), else ``(None, kernels)``:
    make a plan for the native operator ``op`` with the kernels ``layer`` (a projection) is set to.
    ``like``: see :func:`one_position`."""
    if not one_position(T, like):
        return None, None
    found, plan = kept(model, rows)
    if found:
        return plan, None
    kernels = layer.__dict__.get("kernels")
    if kernels is None or not hasattr(kernels.ops, op):
        return None, None
    return None, kernels


def kept(model: torch.nn.Module, rows: int) -> tuple[bool, list[tuple[Any, ...]] | None]:
    """``(True, plan)`` where ``model`` keeps a plan still in place (``plan`` ``None`` when ``rows``
    exceeds what its projections take natively), else ``(False, None)``."""
    found = model.__dict__.get(_KEY)
    if found is not None and all(map(operator.is_, map(dict.get, found[0], found[1]), found[2])):
        return True, found[3] if rows <= found[4] else None
    return False, None


def without_plan(state: dict[str, Any]) -> dict[str, Any]:
    """A module's ``__dict__`` for a copy or a pickle: the copy makes its own plan."""
    state = dict(state)
    state.pop(_KEY, None)
    return state


class Reads:
    """Values read from modules' dicts, each remembered with the dict and key it came from."""

    def __init__(self) -> None:
        self.read: list[tuple[dict[str, Any], str, Any]] = []
        self.rows = 8  # the most rows every projection takes natively (the kernels' 8 at most)

    def take(self, owner: dict[str, Any], key: str) -> Any:
        value = owner.get(key)
        self.read.append((owner, key, value))
        return value

    def projections(self, layers: list[Any], kernels: Any) -> list[tuple[int, list[torch.Tensor | None]]] | None:
        """Each layer's ``(kind, tensors)`` for the native block, or ``None`` unless all of them are
        set to ``kernels``; records the tensors they come from and the rows they take."""
        if any(self.take(m.__dict__, "kernels") is not kernels for m in layers):
            return None
        args = [m.native_args() for m in layers]
        for m in layers:
            own = m._parameters if isinstance(m, Linear) else m._buffers
            for key in own:
                self.take(own, key)
            rows = self.take(m.__dict__, "native_rows")
            self.rows = min(self.rows, type(m).native_rows if rows is None else rows)
        return args

    def keep(self, model: torch.nn.Module, plan: list[tuple[Any, ...]], rows: int) -> list[tuple[Any, ...]] | None:
        """Keep ``plan`` on ``model``; returns it if a step of ``rows`` rows can take it."""
        owners, keys, values = zip(*self.read)
        model.__dict__[_KEY] = (owners, keys, values, plan, self.rows)
        return plan if rows <= self.rows else None


def cache_positions(cache: KVCache | SlotCache) -> list[int]:
    """Where each row's new position goes: a batch's shared length, or each slot's own."""
    return [cache.length] * cache.batch_size if isinstance(cache, KVCache) else cache.lengths.tolist()


def cache_layer(cache: KVCache | SlotCache, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``index``'s ``(keys, values)`` ``[B, H, L, D]``."""
    return cache._layers[index] if isinstance(cache, KVCache) else (cache.k[index], cache.v[index])


Step = tuple[torch.Tensor | None, int, int, torch.Tensor | None]  # what step_cache gives


def step_cache(cache: KVCache | SlotCache, attention_mask: torch.Tensor | None) -> Step:
    """A whole native step's view of ``cache``: ``(lengths, length, span, attention_mask)``. Each row's
    new position goes at ``lengths[b]`` (a slot cache's), or at ``length`` (a batch's shared
    length); rows attend to positions ``0 .. span - 1`` (``cache.checked_span``: the checks and
    one-line errors of ``cache.attention_mask``); the mask as bool."""
    span = cache.checked_span(attention_mask, 1)
    lengths, length = (None, cache.length) if isinstance(cache, KVCache) else (cache.lengths, 0)
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.bool()
    return lengths, length, span, attention_mask
