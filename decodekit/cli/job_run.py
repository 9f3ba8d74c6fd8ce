"""`decode job.input=... job.output=...`: the command's model, tokenizer and settings, as a job.

The job decodes each input row as a request on the engine (:mod:`decodekit.jobs`): the command
line gives the model, tokenizer, settings (a strategy's presets included), ``max_new_tokens``,
``stop``, ``eos_token_id`` and the job seed; each row may override the settings, seed, length
and stop strings. Keys that make no sense for a job (a prompt, ``num_samples``, an
``output_file``, beam search, a processor order) are refused in one line.
"""

from __future__ import annotations

from decodekit.cli.config import CommandConfig
from decodekit.cli.decoder import use_threads
from decodekit.errors import ConfigError
from decodekit.jobs.local import Decoding, ModelSpec, run_job
from decodekit.jobs.spec import parse_job

# command keys a job cannot take, and their value when not given
_NOT_FOR_JOBS = {
    "prompt": None, "prompt_tokens": None, "prompt_file": None, "num_samples": 1, "output_file": None,
    "processor_order": None, "temperature_last": False, "show_probs": False, "interactive": False,
}  # fmt: skip


def is_job(config: CommandConfig) -> bool:
    return config.job.get("input") is not None or config.job.get("output") is not None


def job_decoding(config: CommandConfig) -> Decoding:
    """The settings every row starts from; one line for what a job cannot take."""
    from decodekit.cli.run import unescape

    for key in ("logprobs", "prompt_logprobs", "score"):
        if getattr(config, key) not in (None, False):
            raise ConfigError(f"{key}: a job takes job.logprobs and job.logprobs_mode; drop it or drop job.input")
    for key, default in _NOT_FOR_JOBS.items():
        if getattr(config, key) != default:
            raise ConfigError(f"{key}: not used by a job (rows give their own prompts); drop it or drop job.input")
    if config.sampler not in ("multinomial", "greedy"):
        raise ConfigError(
            f"sampler={config.sampler!r}: a job decodes on the request engine, which samples multinomial "
            "(temperature=0: greedy); beam search and plugin samplers are not supported in jobs"
        )
    settings = config.settings()
    if config.sampler == "greedy":
        settings["temperature"] = 0
    return Decoding(
        settings=settings, max_new_tokens=config.max_new_tokens, stop=[unescape(s) for s in config.stop],
        seed=config.seed if config.seed is not None else 0, eos_token_id=config.eos_token_id,
    )  # fmt: skip


def run_job_command(config: CommandConfig) -> None:
    """Run or resume the job ``config.job`` describes."""
    job = parse_job(config.job)
    job.check()
    if config.threads is not None and job.runner == "ray":
        raise ConfigError(f"threads={config.threads}: a Ray job's actors each decode on job.ray.num_cpus threads; "
                          "set job.ray.num_cpus instead")  # fmt: skip
    decoding = job_decoding(config)
    use_threads(config.threads)
    spec = config.model
    model = ModelSpec(
        source="default" if spec["name"] == "default" else spec["path"], device=config.device, dtype=config.dtype,
        backend=spec.get("backend", "auto"), pack_weights=spec.get("pack_weights"), weights=spec.get("weights", "float32"),
        kernels=spec.get("kernels", "auto"), kv_cache=spec.get("kv_cache", "auto"), tokenizer=dict(config.tokenizer),
    )  # fmt: skip
    run_job(job, model, decoding)
