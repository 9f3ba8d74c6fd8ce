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
from decodekit.processors.truncation import TopP
from decodekit.samplers.rejection import NucleusMultinomial, fuse
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
        self.context = _context(tokenizer, model)
        if self.shared:
            if settings:
                raise ConfigError("settings: give either one chain (processors=, sampler=) or default settings, not both")
            template = as_chain(processors)
            sampler = Greedy() if sampler is None else sampler
            if getattr(sampler, "drives_loop", False):
                raise ConfigError(f"sampler {processor_name(sampler)} drives its own loop (beam search): it runs outside the engine")
            check_engine_ready(template, sampler)
            self.template, self.template_sampler = fuse(template, sampler)
            self.chain = self._for_slots(copy.deepcopy(self.template))
            self.sampler = copy.deepcopy(self.template_sampler)
            _begin(self.sampler, self._no_prompts())
            _per_slot(self.sampler, slots)
        else:
            self.names: list[str] = []  # the live chain's processors, in chain order
            self.chain = ProcessorChain()
            # one top-p value per row, 1 (off: a plain multinomial draw) unless the row defers its
            # top-p here, as its chain alone would (`fuse`)
            self.sampler = NucleusMultinomial(TopP([1.0] * slots))

    def _no_prompts(self) -> torch.Tensor:
        return torch.full((self.slots, 1), -1, dtype=torch.long, device=self.device)

    def _for_slots(self, chain: ProcessorChain) -> ProcessorChain:
        chain.begin(self._no_prompts())
        for p in chain.processors:
            _per_slot(p, self.slots)
        return chain

    def settings_of(self, request: Request) -> dict[str, Any]:
        return {**self.defaults, **dict(request.settings)}

    def check(self, request: Request) -> None:
        """Raise :class:`ConfigError` if ``request``'s settings cannot be decoded here."""
        if self.shared:
            if request.settings:
                raise ConfigError("settings: this engine decodes every request with the one chain it was given")
            return
        alone = self._alone(self.settings_of(request))[0]
        if request.eos_token_id is not None and any(p.name == "min_new_tokens" for p in alone.processors):
            raise ConfigError("settings: min_new_tokens bans the engine's EOS ids; it cannot go with a request's own eos_token_id")
        for p in alone.processors:
            if not type(p).supports_rows() or not getattr(p, "negative_padding", False):
                raise ConfigError(
                    f"settings: {p.name} has no per-row values yet, so requests cannot set it in the engine; "
                    "decode such requests with generate_text or decodekit.generate"
                )

    def _alone(self, settings: dict[str, Any]) -> tuple[ProcessorChain, float]:
        """The request's chain as it runs alone, and the top-p its sampler takes (1: none)."""
        from decodekit.registry import build_row_chain

        chain, sampler = fuse(build_row_chain([settings], self.context), Multinomial())
        if isinstance(sampler, NucleusMultinomial):
            return chain, float(sampler.recorded_filter.top_p[0])
        return chain, 1.0

    def admit(self, rows: torch.Tensor, requests: Sequence[Request], prompts: Sequence[Sequence[int]]) -> None:
        """Give slots ``rows`` the processors' values and state of these newcomers."""
        prompt_ids = padded(prompts, self.device)
        if self.shared:
            fresh = copy.deepcopy(self.template)
            fresh.begin(prompt_ids)
            fresh_sampler = copy.deepcopy(self.template_sampler)
            _begin(fresh_sampler, prompt_ids)
            _assign(self.chain, rows, fresh)
            _assign(self.sampler, rows, fresh_sampler)
            return
        from decodekit.registry import build_row_chain

        settings, top_p = [], []
        for request in requests:  # per newcomer, at admission
            merged = self.settings_of(request)
            alone, p = self._alone(merged)
            if p < 1.0:
                merged = {**merged, "top_p": 1.0}  # the sampler takes it, as alone
            settings.append(merged)
            top_p.append(p)
            self._extend([q.name for q in alone.processors if q.name != "top_p" or p == 1.0])
        fresh = build_row_chain(settings, self.context, include=self.names)
        fresh.begin(prompt_ids)
        _assign(self.chain, rows, fresh)
        self.sampler.assign(rows, NucleusMultinomial(TopP(top_p)))

    def _extend(self, names: Sequence[str]) -> None:
        """Add processors the live chain lacks, off for every slot, keeping the others as they are."""
        new = [n for n in names if n not in self.names]
        if not new:
            return
        from decodekit.registry import build_row_chain

        live = {p.name: p for p in self.chain.processors}
        added = build_row_chain([{}] * self.slots, self.context, include=new)
        added.begin(self._no_prompts())
        live.update({p.name: p for p in added.processors})
        self.names = [p.name for p in build_row_chain([{}], self.context, include=[*self.names, *new]).processors]
        self.chain = ProcessorChain([live[n] for n in self.names])

    def reorder(self, index: torch.Tensor) -> None:
        for part in (self.chain, self.sampler):
            reorder = getattr(part, "reorder", None)
            if reorder is not None:
                reorder(index)

    def complete(self, slot: int, tokens: list[int]) -> bool | None:
        """Whether a finished slot's tokens complete its grammar (``None``: no grammar there)."""
        return grammar_complete(self.chain, slot, tokens)

    def sample(self, history: torch.Tensor, logits: torch.Tensor, rng: Any) -> torch.Tensor:
        try:
            return self.sampler(history, logits, rng)
        except Exception as exc:
            raise PluginError(f"sampler {processor_name(self.sampler)} raised: {type(exc).__name__}: {exc}") from exc


def grammar_complete(processors: Any, row: int, tokens: list[int]) -> bool | None:
    """``False`` when a processor that constrains ``row`` to a grammar (one with ``complete``)
    says ``tokens`` do not complete it, ``True`` when all such say they do, ``None`` when none."""
    verdicts = [p.complete(row, tokens) for p in as_chain(processors) if hasattr(p, "complete")]
    verdicts = [v for v in verdicts if v is not None]
    return all(verdicts) if verdicts else None


def grammar_reason(reason: str, complete: bool | None) -> str:
    """``"incomplete"`` for a row under a grammar that ended before the grammar did (or whose
    text a stop string cut), else ``reason``."""
    if complete is False or (complete is not None and reason == "stop"):
        return "incomplete"
    return reason


def _begin(part: Any, prompt_ids: torch.Tensor) -> None:
    begin = getattr(part, "begin", None)
    if begin is not None:
        begin(prompt_ids)


def _per_slot(part: Any, slots: int) -> None:
    """A processor built from scalars, begun on every slot: its state is per row, so it takes
    newcomers' state by ``assign`` (its scalar values stay shared)."""
    if getattr(part, "row_fields", ()) and getattr(part, "rows", 0) is None:
        part.rows = slots
    inner = getattr(part, "recorded_filter", None)
    if inner is not None:
        _per_slot(inner, slots)


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
        tokenizer=tokenizer,
    )
