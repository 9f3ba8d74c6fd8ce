"""Decoding jobs: the local runner and the Ray runner against a plain loop, and the cost of a resume.

Workload (issue 13): ``--rows`` prompts (default 2,000; the issue's size is ``--rows 10000``)
``"Prompt {i}: once upon a time"`` on the embedded model (``load_model("default")``, CPU),
``max_new_tokens`` ``--max-new-tokens`` (default 32), EOS allowed, temperature 0.8 and top-p
0.95, each row's seed from the job seed and its id. Timed, one after another:

- plain loop: ``generate_text`` over batches of ``--slots`` prompts in input order (the same
  settings; no files), the baseline;
- local runner: ``run_job`` (``job.slots=--slots``, parts of 256 rows, JSONL) into a fresh folder,
  the model already loaded (as for the plain loop);
- Ray runner: ``run_job`` with ``runner="ray"`` on a local cluster (``ray.init(num_cpus=4)``,
  ``--actors`` actors of 1 CPU each, 256-row batches), cluster start-up not counted, actor start-up
  (each loads the model) counted;
- resume: the ``decode`` command in a subprocess, killed with SIGKILL once half the rows are
  committed, then run again to the end; its overhead is (time to the kill + time of the rerun)
  against the same command uninterrupted, both timed from process start.
- the cost of Ray on one machine: ``ray.init`` of the local cluster; a job's fixed cost (a Ray job
  of one batch, ``--slots`` rows, 1 actor, against the local runner on the same rows: the
  actor's start, its model load, Ray Data's planning; the cluster's first job also starts its
  worker processes, so it is measured apart from a later one); the cost per batch (the first
  ``--cost-rows`` rows, 1 actor of 1 CPU against the local runner at the same thread count, in
  batches of 64 and 256 rows: what is left after the fixed cost, over the number of batches; it
  includes the engine draining at each batch's end, where slots fall idle).

    python benchmarks/bench_jobs.py [--rows 2000] [--max-new-tokens 32] [--slots 16] [--actors 2] [--cost-rows 512]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from decodekit.jobs import Decoding, JobConfig, read_results, run_job
from decodekit.models import load_model
from decodekit.processors import Temperature, TopP
from decodekit.samplers import Multinomial
from decodekit.text import generate_text
from decodekit.tokenization import load_tokenizer

SETTINGS = {"temperature": 0.8, "top_p": 0.95}


def write_input(folder: Path, rows: int) -> Path:
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": f"Prompt {i}: once upon a time"}) + "\n" for i in range(rows)))
    return path


def plain_loop(loaded: tuple, prompts: list[str], slots: int, max_new: int) -> tuple[float, int]:
    """(seconds, new tokens) of generate_text over batches of ``slots`` prompts."""
    model, tokenizer, _ = loaded
    tokens = 0
    start = time.perf_counter()
    for i in range(0, len(prompts), slots):
        results = generate_text(model, tokenizer, prompts[i : i + slots], processors=[Temperature(0.8), TopP(0.95)],
                                sampler=Multinomial(), max_new_tokens=max_new, seed=i)  # fmt: skip
        tokens += sum(len(r.tokens) for r in results)
    seconds = time.perf_counter() - start
    print(f"  plain loop: {seconds:.1f} s", file=sys.stderr, flush=True)
    return seconds, tokens


def timed_job(job: JobConfig, decoding: Decoding, loaded: tuple | None = None) -> tuple[float, int]:
    """(seconds, new tokens) of one job (the model already loaded for the local runner)."""
    start = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        run_job(job, "default", decoding, loaded=loaded, stream=quiet)
    seconds = time.perf_counter() - start
    print(f"  {job.runner} job into {Path(str(job.output)).name}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return seconds, sum(len(r["tokens"]) for r in read_results(job.output))


def command(src: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "decodekit.cli.main", f"job.input={src}", f"job.output={out}", "job.progress_every=0",
            f"job.slots={args.slots}", "job.part_size=256", f"max_new_tokens={args.max_new_tokens}", "seed=0",
            "temperature=0.8", "top_p=0.95", "device=cpu"]  # fmt: skip


def resume_overhead(src: Path, folder: Path, args: argparse.Namespace) -> tuple[float, float, float, int]:
    """(uninterrupted s, s to the kill, rerun s, rows committed at the kill)."""
    environ = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "DECODEKIT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    start = time.perf_counter()
    subprocess.run(command(src, folder / "whole", args), env=environ, check=True, stderr=subprocess.DEVNULL)
    whole = time.perf_counter() - start
    start = time.perf_counter()
    proc = subprocess.Popen(command(src, folder / "cut", args), env=environ, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        done = int(line.split()[2].split("/")[0]) if line.startswith("decode job:") else 0
        if done >= args.rows // 2:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    to_kill = time.perf_counter() - start
    committed = len(read_results(folder / "cut"))
    start = time.perf_counter()
    subprocess.run(command(src, folder / "cut", args), env=environ, check=True, stderr=subprocess.DEVNULL)
    rerun = time.perf_counter() - start
    a = {r["id"]: r for r in read_results(folder / "whole")}
    assert a == {r["id"]: r for r in read_results(folder / "cut")} and len(a) == args.rows
    return whole, to_kill, rerun, committed


def ray_cost(src: Path, folder: Path, loaded: tuple, decoding: Decoding, args: argparse.Namespace) -> tuple[float, list[list[str]]]:
    """(a Ray job's fixed cost in s, rows of the per-batch table) on the running local cluster."""

    def pair(rows: int, batch: int, tag: str) -> tuple[float, float]:
        part = folder / f"cost-{tag}.jsonl"
        with open(src) as f:
            part.write_text("".join(line for _, line in zip(range(rows), f)))
        local = JobConfig(input=str(part), output=str(folder / f"cost-{tag}-local"), slots=args.slots, progress_every=3600)
        remote = JobConfig(input=str(part), output=str(folder / f"cost-{tag}-ray"), runner="ray", slots=args.slots,
                           progress_every=3600, ray={"actors": 1, "batch_size": batch, "num_cpus": 1})  # fmt: skip
        return timed_job(remote, decoding)[0], timed_job(local, decoding, loaded)[0]

    table = []
    for tag, label in (("first", "one batch, the cluster's first job"), ("one", "one batch, a later job")):
        ray_s, local_s = pair(args.slots, args.slots, tag)
        fixed = ray_s - local_s
        table.append([label, str(args.slots), f"{ray_s:.2f}", f"{local_s:.2f}", f"{fixed:.2f} (fixed cost)", "-"])
    for batch in (64, 256):
        ray_s, local_s = pair(args.cost_rows, batch, str(batch))
        batches = -(-args.cost_rows // batch)
        per = (ray_s - local_s - fixed) / batches
        table.append([f"batches of {batch}", str(args.cost_rows), f"{ray_s:.2f}", f"{local_s:.2f}", f"{ray_s - local_s:.2f}", f"{1000 * per:.0f} ms ({batches} batches)"])
    return fixed, table


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], repeats=1, warmup=0)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--cost-rows", type=int, default=512)
    args = p.parse_args()
    common.setup(args)
    import ray

    folder = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    src = write_input(folder, args.rows)
    prompts = [f"Prompt {i}: once upon a time" for i in range(args.rows)]
    decoding = Decoding(settings=SETTINGS, max_new_tokens=args.max_new_tokens, seed=0)
    model, extras = load_model("default", device="cpu")
    loaded = (model, load_tokenizer("auto", extras), str(extras.source))
    times = {"plain loop (generate_text, batches of slots)": plain_loop(loaded, prompts, args.slots, args.max_new_tokens)}
    local = JobConfig(input=str(src), output=str(folder / "local"), slots=args.slots, progress_every=3600)
    times["local runner"] = timed_job(local, decoding, loaded)
    start = time.perf_counter()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    cluster_start = time.perf_counter() - start
    try:
        fixed, cost_table = ray_cost(src, folder, loaded, decoding, args)
        cluster = JobConfig(input=str(src), output=str(folder / "ray"), runner="ray", slots=args.slots, progress_every=3600,
                            ray={"actors": args.actors, "batch_size": 256, "num_cpus": 1})  # fmt: skip
        times[f"Ray runner ({args.actors} actors, local cluster)"] = timed_job(cluster, decoding)
    finally:
        ray.shutdown()
    same = {r["id"]: r for r in read_results(folder / "local")} == {r["id"]: r for r in read_results(folder / "ray")}
    base = times["plain loop (generate_text, batches of slots)"][0]
    rows = [[name, f"{t:.1f}", f"{args.rows / t:.1f}", f"{n / t:.0f}", f"**{base / t:.2f}x**"] for name, (t, n) in times.items()]
    tokens = times["local runner"][1]
    body = common.table(["contender", "seconds", "rows/s", "tokens/s", "vs plain loop"], rows)
    whole, to_kill, rerun, committed = resume_overhead(src, folder, args)
    overhead = (to_kill + rerun) / whole - 1
    body += (
        f"\n\n- new tokens (local runner): {tokens}; rows/s counts every input row; the Ray runner's rows equal the local runner's: {'yes' if same else 'NO'}\n"
        f"- resume (the `decode` command, killed with SIGKILL at 50%): uninterrupted {whole:.1f} s; "
        f"{to_kill:.1f} s to the kill ({committed} rows committed) + {rerun:.1f} s rerun = "
        f"{to_kill + rerun:.1f} s: overhead {100 * overhead:.1f}% (start-up, the input read again, the rows in flight "
        "decoded again); the output equals the uninterrupted run's\n"
    )
    body += (
        f"\n### The cost of Ray on one machine\n\n- cluster start (`ray.init`, local, 4 logical CPUs): {cluster_start:.1f} s\n"
        f"- a job's fixed cost on a running cluster (actor start, model load, planning): {fixed:.1f} s\n\n"
        + common.table(["Ray job (1 actor, 1 CPU)", "rows", "Ray s", "local s", "Ray - local s", "per batch"], cost_table)
        + "\n"
    )
    common.report(
        f"Decoding jobs: {args.rows} prompts, embedded model, {args.max_new_tokens} new tokens",
        args,
        body,
        setup_lines=[f"settings {SETTINGS}, {args.slots} slots, parts of 256 rows, JSONL in and out",
                     "each contender run once (rows/s over the whole input), one after another"],  # fmt: skip
    )


if __name__ == "__main__":
    main()
