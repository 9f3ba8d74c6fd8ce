"""Whether a batch of prompts can run on the request engine, and the engine sized for it.

``generate_text`` and the ``decode`` command run text prompts on the engine whenever it can
take them; where it cannot, they run the single-batch loop (:func:`decodekit.loop.generate`):
a sampler that drives its own loop (beam search), a processor that cannot keep rows apart (it
refuses per-row use with :class:`~decodekit.errors.ConfigError`), or a prompt plus
``max_new_tokens`` longer than the model's context (the loop slides its window past it).
"""

from __future__ import annotations

from typing import Any

from decodekit.engine.engine import Engine, TextCallback
from decodekit.errors import ConfigError


def engine_for_rows(
    model: Any, tokenizer: Any, processors: Any, sampler: Any, *, longest: int, max_new_tokens: int, slots: int,
    max_queue: int, eos_token_id: Any, on_text: TextCallback | None = None,
) -> Engine | None:  # fmt: skip
    """An engine of ``slots`` slots, each room for ``longest`` prompt ids and ``max_new_tokens``; or ``None``."""
    if getattr(sampler, "drives_loop", False):
        return None
    needed = longest + max_new_tokens
    context = getattr(model, "max_context", None)
    if context is not None and needed > context:
        return None
    try:
        return Engine(
            model, tokenizer, processors=processors if processors is not None else [], sampler=sampler,
            max_slots=slots, max_queue=max_queue, cache_tokens=slots * needed, eos_token_id=eos_token_id,
            on_text=on_text,
        )  # fmt: skip
    except ConfigError:
        return None
