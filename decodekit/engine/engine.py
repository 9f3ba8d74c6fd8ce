"""The request engine: many requests, each with its own settings, in one continuously refilled batch.

A fixed number of slots decode together. Each step: admit queued requests into free slots,
run one forward pass over the occupied slots, run the processor chain and sampler over every
slot (one value per row for every setting), append the tokens, and retire the requests that
ended; a freed slot takes the next request at the next step, so the batch stays full
(:class:`~decodekit.engine.runner.SlotRunner`; models without a slot cache refill in waves,
:class:`~decodekit.engine.runner.WaveRunner`).

Every request decodes as it would alone: its history is its own tokens (other rows' padding is
``-1``, which processors ignore), its processors have its own settings and state, and its random
stream is its own seed from draw 0, whatever else shares the batch and whenever it came in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from decodekit.engine.chains import ChainSource, grammar_reason
from decodekit.engine.logprobs import SlotLogprobs
from decodekit.engine.request import Request, RequestOutput, eos_list, refused, validate_request
from decodekit.engine.runner import SlotRunner, WaveRunner
from decodekit.engine.text import RequestText
from decodekit.errors import ConfigError, DecodekitError
from decodekit.loop import run_chain
from decodekit.random import RowRandom, row_seeds
from decodekit.scoring import sequence_logprobs
from decodekit.tokenization import Tokenizer, check_vocab, continuation_text

# on_text(index, piece): a piece of request ``index``'s text, as soon as it is certain.
TextCallback = Callable[[int, str], None]


class QueueFull(DecodekitError):
    """:meth:`Engine.submit` on a full queue: run steps (or :meth:`Engine.run`) to make room."""


@dataclass
class _Live:
    """A request in a slot: what the host keeps about it."""

    request: Request
    index: int
    prompt_ids: list[int]
    cropped: int
    seed: int
    start: int  # history column of its first prompt token
    admitted: int  # engine step at admission
    text: RequestText | None = None
    stop_string: str | None = None


@dataclass
class _Queued:
    request: Request
    index: int
    prompt_ids: list[int] = field(default_factory=list)
    cropped: int = 0
    seed: int = 0


class Engine:
    """Continuous batching of :class:`~decodekit.engine.request.Request` objects.

    Args:
        model: a :class:`~decodekit.models.protocol.CausalLM`; with ``new_slot_cache`` (the
            native GPT) slots are refilled one by one, otherwise in waves.
        tokenizer: for prompts given as text, stop strings and text results (optional).
        processors, sampler: one chain and sampler for every request (processors must support
            per-row state: every built-in does). Without them, each request's ``settings`` build
            its own per-row chain (:func:`decodekit.registry.build_row_chain`) and the sampler is
            multinomial (``temperature=0`` is greedy for a request).
        settings: defaults under every request's own ``settings``.
        max_slots: how many requests decode together.
        max_queue: how many submitted requests may wait (back-pressure: :meth:`submit` raises
            :class:`QueueFull`; :meth:`run` pulls its input only as room frees).
        cache_tokens: the key/value cache budget in positions, all slots together; a slot holds
            ``min(cache_tokens // max_slots, model context)`` positions, prompt plus new tokens.
        eos_token_id: default end-of-sequence id(s) (default: the tokenizer's).
        on_text: streams each request's text as it is made.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer | None = None,
        *,
        processors: Any = None,
        sampler: Any = None,
        settings: dict[str, Any] | None = None,
        max_slots: int = 16,
        max_queue: int | None = None,
        cache_tokens: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        on_text: TextCallback | None = None,
    ) -> None:
        for name, value in (("max_slots", max_slots), ("max_queue", max_queue), ("cache_tokens", cache_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name}={value!r} is not allowed: must be an integer >= 1")
        if tokenizer is not None:
            check_vocab(tokenizer, model)
        self.model, self.tokenizer, self.on_text = model, tokenizer, on_text
        self.slots = max_slots
        self.max_queue = max_queue if max_queue is not None else 4 * max_slots
        context = getattr(model, "max_context", None)
        per_slot = (cache_tokens // max_slots) if cache_tokens is not None else (context or 2048)
        self.slot_length = min(per_slot, context) if context is not None else per_slot
        if self.slot_length < 2:
            raise ConfigError(f"cache_tokens={cache_tokens!r} leaves {self.slot_length} positions per slot; need at least 2")
        runner_cls = SlotRunner if hasattr(model, "new_slot_cache") else WaveRunner
        self.runner = runner_cls(model, max_slots, self.slot_length)
        if eos_token_id is None and tokenizer is not None:
            eos_token_id = tokenizer.eos_token_id
        self.eos_default = eos_list(eos_token_id, "eos_token_id")
        self.chains = ChainSource(processors, sampler, settings or {}, max_slots, tokenizer, model)

        device, S = model.device, max_slots
        self.queue: deque[_Queued] = deque()
        self.ready: list[RequestOutput] = []  # refused at submission, handed out by the next step
        self.live: list[_Live | None] = [None] * S
        self.n = 0  # slots the model computes: the occupied ones come first (waves: the wave)
        self.submitted = 0
        self.steps = 0
        self.rng = RowRandom(torch.zeros(S, dtype=torch.long, device=device), torch.zeros(S, dtype=torch.long, device=device))
        self.hist = torch.full((S, 64), -1, dtype=torch.long, device=device)  # right-aligned at self.col
        self.col = 0
        self.feed = torch.zeros(S, dtype=torch.long, device=device)
        self.logits = torch.zeros((S, model.vocab_size), dtype=torch.float32, device=device)
        self.occupied = torch.zeros(S, dtype=torch.bool, device=device)
        self.generated = torch.zeros(S, dtype=torch.long, device=device)
        self.max_new = torch.ones(S, dtype=torch.long, device=device)
        self.eos = torch.full((S, max(len(self.eos_default), 1)), -1, dtype=torch.long, device=device)
        self.low: int | None = None  # first history column in use, None when no slot is occupied
        self.texts = False  # whether some occupied slot streams text or has stop strings
        self.lp = SlotLogprobs(S, device)  # the logprobs of the slots that ask for them

    # ------------------------------------------------------------------ submitting

    def submit(self, request: Request) -> int:
        """Queue a request; returns its index (submission number). A malformed request is
        refused alone: its result, with ``finish_reason="error"``, comes from the next step."""
        if len(self.queue) >= self.max_queue:
            raise QueueFull(f"the engine's queue holds max_queue={self.max_queue} requests; run steps to make room")
        index = self.submitted
        self.submitted += 1
        item = _Queued(request, index)
        try:
            validate_request(request, has_tokenizer=self.tokenizer is not None)
            item.prompt_ids, item.cropped = self._prompt_ids(request)
            item.seed = request.seed if request.seed is not None else int(row_seeds(None, 1, torch.device("cpu"))[0])
            self.chains.check(request)
        except ConfigError as exc:
            self.ready.append(refused(request, index, str(exc)))
            return index
        self.queue.append(item)
        return index

    def _prompt_ids(self, request: Request) -> tuple[list[int], int]:
        """The prompt's ids, cropped by the rule: keep the last ``slot_length - max_new_tokens``."""
        if request.prompt is not None:
            assert self.tokenizer is not None
            ids = self.tokenizer.encode(request.prompt)
            if not ids:
                start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
                if start is None:
                    raise ConfigError("prompt: empty, and the tokenizer has no BOS or EOS token to start from")
                ids = [start]
        else:
            ids = list(request.prompt_ids or [])
            if not ids:
                raise ConfigError("prompt_ids: give at least one token id")
            vocab = self.model.vocab_size
            if min(ids) < 0 or max(ids) >= vocab:
                raise ConfigError(f"prompt_ids: token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}")
        room = self.slot_length - request.max_new_tokens
        if room < 1:
            raise ConfigError(
                f"max_new_tokens={request.max_new_tokens} is not allowed here: a slot holds {self.slot_length} "
                f"positions, prompt included; at most {self.slot_length - 1}"
            )
        cropped = max(0, len(ids) - room)
        return ids[cropped:], cropped

    # ------------------------------------------------------------------ running

    def has_work(self) -> bool:
        return bool(self.queue or self.ready or self.n)

    def run(self, requests: Iterable[Request], *, ordered: bool = True) -> Iterator[RequestOutput]:
        """Decode ``requests`` (any iterable, pulled only as the queue has room); yield the results
        in submission order (``ordered=True``) or as each request ends."""
        source = iter(requests)
        exhausted = False
        held: dict[int, RequestOutput] = {}
        next_index = self.submitted
        while True:
            while not exhausted and len(self.queue) < self.max_queue:
                try:
                    self.submit(next(source))
                except StopIteration:
                    exhausted = True
            if exhausted and not self.has_work():
                return
            for out in self.step():
                if not ordered:
                    yield out
                    continue
                held[out.index] = out
                while next_index in held:
                    yield held.pop(next_index)
                    next_index += 1

    def generate(self, requests: Iterable[Request]) -> list[RequestOutput]:
        """All results, in submission order."""
        return list(self.run(requests))

    def step(self) -> list[RequestOutput]:
        """Admit what fits, decode one token in every occupied slot, retire what ended."""
        done, self.ready = self.ready, []
        self._admit()
        if not self.n:
            return done
        n = self.n
        self.logits[:n] = self.runner.forward(self.feed, n)  # [n, V]; idle rows keep zeros
        history = self.hist[:, self._low() : self.col]  # [S, T], -1 before each row's start
        processed = run_chain(self.chains.chain, history, self.logits, self.steps)
        token = self.chains.sample(history, processed, self.rng)  # [S]
        token = torch.where(self.occupied, token, -1)
        if self.lp.active:
            self.lp.record(self.logits, processed, token, self.chains.sampler, history)
        else:
            self.lp.skip()
        self._append(token)
        self.feed = token.clamp(min=0)  # what each slot feeds to the next step
        self.generated += self.occupied.long()
        hit_eos = (token[:, None] == self.eos).any(dim=-1)
        ended = self.occupied & (hit_eos | (self.generated >= self.max_new))
        stopped = self._text(token, hit_eos) if self._texts() else []
        self.steps += 1
        rows = ended.nonzero().flatten().tolist() if bool(ended.any()) else []
        for slot in sorted(set(rows) | set(stopped)):  # only the rows that ended this step
            done.append(self._retire(slot, "stop" if slot in stopped else ("eos" if bool(hit_eos[slot]) else "length")))
        self._compact()
        return done

    # ------------------------------------------------------------------ slots

    def _admit(self) -> None:
        """Move queued requests into free slots (waves: only when every slot is free)."""
        if not self.queue or (self.n and not self.runner.refills_any_slot):
            return
        free = [s for s in range(self.slots) if self.live[s] is None]  # at admission, not per step
        take: list[_Queued] = []
        while self.queue and len(take) < len(free):
            item = self.queue[0]
            lengths = [(len(q.prompt_ids), q.request.max_new_tokens) for q in (*take, item)]
            if take and not self.runner.fits(lengths):
                break
            take.append(self.queue.popleft())
        if not take:
            return
        slots = free[: len(take)]
        prompts = [item.prompt_ids for item in take]
        self._make_room(max(len(p) for p in prompts))
        self.runner.admit(slots, prompts, max(item.request.max_new_tokens for item in take))
        device = self.hist.device
        rows = torch.tensor(slots, dtype=torch.long, device=device)
        for slot, item in zip(slots, take):  # per newcomer, once
            ids = torch.tensor(item.prompt_ids, dtype=torch.long, device=device)
            self.hist[slot] = -1
            self.hist[slot, self.col - len(ids) : self.col] = ids
            self.feed[slot] = ids[-1]
            self._set_eos(slot, item.request)
            self.lp.admit(slot, item.request.logprobs, item.request.logprobs_mode)
            text = None
            if self.tokenizer is not None and (item.request.stop or self.on_text is not None):
                stop = [item.request.stop] if isinstance(item.request.stop, str) else list(item.request.stop)
                text = RequestText(self.tokenizer, item.prompt_ids, stop)
            self.live[slot] = _Live(
                item.request, item.index, item.prompt_ids, item.cropped, item.seed,
                start=self.col - len(ids), admitted=self.steps, text=text,
            )  # fmt: skip
        self.max_new[rows] = torch.tensor([item.request.max_new_tokens for item in take], device=device)
        self.generated[rows] = 0
        self.occupied[rows] = True
        self.chains.admit(rows, [item.request for item in take], prompts)
        self.rng.assign(rows, torch.tensor([item.seed for item in take], dtype=torch.long, device=device))
        self.n = max(self.n, max(slots) + 1)
        self._recount()

    def _set_eos(self, slot: int, request: Request) -> None:
        ids = self.eos_default if request.eos_token_id is None else eos_list(request.eos_token_id, "eos_token_id")
        if len(ids) > self.eos.shape[1]:
            wider = torch.full((self.slots, len(ids)), -1, dtype=torch.long, device=self.eos.device)
            wider[:, : self.eos.shape[1]] = self.eos
            self.eos = wider
        self.eos[slot] = -1
        if ids:
            self.eos[slot, : len(ids)] = torch.tensor(ids, dtype=torch.long, device=self.eos.device)

    def _low(self) -> int:
        """The first history column any occupied slot uses (kept by :meth:`_recount`)."""
        return self.col if self.low is None else self.low

    def _recount(self) -> None:
        """Host facts about the occupied slots, refreshed when one comes, goes or moves."""
        lives = [live for live in self.live if live is not None]
        self.low = min((live.start for live in lives), default=None)
        self.texts = any(live.text is not None for live in lives)

    def _make_room(self, prompt_length: int) -> None:
        """A history buffer with a prompt's width left of the write column and one free column."""
        if self.col >= prompt_length and self.col < self.hist.shape[1]:
            return
        low = self._low()
        width = self.col - low
        col = max(prompt_length, width)
        buffer = torch.full((self.slots, max(2 * (col + 1), 64)), -1, dtype=torch.long, device=self.hist.device)
        buffer[:, col - width : col] = self.hist[:, low : self.col]
        shift = col - self.col
        for live in self.live:  # host bookkeeping, when the buffer is rebuilt
            if live is not None:
                live.start += shift
        self.hist, self.col = buffer, col
        self._recount()

    def _append(self, token: torch.Tensor) -> None:
        if self.col == self.hist.shape[1]:
            self._make_room(0)
        self.hist[:, self.col] = token
        self.col += 1

    def _texts(self) -> bool:
        return self.texts

    def _text(self, token: torch.Tensor, hit_eos: torch.Tensor) -> list[int]:
        """Stream text pieces and check stop strings (host work, only for rows that need it)."""
        tokens, eos = token.tolist(), hit_eos.tolist()
        stopped = []
        for slot, live in enumerate(self.live[: self.n]):  # text is per row by nature
            if live is None or live.text is None or eos[slot]:
                continue
            piece, hit = live.text.push(tokens[slot])
            if piece and self.on_text is not None:
                self.on_text(live.index, piece)
            if hit:
                live.stop_string = live.text.stop_string
                stopped.append(slot)
        return stopped

    def _retire(self, slot: int, reason: str) -> RequestOutput:
        live = self.live[slot]
        assert live is not None
        count = self.steps - live.admitted
        tokens = self.hist[slot, self.col - count : self.col].tolist()
        text = stop_string = None
        if self.tokenizer is not None:
            eos = set(self.eos[slot].tolist())
            text = continuation_text(self.tokenizer, live.prompt_ids, [t for t in tokens if t not in eos])
            stop = [live.request.stop] if isinstance(live.request.stop, str) else live.request.stop
            cut = [(text.find(s), s) for s in stop if s and s in text]
            if cut:
                at, stop_string = min(cut)
                text, reason = text[:at], "stop"
            if live.text is not None and self.on_text is not None:
                live.text.text = text
                piece = live.text.flush()
                if piece:
                    self.on_text(live.index, piece)
        reason = grammar_reason(reason, self.chains.complete(slot, tokens))
        logprobs, prompt_logprobs = self.lp.take(slot, tokens), self._prompt_logprobs(live)
        self.lp.release(slot)
        self.live[slot] = None
        self.occupied[slot] = False
        self.hist[slot] = -1
        self.runner.release(slot)
        self._recount()
        return RequestOutput(
            id=live.request.id if live.request.id is not None else live.index, index=live.index,
            prompt=live.request.prompt, prompt_ids=live.prompt_ids, tokens=tokens, text=text,
            finish_reason=reason, stop_string=stop_string, seed=live.seed, cropped=live.cropped,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        )  # fmt: skip

    def _prompt_logprobs(self, live: _Live) -> Any:
        n = live.request.prompt_logprobs
        return None if n is None else sequence_logprobs(self.model, [live.prompt_ids], top=n)[0]

    def _compact(self) -> None:
        """Keep the occupied slots first, so the model computes only them (slot refilling)."""
        if not self.runner.refills_any_slot:  # a wave ends whole
            if all(live is None for live in self.live):
                self.n = 0
            return
        while self.n and self.live[self.n - 1] is None:
            self.n -= 1
        if self.queue:
            return  # free slots are refilled at the next step
        for hole in range(self.n):
            if self.live[hole] is not None:
                continue
            last = self.n - 1
            if last <= hole:
                break
            self._move(last, hole)
            while self.n and self.live[self.n - 1] is None:
                self.n -= 1

    def _move(self, src: int, dst: int) -> None:
        self.runner.move(src, dst)
        perm = torch.arange(self.slots, device=self.hist.device)
        perm[dst], perm[src] = src, dst
        for name in ("hist", "feed", "occupied", "generated", "max_new", "eos", "logits"):
            setattr(self, name, getattr(self, name)[perm])
        self.chains.reorder(perm)
        self.lp.move(src, dst)
        self.rng = self.rng.select(perm)
        self.live[dst], self.live[src] = self.live[src], None
        self._recount()

