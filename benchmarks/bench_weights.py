"""Weight formats: tokens/s of the native GPT with float32, bf16 and int8 weights against transformers.

GPT-2 124M with seeded random weights, built in memory from ``GPT2Config()`` (nothing is
downloaded). On the same weights, greedy ``generate`` of ``--new-tokens`` tokens per row:

- transformers float32 and bfloat16 (``model.to(torch.bfloat16)``): what a user would pick;
  transformers has no int8 CPU path without another library, so int8 is compared with both;
- decodekit ``load_model(..., weights="float32" | "bf16" | "int8")`` (``model.weights=`` on
  the command line): :mod:`decodekit.models.weights`.

For each thread count (``--threads-list``, default 1 and 2) and batch (1 and 8). Checks: greedy
tokens of decodekit float32 equal transformers float32's; for bf16 and int8, the share of tokens
equal to decodekit float32's. Also the physical bound at batch 1: bytes of weights read per token
(every matrix once; the embedding lookup reads a row) over the memory read bandwidth measured
here (``torch.sum`` over 1 GiB, the same threads), and the fraction each contender reaches.

    python benchmarks/bench_weights.py [--threads-list 1 2] [--batches 1 8] [--repeats 3]
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch

import common

FORMATS = ("float32", "bf16", "int8", "w8a8")


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second ``torch.sum`` reads from a ``gib`` GiB float32 tensor (the best of ``repeats``)."""
    x = torch.ones(int(gib * (1 << 30)) // 4)
    x.sum()
    best = min(_timed(x.sum) for _ in range(repeats))
    return x.numel() * 4 / best


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors a decoding step reads whole: every parameter and buffer once, except
    tables only looked up (embeddings not tied to the head: a step reads a row of those)."""
    used: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if not isinstance(module, torch.nn.Embedding):
            for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                used[id(t)] = t
    return sum(t.numel() * t.element_size() for t in used.values())


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--threads-list", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    common.setup(args)

    hf32 = common.random_gpt2(args.seed)
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    native = {}
    for weights in FORMATS:
        model = common.native_copy(hf32)
        native[weights] = model if weights == "float32" else _convert(model, weights)
    peers = {"transformers float32": hf32, "transformers bf16": hf16}
    n = args.new_tokens
    rows, checks, bounds = [], [], []
    for threads in args.threads_list:
        torch.set_num_threads(threads)
        bandwidth = read_bandwidth()
        for batch in args.batches:
            g = torch.Generator().manual_seed(args.seed + batch)
            ids = torch.randint(0, common.VOCAB, (batch, args.prompt), generator=g)
            outputs: dict[str, torch.Tensor] = {}
            timed = {name: common.transformers_generate(m, ids, n, "greedy", outputs, name) for name, m in peers.items()}
            timed |= {f"decodekit {w}": common.decodekit_generate(m, ids, n, "greedy", outputs, f"decodekit {w}")
                      for w, m in native.items()}  # fmt: skip
            warm = {name: _short(name, peers, native, ids) for name in timed}
            times = common.round_robin(timed, repeats=args.repeats, warmup=args.warmup, warm=warm)
            tok_s = {name: batch * n / t.median for name, t in times.items()}
            for w in FORMATS:
                name = f"decodekit {w}"
                rows.append([
                    threads, batch, w, f"{tok_s[name]:.1f}", f"{tok_s['transformers float32']:.1f}",
                    f"{tok_s['transformers bf16']:.1f}", f"**{tok_s[name] / tok_s['transformers float32']:.2f}x**",
                    f"{tok_s[name] / tok_s['transformers bf16']:.2f}x", f"{tok_s[name] / tok_s['decodekit float32']:.2f}x",
                    times[name].spread(1, "s"),
                ])  # fmt: skip
            same = torch.equal(outputs["transformers float32"], outputs["decodekit float32"])
            agree = {w: (outputs[f"decodekit {w}"] == outputs["decodekit float32"]).float().mean().item() for w in FORMATS[1:]}
            checks.append(
                f"{threads} thread(s), batch {batch}: greedy tokens decodekit float32 == transformers float32: "
                f"{'yes' if same else 'NO'}; tokens equal to decodekit float32's: "
                + ", ".join(f"{w} {a:.1%}" for w, a in agree.items())
            )
            if batch == 1:
                for name in timed:
                    model = peers.get(name) or native[name.split()[-1]]
                    nbytes = weight_bytes(model)
                    bound = bandwidth / nbytes
                    bounds.append([threads, name, f"{nbytes / 1e6:.0f}", f"{bandwidth / 1e9:.1f}", f"{bound:.1f}",
                                   f"{tok_s[name]:.1f}", f"{tok_s[name] / bound:.0%}"])  # fmt: skip
    body = common.table(
        ["threads", "batch", "decodekit weights", "decodekit tok/s", "transformers float32 tok/s",
         "transformers bf16 tok/s", "vs transformers float32", "vs transformers bf16", "vs decodekit float32",
         "decodekit range"],
        rows,
    )  # fmt: skip
    body += "\n\n" + "\n".join(f"- {c}" for c in checks)
    body += "\n\nBatch 1 against the memory bound (bytes of weights per token / measured read bandwidth):\n\n"
    body += common.table(["threads", "contender", "MB of weights per token", "read GB/s", "bound tok/s",
                          "measured tok/s", "fraction of the bound"], bounds)  # fmt: skip
    args.threads = ", then ".join(map(str, args.threads_list))  # for the machine lines: each row sets its own
    common.report(
        f"Weight formats: GPT-2 124M (random weights), {n} new tokens, greedy",
        args,
        body,
        setup_lines=[
            f"model: GPT2LMHeadModel(GPT2Config()) seeded {args.seed}; decodekit: the native GPT loaded from the same "
            "weights, then `convert_weights` (load_model(weights=...)); transformers bf16: `model.to(torch.bfloat16)`",
            f"prompt {args.prompt} random tokens per row; tokens/s = batch x {n} / median wall time of the whole "
            "`generate` call (prefill included); threads: torch.set_num_threads for both sides, per row of the table",
        ],
    )


def _convert(model: Any, weights: str) -> Any:
    from decodekit.models.weights import convert_weights

    return convert_weights(model, weights)


def _short(name: str, peers: dict[str, Any], native: dict[str, Any], ids: torch.Tensor) -> Callable[[], Any]:
    """A 4-token run of the same contender: the warm-up."""
    if name in peers:
        return common.transformers_generate(peers[name], ids, 4, "greedy", {}, name)
    return common.decodekit_generate(native[name.split()[-1]], ids, 4, "greedy", {}, name)


if __name__ == "__main__":
    main()
