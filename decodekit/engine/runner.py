"""Model runners: how the engine puts requests into the model's cache and runs a step.

:class:`SlotRunner` is continuous batching for models with a slot cache (the native GPT,
:class:`~decodekit.models.gpt.SlotCache`): a newcomer's prompt is prefilled alone into a free
slot while the other slots keep their place, and every step runs the occupied slots, which the
engine keeps as the first ``n`` rows. :class:`WaveRunner` serves any other
:class:`~decodekit.models.protocol.CausalLM` (the Hugging Face adapter) by refilling in waves:
a new set of requests is admitted only when every slot is free, as one left-padded batch.

:class:`SlotRunner` takes a newcomer's prompt minus its last token into the cache; the last token
is fed by the next step like any generated token, so one step computes every slot's next logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from decodekit.stepping import positions, prefill


class SlotRunner:
    """Continuous batching over a :class:`~decodekit.models.gpt.SlotCache` of ``slots`` rows."""

    refills_any_slot = True

    def __init__(self, model: Any, slots: int, slot_length: int) -> None:
        self.model = model
        self.slot_length = slot_length
        self.cache = model.new_slot_cache(slots, slot_length)
        # a slot's length is base[slot] + steps: host ints, so no step reads the device
        self.steps = 0
        self.base = [0] * slots
        self.live = [False] * slots
        self.top = 0  # the largest base of an occupied slot: recomputed at admission, release, move

    def fits(self, lengths: Sequence[tuple[int, int]]) -> bool:
        """Whether requests of these (prompt, max_new_tokens) lengths fit together: each its own slot."""
        return all(p + m <= self.slot_length for p, m in lengths)

    def admit(self, slots: Sequence[int], prompts: Sequence[Sequence[int]], max_new: int = 0) -> None:
        """Prefill each prompt but its last token into its slot (one forward pass each)."""
        device = self.model.device
        for slot, prompt in zip(slots, prompts):  # per newcomer, at admission: not per step
            head = torch.tensor(prompt[:-1], dtype=torch.long, device=device)[None]  # [1, L - 1]
            if head.shape[1]:
                _, cache = prefill(self.model, head, torch.ones_like(head, dtype=torch.bool), head.shape[1])
                self.cache.place(slot, cache)
            else:
                self.cache.lengths[slot] = 0
            self.base[slot] = head.shape[1] - self.steps
            self.live[slot] = True
        self._retop()

    def _retop(self) -> None:
        self.top = max((b for b, live in zip(self.base, self.live) if live), default=-self.steps)

    def release(self, slot: int) -> None:
        self.live[slot] = False
        self._retop()

    def move(self, src: int, dst: int) -> None:
        """Slot ``src``'s sequence into slot ``dst`` (to keep the occupied slots first)."""
        self.cache.move(src, dst, self.base[src] + self.steps)
        self.base[dst], self.live[dst], self.live[src] = self.base[src], True, False
        self._retop()

    def forward(self, feed: torch.Tensor, n: int) -> torch.Tensor:
        """Feed one token to each of the first ``n`` slots; their next logits ``[n, V]``."""
        span = self.top + self.steps + 1  # the longest occupied slot after this step's write
        view = self.cache.view(n, span)
        logits, _ = self.model.step(
            feed[:n, None], position_ids=view.lengths[:, None].clone(), attention_mask=None, cache=view
        )
        self.steps += 1
        return logits


class WaveRunner:
    """Refilling in waves, for models without a slot cache: any ``CausalLM`` works."""

    refills_any_slot = False

    def __init__(self, model: Any, slots: int, slot_length: int) -> None:
        self.model = model
        self.slot_length = slot_length
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [n, S] real positions so far
        self.next_pos: torch.Tensor | None = None  # [n, 1]
        self.pending: torch.Tensor | None = None  # the prefill's logits, for the first step
        self.live = [False] * slots

    def fits(self, lengths: Sequence[tuple[int, int]]) -> bool:
        """Whether these (prompt, max_new_tokens) lengths fit one wave: longest prompt plus longest run."""
        return max(p for p, _ in lengths) + max(m for _, m in lengths) <= self.slot_length

    def admit(self, slots: Sequence[int], prompts: Sequence[Sequence[int]], max_new: int = 0) -> None:
        """A wave: the whole prompts, left-padded, in one prefill (as :func:`decodekit.generate`).

        Its logits are handed out by the next :meth:`forward`, which ignores the fed tokens (the
        prompts' last tokens, already in this prefill).
        """
        device = self.model.device
        n = max(slots) + 1
        width = max(len(p) for p in prompts)
        ids = torch.zeros((n, width), dtype=torch.long, device=device)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, -1] = True  # a slot without a request (n > len(slots)) still has one real position
        for slot, prompt in zip(slots, prompts):  # host-side packing, once per wave
            ids[slot, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[slot, width - len(prompt) :] = True
            self.live[slot] = True
        cache_length = min(width + max_new, self.slot_length)
        self.pending, self.cache = prefill(self.model, ids, mask, cache_length)
        self.mask = mask
        self.next_pos = positions(mask)[:, -1:] + 1

    def release(self, slot: int) -> None:
        self.live[slot] = False
        if not any(self.live):
            self.cache = self.mask = self.next_pos = None

    def forward(self, feed: torch.Tensor, n: int) -> torch.Tensor:
        """The wave's next logits ``[n, V]``: the prefill's first, then one step per call."""
        if self.pending is not None:
            logits, self.pending = self.pending, None
            return logits
        assert self.mask is not None and self.next_pos is not None
        attn = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=-1)  # [n, S + 1]
        logits, self.cache = self.model.step(
            feed[:n, None], position_ids=self.next_pos, attention_mask=attn, cache=self.cache
        )
        self.mask, self.next_pos = attn, self.next_pos + 1
        return logits
