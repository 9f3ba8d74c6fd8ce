"""Running one `decode` job: load the model and tokenizer, build the chain, print and save samples.

Output: samples go to stdout. The first sample of each batch streams as it is made; the others of
the batch (``num_samples`` > 1, several prompts) are printed when the batch ends, each under a
``--- prompt i/P, sample j/N (seed s) ---`` line. With ``output_file``, one JSON object per sample
is written as soon as its batch ends (see :mod:`decodekit.cli.output` for how the file is kept safe).
"""

from __future__ import annotations

import json
import math
import re
import secrets
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from decodekit.cli.config import CommandConfig
from decodekit.cli.decoder import Decoder
from decodekit.cli.engine_run import engine_for, run_on_engine
from decodekit.cli.output import JsonlWriter, Output, Progress, logprob_settings
from decodekit.cli.score_run import run_score
from decodekit.cli.strategies import sampler_note
from decodekit.cli.summary import RunSummary
from decodekit.errors import ConfigError
from decodekit.logprobs import logprob_fields
from decodekit.loop import generate
from decodekit.processors.base import LogitsProcessor, ProcessorChain
from decodekit.random import SEED_LIMIT
from decodekit.registry import Registry
from decodekit.scoring import sequence_logprobs
from decodekit.text import TextResult, generate_text
from decodekit.tokenization import ByteTokenizer, Tokenizer, continuation_text

# ------------------------------------------------------------------------------ prompts


