"""Key/value caches of the native GPT: one batch at a shared length, or independent slots.

:class:`KVCache` serves :func:`decodekit.generate`: every row at the same length, left padding
masked. :class:`SlotCache` serves the request engine: each row its own sequence at its own
length. Both expose the same three methods the attention layers call: ``attention_mask``
(the mask for ``T`` new positions), ``write`` (store new keys and values, return all so far)
and ``advance``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from decodekit.errors import ConfigError
from decodekit.kernels import huge_zeros

__all__ = ["KV_CACHE", "KVCache", "SlotCache", "check_kv_cache", "set_kv_cache"]

# How a model's cache stores keys and values: "auto" in the model's dtype, "bf16" in bfloat16 (half
# the bytes of float32: at long contexts and in large batches the cache is most of what a step reads).
KV_CACHE = {"auto": None, "bf16": torch.bfloat16}


@dataclass
class KVCache:
    """Keys and values of every position seen so far, for all layers at once.

    ``k`` and ``v`` are ``[n_layer, B, H, max_length, D]``, allocated once; ``length`` is a
    plain Python int (how many positions are filled), so no step ever syncs with the device.
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0
    _layers: list[tuple[torch.Tensor, torch.Tensor]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # one view per layer, made once: a step's writes then index nothing (a tuple index costs
        # tens of microseconds in Python, twelve times a step and more)
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0)))

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_length(self) -> int:
        return self.k.shape[3]

    def checked_span(self, attention_mask: torch.Tensor | None, T: int) -> int:
        """``S``, the positions a step of ``T`` new ones attends to, once they fit the cache and
        ``attention_mask`` is ``[B, S]`` (one-line errors otherwise)."""
        B, S = self.k.shape[1], self.length + T
        if S > self.max_length:
            raise ConfigError(f"cache holds {self.max_length} positions; {S} were needed")
        got = None if attention_mask is None else tuple(attention_mask.shape)
        if got != (B, S):
            raise ConfigError(f"attention_mask has shape {got}; expected ({B}, {S})")
        return S

    def attention_mask(self, attention_mask: torch.Tensor, T: int) -> torch.Tensor:
        """The ``[B, 1, T, S]`` mask for ``T`` new positions: causal, minus the caller's padding.

        Each query may attend to earlier real tokens and to itself (so a left-padding row never
        attends to nothing).
        """
        S = self.checked_span(attention_mask, T)
        if T == 1:  # a decoding step: every cached position is earlier; the new one sees itself
            allowed = attention_mask.bool().clone()
            allowed[:, -1] = True
            return allowed[:, None, None, :]
        device = attention_mask.device
        query_pos = torch.arange(self.length, S, device=device)[:, None]  # [T, 1]
        key_pos = torch.arange(S, device=device)[None, :]  # [1, S]
        causal = key_pos <= query_pos  # [T, S]
        return (causal & attention_mask[:, None, None, :].bool()) | (key_pos == query_pos)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``T`` new positions' keys and values ``[B, H, T, D]``; all so far ``[B, H, S, D]``."""
        start, n = self.length, k.shape[2]
        keys, values = self._layers[layer]  # [B, H, max_length, D]
        keys.narrow(2, start, n).copy_(k)  # rounded to the cache's dtype (nearest even) if it differs
        values.narrow(2, start, n).copy_(v)
        return keys.narrow(2, 0, start + n).to(k.dtype), values.narrow(2, 0, start + n).to(v.dtype)

    def advance(self, T: int) -> None:
        self.length += T


