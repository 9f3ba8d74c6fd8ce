"""The engine's per-request logprobs: each slot its own ``n`` and mode, kept on the device.

Each step that a slot asking for logprobs is live, :meth:`SlotLogprobs.record` computes every
slot's chosen-token logprob and top-``k`` alternatives at once (``k``: the largest ``n`` of the
live slots; raw or processed per slot by one ``torch.where`` when both are live) into a
``[slots, steps]`` device buffer, with no host sync. When a request ends, :meth:`take` copies its
own columns to the host, cut to its ``n``. Slots that ask for none cost nothing while none does.
"""

from __future__ import annotations

from typing import Any

import torch

from decodekit.logprobs import TokenLogprobs, nucleus_logprobs, step_logprobs


class SlotLogprobs:
    """Device buffers of the slots' logprobs, one column per engine step since the oldest asker."""

    def __init__(self, slots: int, device: torch.device) -> None:
        self.device = device
        self.n: list[int | None] = [None] * slots  # per slot: alternatives asked for, None = no logprobs
        self.mode = ["raw"] * slots
        self.start = [0] * slots  # the step of the slot's first token
        self.step = 0  # steps recorded so far
        self.base = 0  # the step held in column 0
        self.k = 0  # alternatives computed per step (the largest n live)
        self.modes: set[str] = set()  # the modes of the live askers
        self.raw_rows = torch.zeros(slots, dtype=torch.bool, device=device)
        self.chosen = torch.zeros((slots, 0), device=device)
        self.values = torch.zeros((slots, 0, 0), device=device)
        self.ids = torch.zeros((slots, 0, 0), dtype=torch.long, device=device)

    @property
    def active(self) -> bool:
        return bool(self.modes)

    def admit(self, slot: int, n: int | None, mode: str) -> None:
        self.n[slot], self.mode[slot], self.start[slot] = n, mode, self.step
        self._refresh()

    def release(self, slot: int) -> None:
        self.n[slot] = None
        self._refresh()

    def move(self, src: int, dst: int) -> None:
        for name in ("n", "mode", "start"):
            values = getattr(self, name)
            values[dst] = values[src]
        self.n[src] = None
        for buffer in (self.chosen, self.values, self.ids):
            buffer[dst] = buffer[src]
        self._refresh()

    def _refresh(self) -> None:
        """Host facts about the live askers, kept at admission, release and move."""
        live = [s for s, n in enumerate(self.n) if n is not None]
        self.modes = {self.mode[s] for s in live}
        self.k = max((self.n[s] or 0 for s in live), default=0)
        if len(self.modes) > 1:
            self.raw_rows = torch.tensor([m == "raw" for m in self.mode], dtype=torch.bool, device=self.device)
        if not live:
            self.base = self.step
        self._fit(min((self.start[s] for s in live), default=self.step))

    def _fit(self, oldest: int) -> None:
        """Room for the next column and ``k`` alternatives, keeping columns from step ``oldest``."""
        col = self.step - self.base
        if col < self.chosen.shape[1] and self.k <= self.values.shape[2]:
            return
        keep = self.step - oldest
        width, k = max(64, 2 * (keep + 1)), max(self.k, self.values.shape[2])
        slots = self.chosen.shape[0]
        chosen = torch.zeros((slots, width), device=self.device)
        values = torch.zeros((slots, width, k), device=self.device)
        ids = torch.zeros((slots, width, k), dtype=torch.long, device=self.device)
        if keep:
            old = slice(oldest - self.base, col)
            chosen[:, :keep] = self.chosen[:, old]
            values[:, :keep, : self.values.shape[2]] = self.values[:, old]
            ids[:, :keep, : self.ids.shape[2]] = self.ids[:, old]
        self.chosen, self.values, self.ids, self.base = chosen, values, ids, oldest

    def record(self, raw: torch.Tensor, processed: torch.Tensor, token: torch.Tensor, sampler: Any, history: torch.Tensor) -> None:
        """One step's logprobs of every slot (``raw``, ``processed``: ``[S, V]``; ``token``: ``[S]``)."""
        record = getattr(sampler, "recorded_filter", None) if "processed" in self.modes else None  # fused into it
        if not getattr(record, "active", True):  # every row's top-p is off
            record = None
        nucleus = getattr(sampler, "nucleus", None) if record is not None else None  # top-p: its bounds
        if record is not None and nucleus is None:  # any other fused filter: applied for the record
            processed = record(history, processed)
        if self.modes == {"raw"}:
            source = raw
        elif self.modes == {"processed"}:
            source = processed
        else:
            source = torch.where(self.raw_rows[:, None], raw, processed)
        self._fit(min(self.start[s] for s, n in enumerate(self.n) if n is not None))
        if nucleus is None:
            chosen, values, ids = step_logprobs(source, token, self.k)
        else:
            chosen, values, ids = nucleus_logprobs(source, token, self.k, *nucleus(source, token, self.raw_rows))
        col = self.step - self.base
        self.chosen[:, col] = chosen
        self.values[:, col, : self.k] = values
        self.ids[:, col, : self.k] = ids
        self.step += 1

    def skip(self) -> None:
        """A step with no asker live."""
        self.step += 1
        self.base = self.step

    def take(self, slot: int, tokens: list[int]) -> TokenLogprobs | None:
        """The finished request's logprobs, on the host (one copy), or None if it asked for none."""
        n = self.n[slot]
        if n is None:
            return None
        first = self.start[slot] - self.base
        cols = slice(first, first + len(tokens))
        return TokenLogprobs(
            list(tokens), self.chosen[slot, cols].tolist(), self.ids[slot, cols, :n].tolist(),
            self.values[slot, cols, :n].tolist(), self.mode[slot],
        )  # fmt: skip
