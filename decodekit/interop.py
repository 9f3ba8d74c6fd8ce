"""Interop with transformers: decodekit processors inside ``model.generate``, and the reverse.

A decodekit chain becomes a ``transformers.LogitsProcessor`` with :func:`to_transformers`::

    from transformers import LogitsProcessorList
    from decodekit.interop import to_transformers

    chain = decodekit.build_chain({"repetition_penalty": 1.2, "dry_multiplier": 0.8, ...})
    model.generate(ids, logits_processor=LogitsProcessorList([to_transformers(chain)]))

The other way needs no wrapper: transformers' processors have decodekit's call shape
``(input_ids, scores) -> scores``, so they go straight into a chain or ``decodekit.generate``::

    chain = RepetitionPenalty(1.2) | transformers.TopKLogitsWarper(40)

transformers is imported only when :func:`to_transformers` is first called
(``pip install decodekit[hf]``).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

from decodekit.loop import as_chain
from decodekit.processors.base import ProcessorChain

__all__ = ["to_transformers"]


def to_transformers(processors: Any) -> Any:
    """A ``transformers.LogitsProcessor`` that runs ``processors`` (one, a list, or a chain).

    transformers never calls ``begin``, so the wrapper calls the chain's ``begin`` itself with the
    prompt when a new generation starts: when ``input_ids`` is not the previous call's plus one
    token (one comparison of the prompt per step). Call ``reset()`` to force a new start.
    Processors that keep per-row state and need ``reorder`` (none of decodekit's built-ins) are
    not told about transformers' beam reordering.

    Raises:
        ImportError: transformers is not installed.
    """
    return _wrapper_class()(as_chain(processors))


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "decodekit.interop.to_transformers needs transformers: pip install decodekit[hf]"
        ) from None
    return transformers


@cache
def _wrapper_class() -> type:
    """The wrapper class, created on first use so that importing this module needs no transformers."""
    transformers = _import_transformers()

    class DecodekitLogitsProcessor(transformers.LogitsProcessor):
        """A decodekit :class:`~decodekit.ProcessorChain` as a transformers logits processor."""

        def __init__(self, chain: ProcessorChain) -> None:
            self.chain = chain
            self._prompt: torch.Tensor | None = None  # [B, T0] of the generation under way
            self._length = 0  # input length at the previous call

        def reset(self) -> None:
            """Treat the next call as the first step of a new generation."""
            self._prompt = None

        def _continues(self, input_ids: torch.Tensor) -> bool:
            prompt = self._prompt
            return (
                prompt is not None
                and input_ids.shape[0] == prompt.shape[0]
                and input_ids.shape[1] == self._length + 1
                and bool(torch.equal(input_ids[:, : prompt.shape[1]], prompt))
            )

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            if not self._continues(input_ids):
                self._prompt = input_ids.clone()
                self.chain.begin(input_ids)
            self._length = input_ids.shape[1]
            return self.chain(input_ids, scores)

        def __repr__(self) -> str:
            return f"DecodekitLogitsProcessor({self.chain!r})"

    return DecodekitLogitsProcessor
