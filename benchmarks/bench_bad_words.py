"""Bad words at scale: 2,000 banned sequences against none, in decodekit's decode loop and per call.

Two measurements, side by side in one run:

1. Decode step time: GPT-2 124M (seeded random weights, from ``GPT2Config()``), batch 8, greedy,
   ``decodekit.generate`` with ``BadWords(2000 sequences)`` against no processor. A step's time is
   the gap between consecutive ``on_token`` callbacks (prefill excluded); per run the median step
   is kept, then the median over runs. Target: at most 1.2x the step time without bans.
2. The processor alone, per call on ``[8, 50257]`` logits and a 64-token history: decodekit's
   ``BadWords`` against transformers' ``NoBadWordsLogitsProcessor`` with the same sequences, after
   checking that both ban the same tokens (the histories end with prefixes of banned sequences,
   so multi-token matches happen).

Sequences: 2,000 random token sequences, lengths uniform in 1..4, ids uniform over the vocabulary.

    python benchmarks/bench_bad_words.py [--count 2000] [--batch 8] [--new-tokens 24]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers.generation.logits_process import NoBadWordsLogitsProcessor

import common
import decodekit
from decodekit.processors import BadWords

TARGET = 1.2


def random_sequences(count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 5, (count,), generator=g).tolist()
    return [torch.randint(0, common.VOCAB, (n,), generator=g).tolist() for n in lengths]


def histories(sequences: list[list[int]], batch: int, length: int, seed: int) -> torch.Tensor:
    """``[B, length]`` random ids; each row ends with the prefix of a different multi-token sequence."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, common.VOCAB, (batch, length), generator=g)
    longer = [s for s in sequences if len(s) > 1]
    for row in range(batch):
        prefix = longer[row * 7 % len(longer)][:-1]
        ids[row, length - len(prefix) :] = torch.tensor(prefix)
    return ids


class StepClock:
    """An ``on_token`` callback that keeps a timestamp per step."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, step: int, tokens: torch.Tensor, finished: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())

    def median_step(self) -> float:
        return statistics.median(b - a for a, b in zip(self.stamps, self.stamps[1:]))


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], repeats=5, warmup=1)
    p.add_argument("--count", type=int, default=2000, help="number of banned sequences")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--call-repeats", type=int, default=15, help="timed samples of the processors alone")
    p.add_argument("--calls", type=int, default=10, help="consecutive calls per sample of the processors alone")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    common.setup(args)

    sequences = random_sequences(args.count, args.seed)
    lengths = [sum(len(s) == n for s in sequences) for n in range(1, 5)]
    dk_bans = BadWords(sequences)
    tf_bans = NoBadWordsLogitsProcessor(sequences)

    # 1. the processor alone: equal bans first, then time per call
    history = histories(sequences, args.batch, 64, args.seed)
    logits = torch.randn(args.batch, common.VOCAB, generator=torch.Generator().manual_seed(args.seed)) * 3.0
    banned_dk = dk_bans(history, logits) == float("-inf")
    banned_tf = tf_bans(history, logits.clone()) == float("-inf")
    if not torch.equal(banned_dk, banned_tf):
        raise SystemExit(f"the processors ban different tokens ({(banned_dk != banned_tf).sum().item()} differ)")
    per_row = banned_dk.sum(-1)
    with torch.inference_mode():
        calls = common.round_robin(
            {"decodekit": lambda: dk_bans(history, logits), "transformers": lambda: tf_bans(history, logits)},
            repeats=args.call_repeats, warmup=5, calls=args.calls,
        )  # fmt: skip
    dk_call, tf_call = calls["decodekit"], calls["transformers"]

    # 2. the decode loop with and without the bans
    hf = common.random_gpt2(args.seed)
    native = common.native_copy(hf)
    del hf
    ids = torch.randint(0, common.VOCAB, (args.batch, 16), generator=torch.Generator().manual_seed(args.seed + 1))
    clocks: dict[str, list[StepClock]] = {"none": [], "bad_words": []}

    def run(name: str, n: int) -> Callable[[], Any]:
        processors = dk_bans if name == "bad_words" else None

        def go() -> None:
            clock = StepClock()
            decodekit.generate(native, ids, processors=processors, max_new_tokens=n, on_token=clock)
            if n == args.new_tokens:
                clocks[name].append(clock)

        return go

    times = common.round_robin(
        {name: run(name, args.new_tokens) for name in clocks},
        repeats=args.repeats, warmup=args.warmup, warm={name: run(name, 4) for name in clocks},
    )  # fmt: skip
    step = {name: statistics.median(c.median_step() for c in clocks[name][-args.repeats :]) for name in clocks}
    ratio = step["bad_words"] / step["none"]
    whole = times["bad_words"].median / times["none"].median

    body = common.table(
        ["measurement", "no bans", f"{args.count} bad words", "ratio"],
        [
            [f"decodekit decode step, batch {args.batch} (ms, median step)", f"{step['none'] * 1e3:.1f}",
             f"{step['bad_words'] * 1e3:.1f}", f"**{ratio:.3f}x**"],
            [f"decodekit whole generate, {args.new_tokens} tokens (s)", f"{times['none'].median:.2f}",
             f"{times['bad_words'].median:.2f}", f"{whole:.3f}x"],
        ],
    )  # fmt: skip
    body += "\n\n" + common.table(
        [f"processor alone, batch {args.batch}, history 64", "ms/call (median)", "ms/call (fastest sample)", "CPU ms/call",
         "page faults/call", "range"],
        [
            ["decodekit `BadWords`", f"{dk_call.median * 1e3:.3f}", f"{dk_call.best * 1e3:.3f}", f"{dk_call.cpu_median * 1e3:.3f}",
             f"{dk_call.faults_median:.0f}", dk_call.spread()],
            ["transformers `NoBadWordsLogitsProcessor`", f"{tf_call.median * 1e3:.3f}", f"{tf_call.best * 1e3:.3f}",
             f"{tf_call.cpu_median * 1e3:.3f}",
             f"{tf_call.faults_median:.0f}", tf_call.spread()],
        ],
    )  # fmt: skip
    body += (
        f"\n\nProcessor speed-up (transformers / decodekit): {tf_call.median / dk_call.median:.2f}x. "
        f"Same tokens banned by both before timing ({int(per_row.min())}-{int(per_row.max())} per row)."
        f"\n\nTarget: decode step with {args.count} bad words <= {TARGET}x the step without. "
        f"Measured {ratio:.3f}x: {'met' if ratio <= TARGET else 'NOT met'}."
    )
    common.report(
        f"Bad words at scale: {args.count} sequences",
        args,
        body,
        setup_lines=[
            f"sequences: {args.count} random, lengths 1/2/3/4: {lengths[0]}/{lengths[1]}/{lengths[2]}/{lengths[3]}, "
            f"ids uniform in [0, {common.VOCAB})",
            f"decode loop: GPT-2 124M shape (GPT2Config(), seeded {args.seed}, native GPT), batch {args.batch}, greedy, "
            f"prompt 16, {args.new_tokens} new tokens; step = gap between on_token callbacks",
            f"processor alone: a sample = {args.calls} consecutive calls, figures per call",
        ],
    )


if __name__ == "__main__":
    main()
