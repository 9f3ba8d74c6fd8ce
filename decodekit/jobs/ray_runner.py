"""The same job on a Ray cluster (``job.runner=ray``, extra ``decodekit[ray]``).

``ray.data`` reads the input (``read_text`` for JSONL, each line parsed as the local runner
parses it; ``read_parquet``); ``map_batches`` runs :class:`JobDecoder`, a stateful class Ray
keeps in ``job.ray.actors`` actors: each loads the model once and decodes its batches on its
own :class:`~decodekit.engine.Engine`. An actor writes each batch's results as one part file
(tmp, fsync, rename; named by a hash of its row keys) and returns the part's manifest entry;
the driver commits it by appending that entry to the manifest, as the local runner does. So the
folder, the resume rules and the output rows are the local runner's: a part no manifest line
names (the driver died first, or Ray retried a batch) is removed on restart and its rows decoded
again, from their own seeds, to the same results. On a cluster of several machines, ``job.output``
must be a folder every node sees (a shared file system) at the same path.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, TextIO

from decodekit.engine import Engine, Request
from decodekit.errors import ConfigError
from decodekit.jobs.io import JobFolder, parse_line, scan_input, write_part
from decodekit.jobs.local import Decoding, JobProgress, ModelSpec, PartBuilder, open_job, prepare_rows
from decodekit.jobs.spec import JobConfig


class JobDecoder:
    """A Ray actor's work: the model loaded once, then one batch of input rows -> one part file."""

    def __init__(self, spec: ModelSpec, decoding: Decoding, slots: int, folder: str, fmt: str, threads: int,
                 finished: set[str], duplicates: dict[str, int]) -> None:  # fmt: skip
        import torch

        torch.set_num_threads(threads)
        self.model, self.tokenizer, self.name = spec.load()
        self.decoding, self.folder, self.fmt = decoding, folder, fmt
        self.finished, self.duplicates = finished, duplicates
        self.engine = Engine(self.model, self.tokenizer, max_slots=slots, settings=decoding.settings,
                             eos_token_id=decoding.eos_token_id)  # fmt: skip

    def __call__(self, batch: Any) -> dict[str, list[str]]:
        if "text" in batch.column_names and "id" not in batch.column_names:  # read_text: JSONL lines
            rows = [parse_line(line) for line in batch.column("text").to_pylist()]
        else:
            rows = batch.to_pylist()
        builder = PartBuilder(self.name)
        requests: list[Request] = []
        for key, row_id, _, item in prepare_rows(((None, row) for row in rows), self.finished, self.duplicates, self.decoding):
            if isinstance(item, str):
                builder.error(key, row_id, None, item)
            else:
                item.id = builder.start(key, row_id, None, item)
                requests.append(item)
        for out in self.engine.run(requests, ordered=False):
            builder.finish(out)
        error_keys = builder.error_keys
        records, keys, errors = builder.take()
        name = f"part-r{hashlib.sha256(' '.join(sorted(keys)).encode()).hexdigest()[:16]}.{self.fmt}"
        entry = {"part": write_part(self.folder, name, records, self.fmt), "keys": keys, "ids": [r["id"] for r in records],
                 "errors": errors, "error_keys": error_keys, "tokens": sum(len(r["tokens"]) for r in records)}  # fmt: skip
        return {"entry": [json.dumps(entry, ensure_ascii=False)]}


def _ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConfigError("job.runner=ray: Ray is not installed; pip install 'decodekit[ray]'") from None
    return ray


def commit_entry(folder: JobFolder, entry: dict[str, Any]) -> tuple[int, int]:
    """Commit an actor's part unless its rows are already committed (a retried batch); ``(rows, bad)``."""
    finished = folder.committed.keys
    errors = dict(zip(entry["error_keys"], entry["errors"]))
    results = [k for k in entry["keys"] if k not in errors]
    if not entry["keys"] or any(k in finished for k in results):
        if entry["part"] is not None and entry["part"] not in folder.committed.parts:
            (folder.path / entry["part"]).unlink(missing_ok=True)  # a retried batch's second copy
        return 0, 0
    fresh = [k for k in errors if k not in finished]  # an id on several rows: refused once
    keys = [*results, *fresh]
    folder.record(entry["part"], keys, entry["ids"], [errors[k] for k in fresh])
    return len(entry["keys"]), len(fresh)


def check_room(settings: Any, cpus: float) -> None:
    """Refuse an actor pool that leaves Ray Data's read tasks no CPU: the job would wait forever."""
    taken = settings.actors * settings.num_cpus
    if taken > cpus - 1:
        raise ConfigError(
            f"job.ray.actors={settings.actors} x job.ray.num_cpus={settings.num_cpus:g} takes {taken:g} of the cluster's "
            f"{cpus:g} CPUs; the input's read tasks need 1 free, so the job would never start: use fewer actors or "
            "a fraction of a CPU each (job.ray.num_cpus=0.5)"
        )


def run_ray(job: JobConfig, spec: ModelSpec, decoding: Decoding, *, stream: TextIO | None = None) -> JobFolder:
    """Run (or resume) ``job`` on Ray: the local runner's folder, made by ``job.ray.actors`` actors."""
    ray = _ray()
    folder = open_job(job, decoding, spec.label())
    assert job.input is not None and job.output is not None
    total, duplicates = scan_input(job.input)
    committed = folder.committed
    done = len(committed.keys) + sum(duplicates[k] - 1 for k in duplicates if k in committed.keys)
    progress = JobProgress(total, done, len(committed.errors), job.progress_every, stream)
    settings = job.ray
    started = not ray.is_initialized()
    if started:
        ray.init(address=settings.address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        check_room(settings, ray.cluster_resources().get("CPU", 0.0))
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-run INFO lines among the progress lines
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        path = str(Path(job.input).resolve())
        data = ray.data.read_parquet(path) if path.lower().endswith((".parquet", ".pq")) else ray.data.read_text(path)
        output = str(Path(job.output).resolve())
        decoded = data.map_batches(
            JobDecoder, batch_format="pyarrow", batch_size=settings.batch_size,
            compute=ray.data.ActorPoolStrategy(size=settings.actors),
            num_cpus=settings.num_cpus, num_gpus=settings.num_gpus,
            fn_constructor_kwargs={
                "spec": spec, "decoding": decoding, "slots": job.slots, "folder": output, "fmt": job.output_format,
                "threads": max(1, int(settings.num_cpus)), "finished": set(committed.keys), "duplicates": duplicates,
            },
        )  # fmt: skip
        for row in decoded.iter_rows():
            entry = json.loads(row["entry"])
            rows, bad = commit_entry(folder, entry)
            progress.add(rows, tokens=entry["tokens"], bad=bad)
            progress.report(force=job.progress_every == 0)
    finally:
        if started:
            ray.shutdown()
    progress.report(force=True)
    return folder
