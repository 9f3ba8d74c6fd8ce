"""Allowed tokens: decodekit's ``prefix_allowed_tokens_fn`` and ``allowed_token_ids`` against
transformers' PrefixConstrainedLogitsProcessor (its only way to allow a set of tokens).

GPT-2-sized logits (V = 50257), a history of 64 tokens, batch 1, 8 and 64. The function allows
1000 ids that depend on the row's last token (a list, as users write it); ``allowed_token_ids``
is a fixed list of 1000 ids, which transformers expresses as a constant function. Before timing,
both sides run on the same inputs and must keep the same tokens with the same values.

    python benchmarks/bench_allowed.py [--batches 1 8 64] [--repeats 15]
"""

from __future__ import annotations

import torch
from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

import common
from decodekit.processors import AllowedTokenIds, PrefixAllowedTokens

WIDTH = 1000  # ids allowed per row


def by_last_token(batch_id: int, ids: torch.Tensor) -> list[int]:
    start = int(ids[-1]) % (common.VOCAB - WIDTH)
    return list(range(start, start + WIDTH))


FIXED = list(range(0, 2 * WIDTH, 2))


def fixed(batch_id: int, ids: torch.Tensor) -> list[int]:
    return FIXED


def check_equal(dk: torch.Tensor, hf: torch.Tensor) -> str:
    if not torch.equal(dk, hf):
        raise SystemExit("the two sides differ: not equivalent")
    return f"{int(torch.isfinite(dk).sum(-1).min())} tokens kept per row, identical values"


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], repeats=15, warmup=3)
    p.add_argument("--calls", type=int, default=10, help="consecutive calls per timed sample")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--history", type=int, default=64)
    args = p.parse_args()
    common.setup(args)

    cases = {
        "prefix_allowed_tokens_fn": (PrefixAllowedTokens(by_last_token), PrefixConstrainedLogitsProcessor(by_last_token, 1)),
        "allowed_token_ids": (AllowedTokenIds(FIXED), PrefixConstrainedLogitsProcessor(fixed, 1)),
    }
    rows, checks = [], []
    for name, (dk_proc, hf_proc) in cases.items():
        for batch in args.batches:
            g = torch.Generator().manual_seed(batch)
            ids = torch.randint(0, common.VOCAB, (batch, args.history), generator=g)
            logits = torch.randn(batch, common.VOCAB, generator=g) * 3.0
            with torch.inference_mode():
                checks.append(f"{name} batch {batch}: {check_equal(dk_proc(ids, logits), hf_proc(ids, logits.clone()))}")
                times = common.round_robin(
                    {"decodekit": lambda: dk_proc(ids, logits), "transformers": lambda: hf_proc(ids, logits)},
                    repeats=args.repeats, warmup=args.warmup, calls=args.calls,
                )  # fmt: skip
            dk, hf = times["decodekit"], times["transformers"]
            rows.append([
                f"`{name}`", batch, f"{dk.median * 1e3:.3f}", f"{hf.median * 1e3:.3f}", f"**{hf.median / dk.median:.2f}x**",
                f"{hf.best / dk.best:.2f}x", dk.spread(), hf.spread(),
            ])  # fmt: skip

    body = common.table(
        ["setting", "batch", "decodekit ms/call", "transformers ms/call", "speed-up (median wall)", "(fastest sample)",
         "decodekit range", "transformers range"],
        rows,
    )  # fmt: skip
    body += "\n\nEquality checked before timing: " + "; ".join(checks) + "."
    common.report(
        "Allowed tokens: prefix_allowed_tokens_fn and allowed_token_ids against PrefixConstrainedLogitsProcessor",
        args,
        body,
        setup_lines=[
            f"logits [B, {common.VOCAB}] float32 (randn x 3), input_ids [B, {args.history}]; {WIDTH} ids allowed per row; "
            f"a sample = {args.calls} consecutive calls, figures per call",
            "decodekit: `PrefixAllowedTokens(fn)` (the user's function once per row, one scatter) and "
            "`AllowedTokenIds(ids)` (no Python per row); transformers: `PrefixConstrainedLogitsProcessor(fn, 1)`, "
            "with a constant function for the fixed set",
        ],
    )


if __name__ == "__main__":
    main()