@dataclass
class SlotCache:
    """A cache of independent rows ("slots") at different lengths, for the request engine.

    Row ``b`` holds its own sequence's keys and values at positions ``0 .. lengths[b] - 1`` (no
    padding), and a decoding step writes each row's new position at ``lengths[b]``: one scatter
    per layer. Attention looks at the first ``span`` positions (a host int, the longest row after
    this step), each row masked to its own length. A newcomer's prompt is prefilled alone through
    a :class:`KVCache` and copied in with :meth:`place`; :meth:`view` gives the first ``n`` rows
    (shared storage) so that only occupied slots are computed.

    ``k``, ``v``: ``[n_layer, slots, H, max_length, D]``; ``lengths``: ``[slots]`` long.
    """

    k: torch.Tensor
    v: torch.Tensor
    lengths: torch.Tensor
    span: int = 0

    @property
    def max_length(self) -> int:
        return self.k.shape[3]

    def view(self, n: int, span: int) -> SlotCache:
        """The first ``n`` slots; ``span``: the longest of them."""
        return SlotCache(self.k[:, :n], self.v[:, :n], self.lengths[:n], span)

    def place(self, slot: int, cache: KVCache, row: int = 0) -> None:
        """Copy row ``row`` of a prefilled ``cache`` into ``slot`` (its length: ``cache.length``)."""
        n = cache.length
        if n > self.max_length:
            raise ConfigError(f"a prompt of {n} positions does not fit a slot of {self.max_length}")
        self.k[:, slot, :, :n] = cache.k[:, row, :, :n]
        self.v[:, slot, :, :n] = cache.v[:, row, :, :n]
        self.lengths[slot] = n

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` positions into slot ``dst``."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
        self.lengths[dst] = self.lengths[src]

    def checked_span(self, attention_mask: torch.Tensor | None, T: int) -> int:
        """``span``, the positions a step attends to, once the step is one new position per row
        and ``span`` fits the cache (one-line errors otherwise)."""
        if T != 1:
            raise ConfigError(f"a slot cache takes one new position per row and step, not {T}")
        if self.span > self.max_length:
            raise ConfigError(f"slot cache holds {self.max_length} positions; {self.span} were needed")
        return self.span

    def attention_mask(self, attention_mask: torch.Tensor | None, T: int) -> torch.Tensor:
        """``[B, 1, 1, span]``: each row sees its own positions and the one it writes now."""
        self.checked_span(attention_mask, T)
        key_pos = torch.arange(self.span, device=self.lengths.device)
        mask = key_pos[None, :] <= self.lengths[:, None]  # [B, span]
        if attention_mask is not None:
            mask = mask & attention_mask.bool()
        return mask[:, None, None, :]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store each row's new key and value ``[B, H, 1, D]`` at its own length."""
        index = self.lengths.view(-1, 1, 1, 1).expand_as(k)
        self.k[layer].scatter_(2, index, k.to(self.k.dtype))
        self.v[layer].scatter_(2, index, v.to(self.v.dtype))
        return self.k[layer, :, :, : self.span].to(k.dtype), self.v[layer, :, :, : self.span].to(v.dtype)

    def advance(self, T: int) -> None:
        self.lengths += T


def check_kv_cache(kv_cache: Any) -> None:
    if not isinstance(kv_cache, str) or kv_cache not in KV_CACHE:
        raise ConfigError(f"kv_cache={kv_cache!r} is not allowed: must be one of {', '.join(map(repr, KV_CACHE))}")


def set_kv_cache(model: Any, kv_cache: str) -> None:
    """Store ``model``'s keys and values as ``kv_cache`` says (:data:`KV_CACHE`) in the caches it
    makes from now on. Attention reads them back in the model's dtype: a bfloat16 cache rounds
    each key and value once, when it is written."""
    check_kv_cache(kv_cache)
    if kv_cache != "auto" and not hasattr(model, "kv_dtype"):
        raise ConfigError(f"kv_cache={kv_cache!r}: {type(model).__name__} keeps a cache of its own; "
                          "only the native GPT and Llama store theirs in another dtype (use kv_cache='auto')")  # fmt: skip
    if hasattr(model, "kv_dtype"):
        model.kv_dtype = KV_CACHE[kv_cache]


def empty_cache(model: Any, batch_size: int, max_length: int, heads: int, head_dim: int) -> KVCache:
    """An empty :class:`KVCache` ``[n_layer, B, heads, max_length, head_dim]`` on ``model``'s device,
    in its ``kv_dtype`` (:func:`set_kv_cache`) or else its dtype; ``max_length`` beyond the model's
    ``config.block_size`` is one line."""
    if max_length > model.config.block_size:
        raise ConfigError(f"max_length={max_length} exceeds the model's block_size={model.config.block_size}")
    shape = (model.config.n_layer, batch_size, heads, max_length, head_dim)
    dtype, device = getattr(model, "kv_dtype", None) or model.dtype, model.device
    if device.type == "cpu" and (k := huge_zeros(shape, dtype)) is not None:  # large: on 2 MB pages
        return KVCache(k=k, v=huge_zeros(shape, dtype), length=0)
    k = torch.zeros(shape, device=device, dtype=dtype)
    return KVCache(k=k, v=torch.zeros_like(k), length=0)
