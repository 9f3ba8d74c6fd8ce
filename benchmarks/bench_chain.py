"""Processor chain alone: decodekit's chain against transformers' LogitsProcessorList.

The chain is repetition penalty 1.2, temperature 0.8, top-k 50, top-p 0.9, on GPT-2-sized logits
(V = 50257) with a history of 128 tokens, at batch 1, 8 and 64. Before timing, both chains run on
the same inputs and must keep the same tokens with the same log-probabilities. Target: decodekit
at least 5x faster at batch 8.

    python benchmarks/bench_chain.py [--batches 1 8 64] [--repeats 25]
"""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import common
from decodekit.processors import RepetitionPenalty, Temperature, TopK, TopP

TARGET = 5.0  # at batch 8


def inputs(batch: int, history: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """History ``[B, T]`` and logits ``[B, V]`` shaped like a language model's (scale 3, one clear peak per row)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, common.VOCAB, (batch, history), generator=g)
    logits = torch.randn(batch, common.VOCAB, generator=g) * 3.0
    return ids, logits


def check_equal(dk: torch.Tensor, hf: torch.Tensor) -> str:
    """Same kept tokens and the same log-softmax over them (atol 1e-5), else raise."""
    kept_dk, kept_hf = torch.isfinite(dk), torch.isfinite(hf)
    if not torch.equal(kept_dk, kept_hf):
        diff = (kept_dk != kept_hf).sum().item()
        raise SystemExit(f"kept tokens differ in {diff} positions: the chains are not equivalent")
    lp_dk, lp_hf = dk.log_softmax(-1)[kept_dk], hf.log_softmax(-1)[kept_hf]
    err = (lp_dk - lp_hf).abs().max().item()
    if err > 1e-5:
        raise SystemExit(f"log-softmax differs by {err:.2e} on kept tokens")
    per_row = kept_dk.sum(-1)
    return f"kept {int(per_row.min())}-{int(per_row.max())} tokens per row, max |dlogp| {err:.1e}"


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], repeats=15, warmup=5)
    p.add_argument("--calls", type=int, default=10, help="consecutive calls per timed sample")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--history", type=int, default=128, help="tokens in input_ids (the repetition penalty reads them)")
    args = p.parse_args()
    common.setup(args)

    dk_chain = RepetitionPenalty(1.2) | Temperature(0.8) | TopK(50) | TopP(0.9)
    hf_chain = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.8), TopKLogitsWarper(50), TopPLogitsWarper(0.9),
    ])  # fmt: skip

    rows, checks, ratio_at_8 = [], [], None
    for batch in args.batches:
        ids, logits = inputs(batch, args.history, seed=batch)
        with torch.inference_mode():
            checks.append(f"batch {batch}: {check_equal(dk_chain(ids, logits), hf_chain(ids, logits.clone()))}")
            times = common.round_robin(
                {"decodekit": lambda: dk_chain(ids, logits), "transformers": lambda: hf_chain(ids, logits)},
                repeats=args.repeats, warmup=args.warmup, calls=args.calls,
            )  # fmt: skip
        dk, hf = times["decodekit"], times["transformers"]
        ratio = hf.median / dk.median
        if batch == 8:
            ratio_at_8 = ratio
        rows.append([
            batch, f"{dk.median * 1e3:.3f}", f"{hf.median * 1e3:.3f}", f"**{ratio:.2f}x**",
            f"{hf.best / dk.best:.2f}x", f"{hf.cpu_median / dk.cpu_median:.2f}x",
            f"{dk.faults_median:.0f} / {hf.faults_median:.0f}",
            dk.spread(), hf.spread(),
        ])  # fmt: skip

    body = common.table(
        ["batch", "decodekit ms/call", "transformers ms/call", "speed-up (median wall)", "(fastest sample)", "(CPU time)",
         "page faults/call dk / tf", "decodekit range", "transformers range"],
        rows,
    )  # fmt: skip
    body += "\n\nEquality checked before timing (same kept tokens, same log-softmax): " + "; ".join(checks) + "."
    if ratio_at_8 is not None:
        body += (f"\n\nTarget: >= {TARGET:.0f}x at batch 8. Measured {ratio_at_8:.2f}x: "
                 f"{'met' if ratio_at_8 >= TARGET else 'NOT met'}.")  # fmt: skip
    common.report(
        "Processor chain: repetition_penalty 1.2 | temperature 0.8 | top_k 50 | top_p 0.9",
        args,
        body,
        setup_lines=[
            f"logits [B, {common.VOCAB}] float32 (randn x 3), input_ids [B, {args.history}]; a sample = {args.calls} "
            "consecutive calls of the whole chain, figures per call",
            "decodekit: `RepetitionPenalty(1.2) | Temperature(0.8) | TopK(50) | TopP(0.9)`; transformers: "
            "`LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.8), "
            "TopKLogitsWarper(50), TopPLogitsWarper(0.9)])`",
        ],
    )


if __name__ == "__main__":
    main()
