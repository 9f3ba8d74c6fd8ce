"""Memory: peak resident memory of generating batch 64 x 1024 positions, decodekit against transformers.

Each contender runs in a fresh subprocess (so one's allocations cannot hide the other's): it
loads the model from a folder written once by the parent, notes its resident memory (RSS), runs
one greedy generation of ``--new-tokens`` tokens after a ``--prompt``-token prompt for ``--batch``
rows, and reports the peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``), absolute and above the
RSS after loading.

A full GPT-2 124M at batch 64 x 1024 is too slow for two CPU cores, so the default model is a
small GPT-2 (``n_layer=2, n_embd=256, n_head=4``, GPT-2's vocabulary of 50257 and 1024
positions); prompt 960 + 64 new tokens = 1024 positions. The shape is stated with the results.

    python benchmarks/bench_memory.py [--layers 2 --width 256 --heads 4] [--batch 64 --prompt 960 --new-tokens 64]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import common

CONTENDERS = ("decodekit", "transformers")


def rss_mib() -> float:
    """Current resident memory of this process, MiB (from /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args: object) -> None:
    """Run one contender and print one JSON line."""
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, common.VOCAB, (args.batch, args.prompt), generator=g)
    if args.child == "decodekit":
        import decodekit
        from decodekit.models import load_model

        model, _ = load_model(args.model_dir, device="cpu")

        def run() -> torch.Tensor:
            return decodekit.generate(model, ids, max_new_tokens=args.new_tokens).tokens
    else:
        import transformers
        from transformers import GPT2LMHeadModel

        transformers.utils.logging.set_verbosity_error()
        model = GPT2LMHeadModel.from_pretrained(args.model_dir).eval()

        def run() -> torch.Tensor:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
            return out[:, args.prompt :]

    loaded, peak_loading = rss_mib(), peak_mib()
    start = time.perf_counter()
    tokens = run()
    seconds = time.perf_counter() - start
    print(json.dumps({
        "rss_after_load": loaded, "peak_while_loading": peak_loading, "peak": peak_mib(), "seconds": seconds,
        "tokens": tokens[:, :8].tolist(),
    }))  # fmt: skip


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], repeats=1, warmup=0)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=960)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=CONTENDERS, help=argparse_hidden())
    p.add_argument("--model-dir", help=argparse_hidden())
    args = p.parse_args()
    if args.child:
        child(args)
        return
    common.setup(args)

    hf = common.random_gpt2(args.seed, n_layer=args.layers, n_embd=args.width, n_head=args.heads, n_positions=1024)
    results: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        del hf
        flags = ["--threads", str(args.threads), "--batch", str(args.batch), "--prompt", str(args.prompt),
                 "--new-tokens", str(args.new_tokens), "--seed", str(args.seed), "--model-dir", folder]  # fmt: skip
        for _ in range(args.repeats):
            for name in CONTENDERS:
                done = subprocess.run([sys.executable, __file__, "--child", name, *flags],
                                      capture_output=True, text=True, check=False)  # fmt: skip
                if done.returncode != 0:
                    raise SystemExit(f"{name} subprocess failed:\n{done.stderr[-2000:]}")
                results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))

    rows = []
    summary = {}
    for name in CONTENDERS:
        runs = results[name]
        peak = max(r["peak"] for r in runs)
        loaded = min(r["rss_after_load"] for r in runs)
        summary[name] = (peak, peak - loaded)
        rows.append([name, f"{loaded:.0f}", f"{max(r['peak_while_loading'] for r in runs):.0f}", f"{peak:.0f}",
                     f"**{peak - loaded:.0f}**", f"{min(r['seconds'] for r in runs):.1f}"])  # fmt: skip
    (dk_peak, dk_delta), (tf_peak, tf_delta) = summary["decodekit"], summary["transformers"]
    same = results["decodekit"][0]["tokens"] == results["transformers"][0]["tokens"]
    body = common.table(
        ["contender", "RSS after load (MiB)", "peak while loading (MiB)", "peak (MiB)", "peak - RSS after load (MiB)",
         "generate seconds"],
        rows,
    )  # fmt: skip
    body += (
        f"\n\ndecodekit / transformers: peak {dk_peak / tf_peak:.2f}x, peak above load {dk_delta / tf_delta:.2f}x. "
        f"First 8 greedy tokens of every row equal: {'yes' if same else 'NO'}."
    )
    common.report(
        f"Memory: batch {args.batch} x {args.prompt + args.new_tokens} positions",
        args,
        body,
        setup_lines=[
            f"model: GPT2LMHeadModel(GPT2Config(n_layer={args.layers}, n_embd={args.width}, n_head={args.heads}, "
            f"n_positions=1024)) seeded {args.seed}, float32, vocabulary {common.VOCAB} (not GPT-2 124M: see the script)",
            f"batch {args.batch}, prompt {args.prompt} random tokens, {args.new_tokens} new tokens, greedy; one fresh "
            f"subprocess per contender and run ({args.repeats} run(s) each; the largest peak is kept)",
            "peak = ru_maxrss of the subprocess (the whole process: Python, torch, model, activations, cache)",
        ],
    )


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
