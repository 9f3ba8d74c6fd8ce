"""Where the engine's processor chain and sampler come from, and how newcomers join them.

Two ways (see :class:`~decodekit.engine.engine.Engine`):

- one given chain and sampler for every request: the live chain is a copy of it for all
  slots; a newcomer gets a fresh copy, begun on its prompt, assigned into its slot;
- settings per request: the live chain has one value per row for every setting any request
  uses (:func:`decodekit.registry.build_row_chain`); a newcomer's values and state are
  assigned into its slot, and a setting no live chain has yet adds that processor (off for
  the other rows).

Either way a processor keeps one value and one state per row, so a request is processed as
it would be alone.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from decodekit.engine.request import Request
from decodekit.errors import ConfigError, PluginError
from decodekit.loop import as_chain
from decodekit.samplers.rejection import fuse
from decodekit.processors.base import ProcessorChain, processor_name
from decodekit.samplers.base import Greedy, Multinomial, Sampler


def padded(prompts: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """Prompts right-aligned in ``[k, max length]``, ``-1`` on the left."""
    width = max(len(p) for p in prompts)
    out = torch.full((len(prompts), width), -1, dtype=torch.long)
    for row, prompt in enumerate(prompts):  # host-side packing, at admission
        out[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
    return out.to(device)


def check_engine_ready(chain: ProcessorChain, sampler: Any) -> None:
    """Refuse, in one line, a processor or sampler that cannot keep rows apart.

    A processor must read the ``-1`` that pads other rows' history as no token
    (``negative_padding = True``) and take a newcomer's values and state into a slot
    (``assign``); every built-in does. A sampler with state of its own needs ``assign`` too.
    """
    for p in chain.processors:
        if not getattr(p, "negative_padding", False) or not hasattr(p, "assign"):
            raise ConfigError(
                f"processor {processor_name(p)} cannot run in the request engine: it needs "
                "`negative_padding = True` and `assign(rows, other)` (every built-in has both)"
            )
    stateful = type(sampler).begin is not Sampler.begin if isinstance(sampler, Sampler) else hasattr(sampler, "begin")
    if (stateful or hasattr(sampler, "reorder")) and not hasattr(sampler, "assign"):
        raise ConfigError(
            f"sampler {processor_name(sampler)} keeps per-row state but has no `assign(rows, other)`, "
            "which the request engine needs to admit a request into a slot"
        )


class ChainSource:
    """The live chain and sampler of an engine's slots."""

    def __init__(self, processors: Any, sampler: Any, settings: dict[str, Any], slots: int, tokenizer: Any, model: Any) -> None:
        self.slots, self.device = slots, model.device
        self.shared = processors is not None or sampler is not None
        self.defaults = dict(settings)
        if self.shared:
            if settings:
                raise ConfigError("settings: give either one chain (processors=, sampler=) or default settings, not both")
            template = as_chain(processors)
            sampler = Greedy() if sampler is None else sampler
            if getattr(sampler, "drives_loop", False):
                raise ConfigError(f"sampler {processor_name(sampler)} drives its own loop (beam search): it runs outside the engine")
            check_engine_ready(template, sampler)
            self.template, self.template_sampler = template, sampler
            self.chain = copy.deepcopy(template)
            self.chain.begin(torch.full((slots, 1), -1, dtype=torch.long, device=self.device))
            self.sampler = copy.deepcopy(sampler)
        else:
            from decodekit.registry import build_row_chain

            self._build = build_row_chain
            self.context = _context(tokenizer, model)
            self.chain = build_row_chain([dict(self.defaults)] * slots, self.context)
            self.chain.begin(torch.full((slots, 1), -1, dtype=torch.long, device=self.device))
            self.sampler = Multinomial()
        self.chain, self.sampler = fuse(self.chain, self.sampler)

    def settings_of(self, request: Request) -> dict[str, Any]:
        return {**self.defaults, **dict(request.settings)}

    def check(self, request: Request) -> None:
        """Raise :class:`ConfigError` if ``request``'s settings cannot be decoded here."""
        if self.shared:
            if request.settings:
                raise ConfigError("settings: this engine decodes every request with the one chain it was given")
            return
        self._build([self.settings_of(request)], self.context)

    def admit(self, rows: torch.Tensor, requests: Sequence[Request], prompts: Sequence[Sequence[int]]) -> None:
        """Give slots ``rows`` the processors' values and state of these newcomers."""
        prompt_ids = padded(prompts, self.device)
        if self.shared:
            fresh = copy.deepcopy(self.template)
            fresh_sampler = copy.deepcopy(self.template_sampler)
        else:
            fresh = self._build([self.settings_of(r) for r in requests], self.context)
            fresh_sampler = Multinomial()
        fresh.begin(prompt_ids)
        if hasattr(fresh_sampler, "begin"):
            fresh_sampler.begin(prompt_ids)
        fresh, fresh_sampler = fuse(fresh, fresh_sampler)
        _assign(self.chain, rows, fresh)
        _assign(self.sampler, rows, fresh_sampler)

    def reorder(self, index: torch.Tensor) -> None:
        for part in (self.chain, self.sampler):
            reorder = getattr(part, "reorder", None)
            if reorder is not None:
                reorder(index)

    def sample(self, history: torch.Tensor, logits: torch.Tensor, rng: Any) -> torch.Tensor:
        try:
            return self.sampler(history, logits, rng)
        except Exception as exc:
            raise PluginError(f"sampler {processor_name(self.sampler)} raised: {type(exc).__name__}: {exc}") from exc


def _assign(live: Any, rows: torch.Tensor, fresh: Any) -> None:
    assign = getattr(live, "assign", None)
    if assign is not None:
        assign(rows, fresh)


def _context(tokenizer: Any, model: Any) -> Any:
    from decodekit.processors.base import BuildContext

    return BuildContext(
        eos_token_id=None if tokenizer is None else tokenizer.eos_token_id,
        encode=None if tokenizer is None else tokenizer.encode,
        vocab_size=model.vocab_size,
    )
