"""Shared helpers for the benchmark scripts: timing, the machine description, models, results.

Timing: each contender is warmed up, then the contenders run in turn (round-robin) for every
repeat, so load from other processes hits all of them alike; the figure kept is the median of
the repeats, measured with ``time.perf_counter``. Every script compares decodekit and
transformers in one run, on one model and one machine, and appends a markdown section to
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
VOCAB = 50257  # GPT-2's vocabulary
# glibc returns large freed blocks to the system, so every fresh [B, V] tensor page-faults again;
# these keep them in the heap (32 MiB is the largest mmap threshold glibc accepts).
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


# ------------------------------------------------------------------------------ command line


def parser(description: str, *, repeats: int = 5, warmup: int = 1) -> argparse.ArgumentParser:
    """An argument parser with the options every script shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads for both sides (default 1: steadier on a shared machine)")
    p.add_argument("--repeats", type=int, default=repeats, help="timed runs per contender (median kept)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed runs per contender first")
    p.add_argument("--no-save", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--tuned-malloc", action="store_true",
                   help=f"re-run under glibc settings that keep freed memory mapped ({' '.join(f'{k}={v}' for k, v in TUNED_MALLOC.items())})")
    return p


def decoding_options(p: argparse.ArgumentParser, *, new_tokens: int = 32) -> None:
    """The options of scripts that time whole generations: modes, new tokens, prompt length, seed."""
    p.add_argument("--modes", nargs="+", default=["greedy", "top_p"], choices=["greedy", "top_p"])
    p.add_argument("--new-tokens", type=int, default=new_tokens)
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens per row (random ids)")
    p.add_argument("--seed", type=int, default=0)


def setup(args: argparse.Namespace) -> None:
    """Apply the shared options: malloc settings (by re-running), threads, quiet transformers."""
    if args.tuned_malloc and any(os.environ.get(k) != v for k, v in TUNED_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **TUNED_MALLOC})
    torch.set_num_threads(args.threads)
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is required by every script
        pass


# ------------------------------------------------------------------------------ timing


@dataclass
class Timings:
    """Per-run measurements of one contender: wall-clock seconds, CPU seconds, page faults."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        """Median wall-clock seconds per run: the headline figure."""
        return statistics.median(self.wall)

    @property
    def best(self) -> float:
        """Fastest wall-clock run: the least disturbed by other processes."""
        return min(self.wall)

    @property
    def cpu_median(self) -> float:
        """Median CPU seconds of this process per run: less sensitive to other processes."""
        return statistics.median(self.cpu)

    @property
    def faults_median(self) -> float:
        return statistics.median(self.faults)

    def spread(self, scale: float = 1e3, unit: str = "ms") -> str:
        """``min-max`` of the wall-clock runs, to show how noisy the figure was."""
        return f"{min(self.wall) * scale:.1f}-{max(self.wall) * scale:.1f} {unit}"


def measure(fn: Callable[[], Any], into: Timings, calls: int = 1) -> None:
    """Run ``fn`` ``calls`` times, recording per call: wall time (``perf_counter``), process CPU
    time and minor page faults."""
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu0 = time.process_time()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    into.wall.append((time.perf_counter() - start) / calls)
    into.cpu.append((time.process_time() - cpu0) / calls)
    into.faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) // calls)


def round_robin(
    contenders: dict[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int,
    warm: dict[str, Callable[[], Any]] | None = None,
    calls: int = 1,
) -> dict[str, Timings]:
    """Warm every contender up, then run them in turn ``repeats`` times, measuring each run.

    ``warm`` may give a cheaper warm-up per contender (a shorter generation, say); by default
    the warm-up runs are the timed call itself. ``calls`` > 1 times that many consecutive calls
    per sample (for calls of a millisecond, where one preemption would swamp a single call).
    """
    for name, fn in contenders.items():
        for _ in range(warmup):
            (warm or {}).get(name, fn)()
    times = {name: Timings() for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            measure(fn, times[name], calls)
    return times


# ------------------------------------------------------------------------------ machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def code_version() -> str:
    """The commit of the checkout, and whether decodekit's sources differ from it."""
    root = Path(__file__).resolve().parent.parent

    def git(*cmd: str) -> str:
        try:
            done = subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown (not a git checkout)"
    changed = git("status", "--porcelain", "--", "decodekit")
    return f"{commit}" + (" with uncommitted changes under decodekit/" if changed else "")


