"""`decode` on the request engine: every prompt x sample a request, ``batch_size`` slots, results in order.

Used for text prompts whenever the chain and sampler can run in the engine (every built-in can;
beam search, ``show_probs``, a processor without per-row state, or a prompt plus
``max_new_tokens`` longer than the model's context take the batch path in
:mod:`decodekit.cli.run`). A freed slot takes the next request at once, so a short sample never
waits for a long one. Output is in submission order: each sample streams while it is the oldest
one still running (later samples' text is held until then), and its JSONL record is written the
moment it ends, so an interrupt keeps every sample already finished.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from decodekit.cli.output import logprob_settings
from decodekit.engine import Engine, Request, RequestOutput
from decodekit.engine.choose import engine_for_rows
from decodekit.errors import ConfigError
from decodekit.random import SEED_LIMIT
from decodekit.text import TextResult


class OrderedPrinter:
    """Prints samples in submission order, streaming the oldest one still running."""

    def __init__(self, out: Any, prompts: list[str], samples: int, seeds: list[int], labelled: bool) -> None:
        self.out, self.prompts, self.samples, self.seeds, self.labelled = out, prompts, samples, seeds, labelled
        self.head = 0  # the index printed now
        self.started = False  # whether the head's label and prompt are out
        self.held: dict[int, list[str]] = {}  # text of later samples, until they become the head

    def text(self, index: int, piece: str) -> None:
        if index != self.head:
            self.held.setdefault(index, []).append(piece)
            return
        self._start()
        self.out.write(piece)

    def done(self, index: int) -> None:
        """Sample ``index`` ended (called in submission order)."""
        assert index == self.head
        self._start()
        self.out.line()
        self.head, self.started = index + 1, False
        if self.head < len(self.seeds) and self.head in self.held:
            self._start()

    def _start(self) -> None:
        if self.started:
            return
        self.started = True
        i = self.head
        prompt, sample = divmod(i, self.samples)
        if self.labelled:
            from decodekit.cli.run import label

            self.out.line(label(prompt, len(self.prompts), sample, self.samples, self.seeds[i]))
        self.out.write(self.prompts[prompt])
        for piece in self.held.pop(i, []):
            self.out.write(piece)


def engine_for(decoder: Any, prompts: list[str]) -> Engine | None:
    """An engine for this run, or ``None`` where the batch path must run it."""
    config = decoder.config
    if decoder.drives_loop or config.show_probs:
        return None
    longest = max(len(decoder.tokenizer.encode(p)) or 1 for p in prompts)
    slots = max(1, min(config.batch_size * config.num_samples, len(prompts) * config.num_samples))
    return engine_for_rows(decoder.model, decoder.tokenizer, decoder.chain, decoder.sampler, longest=longest,
                           max_new_tokens=config.max_new_tokens, slots=slots, max_queue=2 * slots,
                           eos_token_id=decoder.eos_token_id)  # fmt: skip


def run_on_engine(engine: Engine, decoder: Any, prompts: list[str], out: Any, writer: Any, seed: int,
                  progress: Any, record: dict[str, Any], stop: list[str], summary: Any) -> None:  # fmt: skip
    """Decode every prompt x sample on ``engine``: print in order, write each record as it ends."""
    config = decoder.config
    n = config.num_samples
    total = len(prompts) * n
    seeds = [(seed + i) % SEED_LIMIT for i in range(total)]
    printer = OrderedPrinter(out, prompts, n, seeds, labelled=len(prompts) > 1 or n > 1)

    def on_text(index: int, piece: str) -> None:
        summary.token()
        printer.text(index, piece)

    engine.on_text = on_text

    def requests() -> Iterator[Request]:
        for i in range(total):  # pulled as the queue has room: a long prompt file is never all queued
            yield Request(prompt=prompts[i // n], seed=seeds[i], max_new_tokens=config.max_new_tokens, stop=stop,
                          **logprob_settings(config))  # fmt: skip

    for result in engine.run(requests()):
        if result.error is not None:
            raise ConfigError(result.error)
        summary.add(len(result.prompt_ids), len(result.tokens))
        printer.done(result.index)
        if writer is not None:
            from decodekit.cli.run import text_record

            writer.write([text_record(as_text_result(result, prompts, n), 0, record)])
        progress.batch_done(1)


def as_text_result(result: RequestOutput, prompts: list[str], samples: int) -> TextResult:
    prompt, sample = divmod(result.index, samples)
    return TextResult(
        prompt=prompts[prompt], text=result.text or "", tokens=result.tokens, finish_reason=result.finish_reason,
        stop_string=result.stop_string, seed=result.seed or 0, prompt_index=prompt, sample_index=sample,
        logprobs=result.logprobs, prompt_logprobs=result.prompt_logprobs,
    )  # fmt: skip
