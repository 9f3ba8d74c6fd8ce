"""Decoding jobs: a file of prompts to a folder of results, resumable, on one machine or on Ray.

``run_job(JobConfig(input=..., output=...), "default", Decoding(settings={...}))`` or
``decode job.input=prompts.jsonl job.output=results/``; see docs/jobs.md.
"""

from decodekit.jobs.io import read_errors, read_results
from decodekit.jobs.local import Decoding, ModelSpec, run_job
from decodekit.jobs.spec import JobConfig, RayConfig, row_seed

__all__ = ["Decoding", "JobConfig", "ModelSpec", "RayConfig", "read_errors", "read_results", "row_seed", "run_job"]