def machine(args: argparse.Namespace) -> dict[str, str]:
    """What the figures were measured on."""
    import transformers

    load = os.getloadavg()
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": f"{cpu_model()}, {os.cpu_count()} logical cores",
        "threads": f"torch.set_num_threads({args.threads}) for both sides",
        "load average at end": f"{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} (1, 5, 15 min)",
        "decodekit": code_version(),
        "software": f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
        "malloc": (" ".join(f"{k}={os.environ[k]}" for k in sorted(os.environ) if k.startswith("MALLOC_"))
                   or "glibc defaults"),
        "timing": (f"median of {args.repeats} samples after {args.warmup} warm-up run(s), contenders interleaved; "
                   "wall clock (perf_counter) is the headline; the fastest sample and process CPU time "
                   "(process_time) are checks against load"),
    }


# ------------------------------------------------------------------------------ models


def gpt2_config(**overrides: Any) -> Any:
    """A Hugging Face ``GPT2Config`` (GPT-2 124M unless overridden)."""
    from transformers import GPT2Config

    return GPT2Config(**overrides)


def transformers_generate(hf: Any, ids: torch.Tensor, n: int, mode: str, outputs: dict[str, torch.Tensor], key: str
                          ) -> Callable[[], None]:  # fmt: skip
    """transformers' ``generate``: exactly ``n`` new tokens (EOS off), greedy or top-p 0.9 (``mode``);
    each call keeps its new tokens in ``outputs[key]``."""
    sampling = {"do_sample": True, "top_p": 0.9, "top_k": 0} if mode == "top_p" else {"do_sample": False}
    attention = torch.ones_like(ids)

    def run() -> None:
        out = hf.generate(ids, attention_mask=attention, max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                          eos_token_id=None, **sampling)  # fmt: skip
        outputs[key] = out[:, ids.shape[1] :]

    return run


def decodekit_generate(model: Any, ids: torch.Tensor, n: int, mode: str, outputs: dict[str, torch.Tensor], key: str
                       ) -> Callable[[], None]:  # fmt: skip
    """``decodekit.generate`` with what :func:`transformers_generate` does: ``Greedy()``, or
    ``TopP(0.9)`` and ``Multinomial()``; each call keeps its new tokens in ``outputs[key]``."""
    import decodekit
    from decodekit.processors import TopP
    from decodekit.samplers import Greedy, Multinomial

    processors, sampler = (TopP(0.9), Multinomial()) if mode == "top_p" else (None, Greedy())

    def run() -> None:
        outputs[key] = decodekit.generate(model, ids, processors=processors, sampler=sampler, max_new_tokens=n, seed=0).tokens

    return run


def random_gpt2(seed: int = 0, **overrides: Any) -> Any:
    """A ``GPT2LMHeadModel`` with seeded random weights, built in memory (nothing downloaded).

    EOS is switched off in its generation config, so transformers generates exactly
    ``max_new_tokens`` tokens, as decodekit does without ``eos_token_id``.
    """
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(gpt2_config(**overrides)).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def native_copy(hf_model: Any) -> Any:
    """decodekit's native GPT holding the same weights: ``save_pretrained`` then ``load_model``."""
    from decodekit.models import load_model

    with tempfile.TemporaryDirectory() as folder:
        hf_model.save_pretrained(folder)
        model, extras = load_model(folder, device="cpu")
    assert extras.format == "hf-gpt2", extras.format
    return model.eval()


# ------------------------------------------------------------------------------ results


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(title: str, args: argparse.Namespace, body: str, *, setup_lines: list[str] = ()) -> None:
    """Print a section and append it to RESULTS.md (unless ``--no-save``)."""
    info = machine(args)
    lines = [f"## {title}", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += [f"- {line}" for line in setup_lines]
    lines += ["", body.rstrip(), "", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_save:
        with RESULTS.open("a") as f:
            f.write(text)
        print(f"(appended to {RESULTS})")


def met(value: float, target: float, *, at_least: bool) -> str:
    ok = value >= target if at_least else value <= target
    return "yes" if ok else "no"
