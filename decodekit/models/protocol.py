"""The model protocol: the few methods :func:`decodekit.generate` needs from a causal LM.

Any object with these attributes and methods can be decoded; the native GPT
(:mod:`decodekit.models.gpt`) and the Hugging Face adapter (:mod:`decodekit.models.hf`)
both follow it.

Shapes: ``B`` batch rows, ``T`` new positions in this call, ``S`` positions seen so far
(cached plus new), ``V`` vocabulary size.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class CausalLM(Protocol):
    """A causal language model with a key/value cache.

    Attributes:
        vocab_size: number of logits per position (``V``).
        max_context: the most positions the model attends over at once (GPT-2's
            ``n_positions``, nanoGPT's ``block_size``), or ``None`` when unbounded.
        device: where the model's weights live; the loop puts every tensor there.
        dtype: the floating dtype of the weights.
    """

    vocab_size: int
    max_context: int | None
    device: torch.device
    dtype: torch.dtype

    def new_cache(self, batch_size: int, max_length: int) -> Any:
        """An empty cache for ``batch_size`` rows and at most ``max_length`` positions."""
        ...

    def step(
        self,
        input_ids: torch.Tensor,  # [B, T] long
        *,
        position_ids: torch.Tensor,  # [B, T] long
        attention_mask: torch.Tensor,  # [B, S] bool, True = a real token (False = left padding)
        cache: Any,
    ) -> tuple[torch.Tensor, Any]:
        """Run ``T`` new positions after those already in ``cache``.

        Returns the logits of the *last* new position, ``[B, V]`` (float), and the
        cache, now holding ``S`` positions. A cache may be updated in place.
        """
        ...

    def reorder_cache(self, cache: Any, index: torch.Tensor) -> Any:
        """The cache with its rows taken as ``cache[index]`` (``index``: [B'] long).

        Rows may repeat: beam search and ``num_samples`` use this to expand and reorder.
        """
        ...
