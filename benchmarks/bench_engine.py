"""Requests, not batches: the request engine against static batches, decodekit's and transformers'.

Workload (issue 12): GPT-2 124M with seeded random weights; ``--requests`` requests (default 200)
with prompt lengths 8-200 and ``max_new_tokens`` 8-256 drawn log-uniformly, random prompt ids,
EOS (50256) allowed, mixed settings (greedy, top-p 0.9, temperature 0.8 with top-k 50, min-p
0.05, repetition penalty 1.1 with top-p 0.95); ``--slots`` slots (default 16). Three contenders,
one after another on the same weights, each timed over the whole workload:

- engine: ``decodekit.engine.Engine(model, max_slots=16).generate(requests)``, each request
  with its own settings, seed and length;
- decodekit static: the same requests in arrival order, in batches of 16 through
  ``decodekit.generate`` (left-padded prompts, one chain with one value per row built by
  ``build_row_chain``, a per-row length criterion): a batch runs until its longest row ends;
- transformers static: the same batches through transformers' ``generate`` (left-padded,
  ``do_sample=True, top_p=0.9``: it has no per-row settings), ``max_new_tokens`` the batch's
  longest.

Tokens/s counts the tokens the requests asked for (each request's own output length, as the
engine made it), so every contender is credited the same useful work. Then:

- the per-row chain: a batch of 8 rows with 8 different values of repetition penalty,
  temperature, top-k and top-p against 8 rows with one value, chain and sampler alone on
  ``[8, 50257]`` logits (target <= 1.15x); and 8 rows each with its own set of processors,
  which costs the union of those processors;
- memory: peak resident memory of a subprocess that loads the model and runs the engine over a
  queue of 100 and of 2,000 requests (the input pulled lazily), against the model and cache sizes.

    python benchmarks/bench_engine.py [--requests 200] [--slots 16] [--threads 1]
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
import time
from typing import Any

import torch

import common

SETTINGS = [
    {"temperature": 0},
    {"top_p": 0.9},
    {"temperature": 0.8, "top_k": 50},
    {"min_p": 0.05},
    {"repetition_penalty": 1.1, "top_p": 0.95},
]
EOS = 50256


def workload(n: int, seed: int) -> list[Any]:
    from decodekit.engine import Request

    rng = random.Random(seed)

    def log_uniform(lo: int, hi: int) -> int:
        return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))

    return [
        Request(prompt_ids=[rng.randrange(EOS) for _ in range(log_uniform(8, 200))], max_new_tokens=log_uniform(8, 256),
                settings=rng.choice(SETTINGS), seed=i, eos_token_id=EOS, id=i)  # fmt: skip
        for i in range(n)
    ]


def run_engine(model: Any, requests: list[Any], slots: int) -> list[Any]:
    from decodekit.engine import Engine

    longest = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
    return Engine(model, max_slots=slots, cache_tokens=slots * longest).generate(requests)


def left_pad(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r.prompt_ids) for r in batch)
    ids = torch.full((len(batch), width), EOS, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, r in enumerate(batch):
        ids[row, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
        mask[row, width - len(r.prompt_ids) :] = True
    return ids, mask


def run_static(model: Any, requests: list[Any], slots: int) -> None:
    import decodekit
    from decodekit.registry import build_row_chain
    from decodekit.samplers import Multinomial

    for start in range(0, len(requests), slots):
        batch = requests[start : start + slots]
        ids, mask = left_pad(batch)
        limits = torch.tensor([r.max_new_tokens for r in batch])
        chain = build_row_chain([dict(r.settings) for r in batch])
        decodekit.generate(
            model, ids, attention_mask=mask, processors=chain, sampler=Multinomial(), eos_token_id=EOS,
            max_new_tokens=int(limits.max()), seed=[r.seed for r in batch],
            stopping=[lambda seq, n, limits=limits: n >= limits],
        )  # fmt: skip


def run_transformers(hf: Any, requests: list[Any], slots: int) -> None:
    for start in range(0, len(requests), slots):
        batch = requests[start : start + slots]
        ids, mask = left_pad(batch)
        hf.generate(ids, attention_mask=mask.long(), max_new_tokens=max(r.max_new_tokens for r in batch),
                    do_sample=True, top_p=0.9, top_k=0, eos_token_id=EOS, pad_token_id=EOS)  # fmt: skip


def chain_section(repeats: int) -> tuple[str, float]:
    """Chain and sampler alone on ``[8, 50257]`` logits: 8 rows with 8 different values of the same
    settings against 8 rows with one value (the cost of per-row values), and 8 rows each with its
    own set of processors (the batch then runs the union of their processors)."""
    from decodekit.random import RowRandom
    from decodekit.registry import build_row_chain
    from decodekit.samplers import Multinomial
    from decodekit.samplers.rejection import fuse

    one = [{"repetition_penalty": 1.1, "temperature": 0.8, "top_k": 50, "top_p": 0.9}] * 8
    values = [{"repetition_penalty": 1.0 + 0.05 * i, "temperature": 0.5 + 0.1 * i, "top_k": 10 + 10 * i,
               "top_p": 0.6 + 0.05 * i} for i in range(8)]  # fmt: skip
    union = [{"temperature": 0.7, "top_k": 40}, {"top_p": 0.9}, {"temperature": 1.2, "top_p": 0.95},
             {"min_p": 0.05}, {"repetition_penalty": 1.2, "top_k": 50}, {"temperature": 0},
             {"typical_p": 0.9}, {"presence_penalty": 0.5, "top_p": 0.8}]  # fmt: skip
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, common.VOCAB, generator=g) * 3
    history = torch.randint(0, common.VOCAB, (8, 64), generator=g)
    contenders = {}
    for name, settings in (("1 value for all rows", one), ("8 values, same settings", values),
                           ("8 rows, 8 different sets of settings", union)):  # fmt: skip
        chain, sampler = fuse(build_row_chain(settings), Multinomial())
        chain.begin(history[:, :16])
        rng = RowRandom(torch.arange(8))

        def run(chain: Any = chain, sampler: Any = sampler, rng: Any = rng) -> None:
            sampler(history, chain(history, logits), rng)

        contenders[name] = run
    times = common.round_robin(contenders, repeats=repeats, warmup=3, calls=20)
    base = times["1 value for all rows"].median
    rows = [[name, f"{t.median * 1e3:.3f}", f"{t.median / base:.3f}x"] for name, t in times.items()]
    table = common.table(["chain + sampler, 8 rows x 50257", "ms per call (median)", "vs 1 value"], rows)
    return table, times["8 values, same settings"].median / base


MEMORY = r"""
import gc, resource, sys, torch
sys.path.insert(0, "benchmarks")
import common
from decodekit.engine import Engine, Request
torch.set_num_threads(1)
native = common.native_copy(common.random_gpt2(0))
gc.collect()
params = sum(p.numel() * p.element_size() for p in native.parameters())
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
engine = Engine(native, max_slots=16, cache_tokens=16 * 64, max_queue=32)
loaded = rss()
cache = engine.runner.cache.k.numel() * engine.runner.cache.k.element_size() * 2
n = int(sys.argv[1])
outs = sum(1 for _ in engine.run(Request(prompt_ids=[i % 50000 + 1] * 16, max_new_tokens=8, seed=i) for i in range(n)))
print(n, outs, params, cache, loaded, rss())
"""


def memory_section() -> str:
    rows = []
    for n in (100, 2000):
        done = subprocess.run([sys.executable, "-c", MEMORY, str(n)], capture_output=True, text=True, check=True)
        req, outs, params, cache, loaded, peak = (int(x) for x in done.stdout.split())
        rows.append([req, outs, f"{params / 2**20:.0f}", f"{cache / 2**20:.1f}", f"{loaded / 2**20:.0f}",
                     f"{peak / 2**20:.0f}", f"{(peak - loaded) / 2**20:.1f}"])  # fmt: skip
    return common.table(["requests queued", "results", "model MiB", "cache MiB", "peak RSS after load MiB",
                         "peak RSS at end MiB", "growth while running MiB"], rows)  # fmt: skip


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], repeats=1, warmup=1)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    common.setup(args)

    hf = common.random_gpt2(args.seed)
    native = common.native_copy(hf)
    requests = workload(args.requests, args.seed)
    warm = workload(args.slots, args.seed + 1)
    for r in warm:
        r.max_new_tokens = 4
    run_engine(native, warm, args.slots), run_static(native, warm, args.slots), run_transformers(hf, warm, args.slots)

    results: list[Any] = []

    def noisy(name: str, fn: Any) -> Any:  # each contender's time as soon as it is known
        def run() -> None:
            start = time.perf_counter()
            fn()
            print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)

        return run

    timed = {
        "engine": noisy("engine", lambda: results.append(run_engine(native, requests, args.slots))),
        "decodekit static batches": noisy("decodekit static batches", lambda: run_static(native, requests, args.slots)),
        "transformers static batches": noisy("transformers static batches", lambda: run_transformers(hf, requests, args.slots)),
    }
    times = common.round_robin(timed, repeats=args.repeats, warmup=0)
    useful = sum(len(o.tokens) for o in results[-1])
    assert all(o.error is None for o in results[-1])
    eos_ended = sum(o.finish_reason == "eos" for o in results[-1])
    engine_s = times["engine"].median
    rows = [[name, f"{t.median:.1f}", f"{useful / t.median:.1f}", f"**{t.median / engine_s:.2f}x**"]
            for name, t in times.items()]  # fmt: skip
    body = common.table(["contender", "seconds (whole workload)", "useful tokens/s", "engine speed-up"], rows)
    vs_static = times["decodekit static batches"].median / engine_s
    vs_tf = times["transformers static batches"].median / engine_s
    chain_table, chain_ratio = chain_section(max(args.repeats, 15))
    body += (
        f"\n\n- useful tokens: {useful} ({eos_ended} requests ended at EOS); prompt tokens: "
        f"{sum(len(r.prompt_ids) for r in requests)}\n"
        f"- engine / decodekit static: {vs_static:.2f}x (target >= 2: {common.met(vs_static, 2, at_least=True)}); "
        f"engine / transformers static: {vs_tf:.2f}x (target >= 3: {common.met(vs_tf, 3, at_least=True)})\n"
        f"- per-row chain, 8 values / 1 value of the same settings: {chain_ratio:.3f}x (target <= 1.15: "
        f"{common.met(chain_ratio, 1.15, at_least=False)})\n\n" + chain_table + "\n\n" + memory_section()
    )
    common.report(
        f"Request engine: {args.requests} requests, {args.slots} slots, GPT-2 124M (random weights)",
        args,
        body,
        setup_lines=[
            "prompt lengths 8-200 and max_new_tokens 8-256 log-uniform, random ids, EOS 50256 allowed, settings drawn "
            f"from {SETTINGS}",
            "each contender timed over the whole workload (prefill included), one after another",
        ],
    )


if __name__ == "__main__":
    main()