def unescape(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` as the characters they name (for stop strings from a shell)."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def read_prompts(config: CommandConfig) -> list[str]:
    """The prompts: ``prompt_file`` (one per line, or JSONL; ``-``: lines from stdin), else ``prompt``, else one empty prompt."""
    if config.prompt_file is None:
        return [config.prompt if config.prompt is not None else ""]
    path = Path(config.prompt_file)
    try:
        lines = (sys.stdin.read() if config.prompt_file == "-" else path.read_text(encoding="utf-8")).splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"prompt_file={config.prompt_file!r}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"prompt_file={config.prompt_file!r}, line {number}: not JSON ({e.msg})") from None
            item = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(item, str):
                raise ConfigError(f"prompt_file={config.prompt_file!r}, line {number}: expected a string or {{\"prompt\": string}}")
            line = item
        prompts.append(line)
    if not prompts:
        raise ConfigError(f"prompt_file={config.prompt_file!r}: holds no prompts")
    return prompts


# ------------------------------------------------------------------------------ output


class Tap(LogitsProcessor):
    """Records the logits it is given and passes them on (``show_probs`` puts one at each end)."""

    name = "tap"

    def __init__(self) -> None:
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        self.last = logits
        return logits


class ProbsPrinter:
    """``show_probs``: for row 0, the top candidates of each step before and after the chain."""

    def __init__(self, out: Output, tokenizer: Tokenizer | None, eos: int | None, k: int) -> None:
        self.out, self.tokenizer, self.eos, self.k = out, tokenizer, eos, k
        self.before, self.after = Tap(), Tap()
        self.done = False

    def wrap(self, chain: ProcessorChain) -> ProcessorChain:
        self.done = False
        return ProcessorChain([self.before, *chain.processors, self.after])

    def step(self, step: int, tokens: torch.Tensor, finished: torch.Tensor) -> None:
        if self.done or self.before.last is None or self.after.last is None:
            return
        chosen = int(tokens[0])
        raw = self.before.last[0].float().softmax(-1)
        processed = self.after.last[0].float().softmax(-1)
        left = int((processed > 0).sum())
        logprob = f"logprob={math.log(float(processed[chosen])):.3f}, model logprob={math.log(float(raw[chosen])):.3f}"
        self.out.line(f"step {step + 1}: {self.token(chosen)} (p={float(processed[chosen]):.3f} after the chain, {logprob})")
        self.out.line(f"  model: {self.top(raw)}")
        self.out.line(f"  chain: {self.top(processed)}  ({left} of {processed.numel()} tokens left)")
        self.done = bool(finished[0])

    def top(self, probs: torch.Tensor) -> str:
        values, ids = probs.topk(min(self.k, probs.numel()))
        return "  ".join(f"{self.token(i)} {p:.3f}" for p, i in zip(values.tolist(), ids.tolist()) if p > 0)

    def token(self, token_id: int) -> str:
        if token_id == self.eos:
            return "<eos>"
        if self.tokenizer is None:
            return f"#{token_id}"
        text = self.tokenizer.decode([token_id])
        if not text or "\ufffd" in text:
            return f"<{token_id:#04x}>" if isinstance(self.tokenizer, ByteTokenizer) and token_id < 256 else f"#{token_id}"
        return repr(text)


def _callbacks(*callbacks: Callable[..., None] | None) -> Callable[..., None] | None:
    live = [c for c in callbacks if c is not None]
    if not live:
        return None

    def call(*args: Any) -> None:
        for c in live:
            c(*args)

    return call


def label(prompt_index: int, prompts: int, sample_index: int, samples: int, seed: int, sequence: str = "") -> str:
    parts = []
    if prompts > 1:
        parts.append(f"prompt {prompt_index + 1}/{prompts}")
    if samples > 1:
        parts.append(f"sample {sample_index + 1}/{samples}")
    if sequence:
        parts.append(sequence)
    return f"--- {', '.join(parts)} (seed {seed}) ---"


def settings_record(config: CommandConfig, decoder: Decoder) -> dict[str, Any]:
    """The settings a JSONL record repeats: enough to make the sample again."""
    record: dict[str, Any] = {"strategy": config.strategy, "sampler": config.sampler, **config.settings()}
    if config.processor_order:
        record["processor_order"] = config.processor_order
    if config.temperature_last:
        record["temperature_last"] = True
    record["max_new_tokens"] = config.max_new_tokens
    if config.stop:
        record["stop"] = [unescape(s) for s in config.stop]
    record["model"] = decoder.extras.source
    return record


# ------------------------------------------------------------------------------ a run


def run(config: CommandConfig, registry: Registry, *, heading: str | None = None) -> None:
    """Decode every prompt of ``config``: print the samples, write ``output_file``."""
    writer = JsonlWriter.for_config(config)  # an output file that would be lost is refused before the model loads
    decoder = Decoder.load(config, registry)
    note = sampler_note(config, registry)
    if note:
        warnings.warn(note, stacklevel=2)
    out = Output(quiet=config.quiet)
    if heading:
        print(f"=== {heading} ===", flush=True)
    seed = config.seed if config.seed is not None else secrets.randbelow(2**31)
    prompts = read_prompts(config) if config.prompt_tokens is None else []
    summary = RunSummary.for_run(config, decoder.model.device)
    try:
        if config.score:
            run_score(decoder, prompts, out, writer)
        elif config.prompt_tokens is not None:
            run_tokens(decoder, out, writer, seed, summary)
        else:
            run_texts(decoder, prompts, out, writer, seed, summary)
        summary.close()
    finally:
        if writer is not None:
            writer.close()


def run_texts(decoder: Decoder, prompts: list[str], out: Output, writer: JsonlWriter | None, seed: int,
              summary: RunSummary) -> None:  # fmt: skip
    """Text prompts, ``batch_size`` at a time, ``num_samples`` rows each."""
    config = decoder.config
    assert decoder.tokenizer is not None
    n, per = config.num_samples, config.batch_size
    batches = [prompts[i : i + per] for i in range(0, len(prompts), per)]
    labelled = len(prompts) > 1 or n > 1
    stream = not (decoder.drives_loop or config.show_probs)
    probs = ProbsPrinter(out, decoder.tokenizer, decoder.eos_token_id, config.show_probs_k) if config.show_probs else None
    progress = Progress.for_run(config, len(batches))
    record = settings_record(config, decoder)
    stop = [unescape(s) for s in config.stop]
    engine = engine_for(decoder, prompts)
    if engine is not None:
        progress = Progress.for_run(config, len(prompts) * n, unit="sample")
        try:
            return run_on_engine(engine, decoder, prompts, out, writer, seed, progress, record, stop, summary)
        finally:
            progress.close()
    row_seed = seed
    if probs:
        out.line(f"chain: {decoder.chain!r}")
    try:
        for b, batch in enumerate(batches):
            first = b * per
            if labelled and stream:
                out.line(label(first, len(prompts), 0, n, row_seed))
            if stream:
                out.write(batch[0])
            chain = probs.wrap(decoder.chain) if probs else decoder.chain
            results = generate_text(
                decoder.model, decoder.tokenizer, batch, processors=chain, sampler=decoder.sampler,
                max_new_tokens=config.max_new_tokens, stop=stop, num_samples=n, seed=row_seed,
                eos_token_id=decoder.eos_token_id, **logprob_settings(config),
                on_text=(lambda row, piece: out.write(piece) if row == 0 else None) if stream else None,
                on_token=_callbacks(progress.step, probs.step if probs else None, summary.token),
            )  # fmt: skip
            lengths = [len(decoder.tokenizer.encode(p)) for p in batch]
            for i, r in enumerate(results):
                summary.add(lengths[r.prompt_index], len(r.tokens))
                if stream and i == 0:
                    out.line()
                    continue
                ranked = r.score is not None and len(results) > len(batch) * n  # several sequences per row
                if labelled or ranked:
                    sequence = f"sequence {r.sequence_index + 1}, score {r.score:.4f}" if ranked else ""
                    out.line(label(first + r.prompt_index, len(prompts), r.sample_index, n, r.seed, sequence))
                out.line(r.prompt + r.text)
            if writer is not None:
                writer.write([text_record(r, first, record) for r in results])
            progress.batch_done(len(results))
            row_seed = (row_seed + len(batch) * n) % SEED_LIMIT
    finally:
        progress.close()


def text_record(r: TextResult, first: int, settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt": r.prompt,
        "continuation": r.text,
        "prompt_index": first + r.prompt_index,
        "sample_index": r.sample_index,
        "sequence_index": r.sequence_index,
        "score": r.score,
        "seed": r.seed,
        "num_tokens": len(r.tokens),
        "finish_reason": r.finish_reason,
        "stop_string": r.stop_string,
        "token_ids": r.tokens,
        "settings": settings,
        **logprob_fields(r.logprobs, r.prompt_logprobs),
    }


def run_tokens(decoder: Decoder, out: Output, writer: JsonlWriter | None, seed: int, summary: RunSummary) -> None:
    """A prompt given as token ids: the new ids stream; their text follows when there is a tokenizer."""
    config = decoder.config
    tokenizer = decoder.tokenizer
    prompt = list(config.prompt_tokens or [])
    if config.stop and tokenizer is None:
        raise ConfigError("stop: stop strings need a tokenizer; this model has none (set tokenizer=...)")
    if max(prompt) >= decoder.model.vocab_size:
        raise ConfigError(f"prompt_tokens: token id {max(prompt)} is outside the model's {decoder.model.vocab_size} tokens")
    n = config.num_samples
    stream = not (decoder.drives_loop or config.show_probs)
    probs = ProbsPrinter(out, tokenizer, decoder.eos_token_id, config.show_probs_k) if config.show_probs else None
    progress = Progress.for_run(config, 1)
    seeds = [(seed + i) % SEED_LIMIT for i in range(n)]
    if probs:
        out.line(f"chain: {decoder.chain!r}")
    if n > 1 and stream:
        out.line(label(0, 1, 0, n, seeds[0]))
    if stream:
        out.write(" ".join(map(str, prompt)) + " |")
    shown = {"done": False}

    def stream_ids(step: int, tokens: torch.Tensor, finished: torch.Tensor) -> None:
        if stream and not shown["done"]:
            out.write(f" {int(tokens[0])}")
            shown["done"] = bool(finished[0])

    chain = probs.wrap(decoder.chain) if probs else decoder.chain
    try:
        result = generate(
            decoder.model, torch.tensor([prompt] * n), processors=chain, sampler=decoder.sampler,
            max_new_tokens=config.max_new_tokens, eos_token_id=decoder.eos_token_id, seed=seeds,
            on_token=_callbacks(stream_ids, progress.step, probs.step if probs else None, summary.token),
            logprobs=config.logprobs, logprobs_mode=config.logprobs_mode,
        )  # fmt: skip
        progress.batch_done(n)
    finally:
        progress.close()
    record = settings_record(config, decoder)
    rows = result.rows()
    token_logprobs = result.token_logprobs() or [None] * len(rows)
    prompt_lps = sequence_logprobs(decoder.model, [prompt], top=config.prompt_logprobs) if config.prompt_logprobs is not None else [None]
    records = []
    for i, new in enumerate(rows):
        summary.add(len(prompt), len(new))
        content = [t for t in new if t != decoder.eos_token_id]
        text = continuation_text(tokenizer, prompt, content) if tokenizer is not None else None
        if not (stream and i == 0):
            if n > 1:
                out.line(label(0, 1, i, n, seeds[i]))
            out.write(" ".join(map(str, prompt)) + " |" + "".join(f" {t}" for t in new))
        out.line()
        if text is not None:
            out.line(f"text: {text}")
        records.append({
            "prompt": tokenizer.decode(prompt) if tokenizer is not None else None,
            "prompt_tokens": prompt,
            "continuation": text,
            "prompt_index": 0,
            "sample_index": i,
            "seed": seeds[i],
            "num_tokens": len(new),
            "finish_reason": result.finish_reasons[i],
            "token_ids": new,
            "settings": record,
            **logprob_fields(token_logprobs[i], prompt_lps[0]),
        })  # fmt: skip
    if writer is not None:
        writer.write(records)
