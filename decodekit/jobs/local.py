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
from dataclasses import dataclass, field
from typing import Any, TextIO

from decodekit.engine import Engine, Request, RequestOutput
from decodekit.errors import ConfigError
from decodekit.jobs.io import JobFolder, count_rows, read_rows
from decodekit.jobs.spec import JobConfig, id_key, job_signature, row_seed


@dataclass
class ModelSpec:
    """What model and tokenizer a job decodes with: enough for any worker to load them itself."""

    source: str = "default"  # load_model's source: "default" or a checkpoint path
    device: str = "auto"
    dtype: str = "float32"
    backend: str = "auto"
    pack_weights: bool | None = None
    tokenizer: dict[str, Any] = field(default_factory=lambda: {"kind": "auto"})

    def load(self) -> tuple[Any, Any, str]:
        """``(model, tokenizer or None, the model's name for the output rows)``."""
        from decodekit.cli.run import make_tokenizer
        from decodekit.models import load_model

        model, extras = load_model(
            self.source, device=self.device, dtype=self.dtype, backend=self.backend, pack_weights=self.pack_weights
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


# ------------------------------------------------------------------------------ rows


ROW_KEYS = {"id", "prompt", "prompt_tokens", "settings", "seed", "max_new_tokens", "stop"}


def row_request(row: Any, number: int, decoding: Decoding) -> Request:
    """One input row as a request (``id`` = its row number); :class:`ConfigError` for a bad row."""
    if isinstance(row, ConfigError):
        raise row
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
    }


def error_record(row_id: Any, number: int, reason: str) -> dict[str, Any]:
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
        eta = time.strftime("%H:%M:%S", time.gmtime(left / rate)) if rate > 0 else ("00:00:00" if not left else "?")
        share = 100.0 * self.done / self.total if self.total else 100.0
        self.stream.write(
            f"decode job: {self.done}/{self.total} rows ({share:.1f}%), {self.bad} bad, "
            f"{self.tokens / elapsed:.0f} tok/s, {rate:.1f} rows/s, ETA {eta}\n"
        )
        self.stream.flush()


# ------------------------------------------------------------------------------ the job


def open_job(job: JobConfig, decoding: Decoding, model_name: str) -> JobFolder:
    """Check the job, claim (or resume) its output folder."""
    job.check()
    assert job.input is not None and job.output is not None
    extra = {"max_new_tokens": decoding.max_new_tokens, "stop": decoding.stop, "eos_token_id": decoding.eos_token_id,
             "format": job.output_format}  # fmt: skip
    signature = job_signature(model=model_name, settings=decoding.settings, seed=decoding.seed, input_path=job.input, extra=extra)
    return JobFolder.open(job.output, signature, job.output_format)


def pending_rows(path: str, finished: set[int], decoding: Decoding) -> Iterator[tuple[int, Any, Request | str]]:
    """``(row number, id, request or the reason it is bad)`` of every row not finished yet."""
    seen: dict[str, int] = {}
    for number, row in read_rows(path):
        row_id = _row_id(row)
        try:
            request = row_request(row, number, decoding)
            key = id_key(row_id)
            first = seen.setdefault(key, number)
            if first != number:
                raise ConfigError(f"id={row_id!r}: a duplicate of row {first + 1}; ids must be unique")
        except ConfigError as e:
            if number not in finished:
                yield number, row_id, str(e)
            continue
        if number not in finished:
            yield number, row_id, request


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
    decoding = decoding or Decoding()
    spec = ModelSpec(source=model) if isinstance(model, str) else model
    if job.runner == "ray":
        from decodekit.jobs.ray_runner import run_ray

        return run_ray(job, spec, decoding, stream=stream)
    net, tokenizer, name = loaded if loaded is not None else spec.load()
    folder = open_job(job, decoding, name)
    engine = Engine(net, tokenizer, max_slots=job.slots, settings=decoding.settings, eos_token_id=decoding.eos_token_id)
    engine.chains.check(Request(prompt_ids=[0], eos_token_id=decoding.eos_token_id))  # the job's own settings, once
    assert job.input is not None
    committed = folder.committed
    progress = JobProgress(count_rows(job.input), len(committed.rows), len(committed.errors), job.progress_every, stream)
    live: dict[int, tuple[Any, Request]] = {}
    records: list[dict[str, Any]] = []
    rows: list[int] = []
    errors: list[dict[str, Any]] = []

    def commit() -> None:
        if rows:
            folder.commit(records, rows, errors)
            progress.report(force=job.progress_every == 0)
            records.clear(), rows.clear(), errors.clear()

    def requests() -> Iterator[Request]:
        for number, row_id, item in pending_rows(job.input, folder.committed.rows, decoding):
            if isinstance(item, str):
                errors.append(error_record(row_id, number, item))
                rows.append(number)
                progress.add(1, bad=1)
                continue
            live[number] = (row_id, item)
            yield item

    for out in engine.run(requests(), ordered=False):
        row_id, request = live.pop(out.id)
        rows.append(out.id)
        if out.finish_reason == "error":
            errors.append(error_record(row_id, out.id, re.sub(r"^row 0: ", "", out.error or "refused")))
            progress.add(1, bad=1)
        else:
            records.append(result_record(out, row_id, request, name))
            progress.add(1, tokens=len(out.tokens))
        if len(rows) >= job.part_size:
            commit()
        progress.report()
    commit()
    progress.report(force=True)
    return folder
