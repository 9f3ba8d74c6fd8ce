"""The job on one machine: input rows -> engine requests -> committed parts, resumable.

:func:`run_job` reads the input lazily, skips the rows the manifest says are finished, turns
each other row into a :class:`~decodekit.engine.Request` (its ``settings`` over the job's, its
``seed`` or :func:`~decodekit.jobs.spec.row_seed` of the job seed and its id), decodes them on
one :class:`~decodekit.engine.Engine` (continuous batching, results as each ends) and commits
every ``part_size`` finished rows as one part (:class:`~decodekit.jobs.io.JobFolder`). A bad row
(no id, a duplicate id, no prompt, a bad setting) is recorded with its id and reason in the
errors file and the job goes on. Progress (rows done of total, tokens/s, ETA) goes to stderr.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from decodekit.engine import Engine, Request, RequestOutput
from decodekit.errors import ConfigError
from decodekit.jobs.io import JobFolder, Unparsed, read_rows, scan_input
from decodekit.jobs.spec import JobConfig, job_signature, row_key, row_seed
from decodekit.logprobs import logprob_fields


@dataclass
class ModelSpec:
    """What model and tokenizer a job decodes with: enough for any worker to load them itself."""

    source: str = "default"  # load_model's source: "default" or a checkpoint path
    device: str = "auto"
    dtype: str = "float32"
    backend: str = "auto"
    pack_weights: bool | None = None
    weights: str = "float32"  # float32 | bf16 | int8 | w8a8 (decodekit.models.weights)
    kernels: str = "auto"  # auto | native | library (decodekit.kernels)
    kv_cache: str = "auto"  # auto | bf16 (decodekit.models.cache)
    tokenizer: dict[str, Any] = field(default_factory=lambda: {"kind": "auto"})

    def label(self) -> str:
        """The model as a job's signature names it: ``default`` or the checkpoint's absolute path,
        with ``[weights=bf16]`` / ``[weights=int8]`` after it for a reduced weight format and
        ``[kv_cache=bf16]`` for a bfloat16 cache (so a job is not resumed in another format)."""
        name = self.source if self.source == "default" else str(Path(self.source).resolve())
        if self.weights != "float32":
            name += f" [weights={self.weights}]"
        return name if self.kv_cache == "auto" else f"{name} [kv_cache={self.kv_cache}]"

    def load(self) -> tuple[Any, Any, str]:
        """``(model, tokenizer or None, the model's name for the output rows)``."""
        from decodekit.cli.decoder import make_tokenizer
        from decodekit.models import load_model

        model, extras = load_model(
            self.source, device=self.device, dtype=self.dtype, backend=self.backend, pack_weights=self.pack_weights,
            weights=self.weights, kernels=self.kernels, kv_cache=self.kv_cache,
        )  # fmt: skip
        tokenizer = make_tokenizer(self.tokenizer, extras, needed=False)
        return model, tokenizer, str(extras.source)


@dataclass
class Decoding:
    """How every row is decoded unless it says otherwise."""

    settings: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    eos_token_id: int | None = None
    logprobs: int | None = None  # per-token logprobs in each output row (job.logprobs), n alternatives
    logprobs_mode: str = "raw"


# ------------------------------------------------------------------------------ rows


ROW_KEYS = {"id", "prompt", "prompt_tokens", "settings", "seed", "max_new_tokens", "stop"}


def row_request(row: Any, number: int, decoding: Decoding) -> Request:
    """One input row as a request (``id`` = its row number); :class:`ConfigError` for a bad row."""
    if isinstance(row, Unparsed):
        raise ConfigError(row.reason)
    if not isinstance(row, Mapping):
        raise ConfigError(f"expected an object with id and prompt, got {type(row).__name__}")
    unknown = sorted(k for k in row if k not in ROW_KEYS and row[k] is not None)
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a row key; a row has {', '.join(sorted(ROW_KEYS))}")
    row_id = row.get("id")
    if row_id is None or isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        raise ConfigError(f"id={row_id!r} is not allowed: each row needs an id, a string or an integer")
    prompt, tokens = row.get("prompt"), row.get("prompt_tokens")
    if (prompt is None) == (tokens is None):
        raise ConfigError("prompt / prompt_tokens: give exactly one of them")
    settings = row.get("settings") or {}
    if not isinstance(settings, Mapping):
        raise ConfigError(f"settings: expected an object of setting names to values, got {type(settings).__name__}")
    settings = {k: v for k, v in settings.items() if v is not None}  # null: not set (Parquet fills absent keys)
    seed = row.get("seed")
    max_new = row.get("max_new_tokens")
    stop = row.get("stop")
    return Request(
        prompt=prompt,
        prompt_ids=list(tokens) if isinstance(tokens, (list, tuple)) else tokens,
        settings={**decoding.settings, **settings},
        seed=row_seed(decoding.seed, row_id) if seed is None else seed,
        max_new_tokens=decoding.max_new_tokens if max_new is None else max_new,
        stop=decoding.stop if stop is None else stop,
        eos_token_id=decoding.eos_token_id,
        id=number,
        logprobs=decoding.logprobs,
        logprobs_mode=decoding.logprobs_mode,
    )


def result_record(out: RequestOutput, row_id: Any, request: Request, model_name: str) -> dict[str, Any]:
    """The output row of one finished request."""
    return {
        "id": row_id,
        "text": out.text,
        "tokens": out.tokens,
        "finish_reason": out.finish_reason,
        "stop_string": out.stop_string,
        "seed": out.seed,
        "cropped": out.cropped,
        "settings": dict(request.settings),
        "model": model_name,
        **logprob_fields(out.logprobs),
    }


def error_record(row_id: Any, number: int | None, reason: str) -> dict[str, Any]:
    return {"id": row_id, "row": number, "reason": reason}


def _row_id(row: Any) -> Any:
    return row.get("id") if isinstance(row, Mapping) else None


# ------------------------------------------------------------------------------ progress


class JobProgress:
    """``decode job: 1200/10000 rows (12.0%), 3 bad, 850 tok/s, 9.1 rows/s, ETA 0:16:05`` on stderr."""

    def __init__(self, total: int, done: int, bad: int, every: float, stream: TextIO | None = None) -> None:
        self.total, self.done, self.bad, self.every = total, done, bad, every
        self.stream = stream or sys.stderr
        self.start_done = done
        self.shown = -1  # rows done at the last line
        self.tokens = 0
        self.start = self.last = time.perf_counter()

    def add(self, rows: int, tokens: int = 0, bad: int = 0) -> None:
        self.done += rows
        self.tokens += tokens
        self.bad += bad

    def report(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.shown == self.done or (not force and (self.every == 0 or now - self.last < self.every)):
            return
        self.last, self.shown = now, self.done
        elapsed = max(now - self.start, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        left = max(self.total - self.done, 0)
        eta = _clock(left / rate) if rate > 0 else ("0:00:00" if not left else "?")
        share = 100.0 * self.done / self.total if self.total else 100.0
        self.stream.write(
            f"decode job: {self.done}/{self.total} rows ({share:.1f}%), {self.bad} bad, "
            f"{self.tokens / elapsed:.0f} tok/s, {rate:.1f} rows/s, ETA {eta}\n"
        )
        self.stream.flush()


def _clock(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


# ------------------------------------------------------------------------------ the job


def open_job(job: JobConfig, decoding: Decoding, model_name: str) -> JobFolder:
    """Check the job, claim (or resume) its output folder."""
    job.check()
    assert job.input is not None and job.output is not None
    extra = {"max_new_tokens": decoding.max_new_tokens, "stop": decoding.stop, "eos_token_id": decoding.eos_token_id,
             "format": job.output_format}  # fmt: skip
    if decoding.logprobs is not None:  # only then: folders of jobs without logprobs keep their signature
        extra["logprobs"] = [decoding.logprobs, decoding.logprobs_mode]
    signature = job_signature(model=model_name, settings=decoding.settings, seed=decoding.seed, input_path=job.input, extra=extra)
    return JobFolder.open(job.output, signature, job.output_format)


def prepare_rows(
    rows: Iterator[tuple[int | None, Any]], finished: set[str], duplicates: dict[str, int], decoding: Decoding
) -> Iterator[tuple[str, Any, int | None, Request | str]]:
    """``(key, id, row number, request or why it is bad)`` of each row not finished yet.

    An id on several rows is refused on each of them (once per id: the same key), whichever
    runner or worker meets them first.
    """
    for number, row in rows:
        key = row_key(row)
        if key in finished:
            continue
        row_id = _row_id(row)
        try:
            if key in duplicates:
                raise ConfigError(f"id={row_id!r}: appears on {duplicates[key]} rows; ids must be unique")
            yield key, row_id, number, row_request(row, number or 0, decoding)
        except ConfigError as e:
            yield key, row_id, number, str(e)


def run_job(
    job: JobConfig,
    model: ModelSpec | str = "default",
    decoding: Decoding | None = None,
    *,
    loaded: tuple[Any, Any, str] | None = None,
    stream: TextIO | None = None,
) -> JobFolder:
    """Run (or resume) ``job``: every input row decoded once into ``job.output`` (docs/jobs.md).

    ``model`` names what to load (a :class:`ModelSpec`, or a ``load_model`` source);
    ``loaded=(model, tokenizer, name)`` passes a model already in memory instead (local runner only).
    """
    decoding = replace(decoding or Decoding(), logprobs=job.logprobs, logprobs_mode=job.logprobs_mode)
    spec = ModelSpec(source=model) if isinstance(model, str) else model
    if job.runner == "ray":
        from decodekit.jobs.ray_runner import run_ray

        return run_ray(job, spec, decoding, stream=stream)
    net, tokenizer, name = loaded if loaded is not None else spec.load()
    folder = open_job(job, decoding, spec.label() if loaded is None else name)
    engine = Engine(net, tokenizer, max_slots=job.slots, settings=decoding.settings, eos_token_id=decoding.eos_token_id)
    engine.chains.check(Request(prompt_ids=[0], eos_token_id=decoding.eos_token_id))  # the job's own settings, once
    assert job.input is not None
    total, duplicates = scan_input(job.input)
    committed = folder.committed
    done = len(committed.keys) + sum(duplicates[k] - 1 for k in duplicates if k in committed.keys)
    progress = JobProgress(total, done, len(committed.errors), job.progress_every, stream)
    batch = PartBuilder(name)

    def requests() -> Iterator[Request]:
        rows = prepare_rows(read_rows(job.input), committed.keys, duplicates, decoding)
        for key, row_id, number, item in rows:
            if isinstance(item, str):
                new = batch.error(key, row_id, number, item)
                progress.add(1, bad=new)
                continue
            item.id = batch.start(key, row_id, number, item)
            yield item

    for out in engine.run(requests(), ordered=False):
        progress.add(1, tokens=len(out.tokens), bad=not batch.finish(out))
        if len(batch.keys) >= job.part_size:
            folder.commit(*batch.take())
            progress.report(force=job.progress_every == 0)
        progress.report()
    if batch.keys:
        folder.commit(*batch.take())
    progress.report(force=True)
    return folder


class PartBuilder:
    """The finished rows of the part being made: results, keys, bad rows (once per key)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.live: dict[int, tuple[str, Any, int | None, Request]] = {}
        self.records: list[dict[str, Any]] = []
        self.keys: list[str] = []
        self.errors: list[dict[str, Any]] = []
        self.error_keys: list[str] = []  # the key of each of self.errors
        self.pending: set[str] = set()  # keys finished here, not committed yet
        self.next_id = 0

    def start(self, key: str, row_id: Any, number: int | None, request: Request) -> int:
        """Note a request going to the engine; its engine id."""
        self.next_id += 1
        self.live[self.next_id] = (key, row_id, number, request)
        return self.next_id

    def error(self, key: str, row_id: Any, number: int | None, reason: str) -> int:
        """A bad row; 1, or 0 for a key already finished (the other rows of a duplicate id)."""
        if key in self.pending:
            return 0
        self.pending.add(key)
        self.keys.append(key)
        self.error_keys.append(key)
        self.errors.append(error_record(row_id, number, re.sub(r"^row 0: ", "", reason)))
        return 1

    def finish(self, out: RequestOutput) -> bool:
        """A request ended: its result (True) or its refusal (False)."""
        key, row_id, number, request = self.live.pop(out.id)
        if out.finish_reason == "error":
            self.error(key, row_id, number, out.error or "refused")
            return False
        self.pending.add(key)
        self.keys.append(key)
        self.records.append(result_record(out, row_id, request, self.model_name))
        return True

    def take(self) -> tuple[list[dict[str, Any]], list[str], list[dict[str, Any]]]:
        taken = (self.records, self.keys, self.errors)
        self.records, self.keys, self.errors, self.error_keys = [], [], [], []
        return taken
