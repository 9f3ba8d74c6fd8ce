"""The forward passes of a decoding run: the prefill, then one new position per row and step.

:func:`prefill_prompt` runs the prompt (:func:`prefill`, cropped to the context). The steps after it come from one of two steppers, each called
as ``stepper(token, seq, end) -> logits [B, V]`` with the tokens just chosen:

- :class:`DynamicSteps` (the default): attention over the positions filled so far, so each step's
  shapes grow by one; when the model's context is full, the last half of the sequence is
  prefilled again (a sliding window).
- :class:`StaticSteps` (``generate(..., static_cache=True)``): the same shapes at every step. The
  prefilled cache's buffers are used as a :class:`~decodekit.models.cache.SlotCache` over all their
  positions, each row masked to its own length and its padding; the rows' lengths and positions
  live on the device and advance in place. No step reads a host value, so on CUDA the step is
  captured once as a CUDA graph and replayed (the first step runs eagerly, as the warm-up the
  capture needs). Models with a ``new_slot_cache`` (the native GPT and Llama) support it; the
  whole run must fit the model's context.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from decodekit.errors import ConfigError

PREFILL_CHUNK = 256  # prompt positions per forward pass in the prefill


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a left-padded mask: ``cumsum(mask) - 1``, 0 on padding. ``[B, T]``."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def prefill(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, cache_length: int, *, chunk: int = PREFILL_CHUNK
) -> tuple[torch.Tensor, Any]:
    """Run the prompt through a fresh cache; returns next-token logits ``[B, V]`` and the cache.

    Long prompts go through in chunks of ``chunk`` positions, each attending to the cache so far:
    the same logits, with the temporaries of one chunk instead of the whole prompt at its peak.
    """
    cache = model.new_cache(ids.shape[0], cache_length)
    pos = positions(mask)
    for start in range(0, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        logits, cache = model.step(ids[:, start:end], position_ids=pos[:, start:end], attention_mask=mask[:, :end], cache=cache)
    return logits, cache


def crop_to_context(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the last ``model.max_context`` positions of a prompt that alone is too long (warns)."""
    context = getattr(model, "max_context", None)
    if context is not None and ids.shape[1] > context:
        warnings.warn(
            f"the prompt has {ids.shape[1]} tokens, more than the model's context of {context}; "
            f"keeping its last {context}",
            stacklevel=4,
        )
        return ids[:, -context:], mask[:, -context:]
    return ids, mask


def prefill_prompt(model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """The prefill of a run adding ``max_new_tokens``: ``(logits [B, V], cache, window_mask)``.

    The prompt is cropped to the model's context (:func:`crop_to_context`, whose mask is
    ``window_mask``) and goes into a cache of the whole run's length, or of the context.
    """
    window_ids, window_mask = crop_to_context(model, ids, mask)
    context = getattr(model, "max_context", None)
    length = ids.shape[1] + max_new_tokens if context is None else min(context, window_ids.shape[1] + max_new_tokens)
    logits, cache = prefill(model, window_ids, window_mask, length)
    return logits, cache, window_mask


class DynamicSteps:
    """Steps over a growing cache, sliding the window when the model's context is full."""

    def __init__(self, model: Any, cache: Any, full_mask: torch.Tensor, window_mask: torch.Tensor) -> None:
        self.model, self.cache, self.full_mask = model, cache, full_mask
        self.context: int | None = getattr(model, "max_context", None)
        self.cached = window_mask.shape[1]  # positions in the cache
        self.next_pos = positions(window_mask)[:, -1:] + 1  # [B, 1] position of the next token

    def _slides(self) -> bool:
        """Whether the next step re-prefills the window (the cache is full)."""
        return self.context is not None and self.cached + 1 > self.context

    def reorder(self, index: torch.Tensor) -> None:
        """Rows now continue rows ``index`` ``[B]`` (beam search): the cache (unless the next step
        prefills the window again anyway) and the positions follow them."""
        if not self._slides():
            self.cache = self.model.reorder_cache(self.cache, index)
        self.next_pos = self.next_pos.index_select(0, index)

    def __call__(self, token: torch.Tensor, seq: torch.Tensor, end: int) -> torch.Tensor:
        """Logits after ``token`` ``[B]``, just written at ``seq[:, end]``."""
        if self._slides():
            keep = max(self.context // 2, 1)
            window_mask = self.full_mask[:, end + 1 - keep : end + 1]
            logits, self.cache = prefill(self.model, seq[:, end + 1 - keep : end + 1], window_mask, self.context)
            self.cached = keep
            self.next_pos = positions(window_mask)[:, -1:] + 1
            return logits
        attn = self.full_mask[:, end + 1 - (self.cached + 1) : end + 1]  # [B, cached + 1]
        logits, self.cache = self.model.step(token[:, None], position_ids=self.next_pos, attention_mask=attn, cache=self.cache)
        self.cached += 1
        self.next_pos = self.next_pos + 1
        return logits


class StaticSteps:
    """Steps of fixed shapes over the whole prefilled cache; a CUDA graph on CUDA (see the module)."""

    def __init__(self, model: Any, cache: Any, full_mask: torch.Tensor, window_mask: torch.Tensor, *, graph: bool = True) -> None:
        """The run must fit the model's context: the caller checks that."""
        from decodekit.models.cache import KVCache, SlotCache

        if not isinstance(cache, KVCache) or not hasattr(model, "new_slot_cache"):
            raise ConfigError(f"static_cache=True needs a native model (GPT or Llama); {type(model).__name__} has no slot cache")
        batch, device = window_mask.shape[0], window_mask.device
        lengths = torch.full((batch,), cache.length, dtype=torch.long, device=device)
        self.model = model
        self.cache = SlotCache(cache.k, cache.v, lengths, span=cache.max_length)  # the same buffers
        self.mask = full_mask.new_zeros(batch, cache.max_length)  # [B, S]: the prompt's padding stays masked
        self.mask[:, : window_mask.shape[1]] = window_mask
        self.mask[:, window_mask.shape[1] :] = True
        self.pos = positions(window_mask)[:, -1:] + 1  # [B, 1], advanced in place
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)  # the step's input, copied into
        self.use_graph = graph and device.type == "cuda"
        self.graph: Any = None
        self.logits: torch.Tensor | None = None

    def __call__(self, token: torch.Tensor, seq: torch.Tensor, end: int) -> torch.Tensor:
        """Logits after ``token`` ``[B]`` (a fresh tensor: the next step does not overwrite it)."""
        self.token.copy_(token[:, None])
        if self.graph is not None:
            self.graph.replay()
        elif self.use_graph and self.logits is not None:  # warmed up: capture, then run what was captured
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()
            self.graph.replay()
        elif self.use_graph:  # the first step: eager, on a side stream, as capture wants
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.logits = self._step()
            torch.cuda.current_stream().wait_stream(stream)
        else:
            return self._step()
        assert self.logits is not None
        return self.logits.clone()

    def _step(self) -> torch.Tensor:
        logits, _ = self.model.step(self.token, position_ids=self.pos, attention_mask=self.mask, cache=self.cache)
        self.pos.add_(1)
        return logits
