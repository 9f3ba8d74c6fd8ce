"""What a decoding job is: its settings (``job.*`` on the command line), its signature, row seeds.

A job turns a file of prompts into a folder of results (see :mod:`decodekit.jobs.local` and
docs/jobs.md). :class:`JobConfig` is the ``job`` group of the ``decode`` command, validated by
pydantic with ``extra="forbid"`` so a misspelt key is one line. :func:`job_signature` names what
makes two runs the same job (model, settings, seed, input): an output folder written by one job
is refused to another instead of mixing their results. :func:`row_seed` gives each row a seed
from the job seed and the row's id alone, so a row's result does not depend on batch
composition, worker count, order or retries.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from decodekit.errors import ConfigError
from decodekit.random import SEED_LIMIT
from decodekit.validation import validate


class RayConfig(BaseModel):
    """``job.ray.*``: where and how wide the Ray runner runs."""

    model_config = ConfigDict(extra="forbid")

    address: Optional[str] = Field(None, description="cluster address (null: start or join a local one; 'auto': the running one)")
    actors: int = Field(1, ge=1, description="decoding actors, each with its own copy of the model")
    batch_size: int = Field(64, ge=1, description="rows per map_batches call (one committed part each)")
    num_cpus: float = Field(1.0, gt=0, description="logical CPUs per actor (fractions allowed)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor (fractions allowed)")


class JobConfig(BaseModel):
    """``job.*``: a file of prompts to a folder of results, resumable (docs/jobs.md)."""

    model_config = ConfigDict(extra="forbid")

    input: Optional[str] = Field(None, description="JSONL or Parquet rows: id, prompt | prompt_tokens, optional settings, seed")
    output: Optional[str] = Field(None, description="the results folder (parts, manifest, errors); rerun to resume")
    runner: Literal["local", "ray"] = Field("local", description="local | ray (extra decodekit[ray])")
    format: Optional[Literal["jsonl", "parquet"]] = Field(None, description="output parts; null = the input's format")
    part_size: int = Field(256, ge=1, description="rows per committed part")
    slots: int = Field(16, ge=1, description="requests the engine decodes together")
    logprobs: Optional[int] = Field(None, ge=0, le=20, description="per-token logprobs in each output row, n alternatives each")
    logprobs_mode: Literal["raw", "processed"] = Field("raw", description="raw | processed (after the row's processors)")
    progress_every: float = Field(10.0, ge=0, description="seconds between progress lines on stderr (0: every part)")
    ray: RayConfig = Field(default_factory=RayConfig, description="the Ray runner's settings")

    def check(self) -> None:
        """Refuse, in one line, a job that cannot run: no input or output, a bad input name."""
        if self.input is None or self.output is None:
            missing = "job.input" if self.input is None else "job.output"
            raise ConfigError(f"{missing}: is required for a job (job.input=FILE job.output=FOLDER)")
        input_format(self.input)
        if not Path(self.input).is_file():
            raise ConfigError(f"job.input={self.input!r}: no such file")
        if Path(self.output).exists() and not Path(self.output).is_dir():
            raise ConfigError(f"job.output={self.output!r}: exists and is not a folder")

    @property
    def output_format(self) -> str:
        assert self.input is not None
        return self.format or input_format(self.input)


def parse_job(values: dict[str, Any]) -> JobConfig:
    """The ``job`` group of the command line as a :class:`JobConfig`; one line naming a bad key."""
    values = dict(values)
    ray = values.pop("ray", None) or {}
    if not isinstance(ray, dict):
        raise ConfigError(f"job.ray={ray!r} is not allowed: must be a group of keys (job.ray.actors=2, ...)")
    job = validate(JobConfig, "job.", **values)
    job.ray = validate(RayConfig, "job.ray.", **ray)
    return job


def input_format(path: str) -> str:
    """``jsonl`` or ``parquet`` from the input file's name; one line for anything else."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise ConfigError(f"job.input={path!r}: expected a .jsonl or .parquet file")


def job_signature(*, model: str, settings: dict[str, Any], seed: int, input_path: str, extra: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same job; stored in the output folder's ``job.json``."""
    path = Path(input_path).resolve()
    return {
        "model": model,
        "settings": dict(sorted(settings.items())),
        "seed": seed,
        "input": str(path),
        "input_bytes": path.stat().st_size,
        **extra,
    }


def id_key(row_id: Any) -> str:
    """A row id as the text the manifest and seeds use (``1`` and ``"1"`` differ)."""
    return json.dumps(row_id, ensure_ascii=False)


def row_key(row: Any) -> str:
    """What the manifest names a row by: its id, or (no usable id) a hash of the row itself."""
    row_id = row.get("id") if isinstance(row, dict) else None
    if isinstance(row_id, (str, int)) and not isinstance(row_id, bool):
        return id_key(row_id)
    text = row if isinstance(row, str) else json.dumps(row, sort_keys=True, default=str, ensure_ascii=False)
    return "row:" + hashlib.sha256(text.encode()).hexdigest()[:24]


def row_seed(job_seed: int, row_id: Any) -> int:
    """``hash(job seed, id) mod 2**32``: the same on every run, machine and worker."""
    digest = hashlib.sha256(f"{job_seed}:{id_key(row_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % SEED_LIMIT
