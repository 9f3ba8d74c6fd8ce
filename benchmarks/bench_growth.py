"""Growth: cost per token at 1024 new tokens against the cost per token at 128 (KV cache at work).

GPT-2 124M shape with seeded random weights and ``n_positions=2048`` (so prompt + 1024 new tokens
fit without a sliding window), batch 1, greedy, an 8-token prompt. Each contender generates 128
and 1024 tokens; cost per token = median wall time of the whole call / new tokens. A KV-cached
loop grows only by attention over a longer cache; recomputing the prefix would grow linearly.
Target (decodekit): at most 1.5x. transformers is measured alongside for comparison.

Whole runs of a thousand steps drift with the machine's load, so two steadier views are added:
the median time of single decode steps at tokens 100-128 and 1000-1024 of the 1024-token run
(timestamps from a per-step callback), and one forward step of each model with its cache holding
``prompt + 128`` and ``prompt + 1024`` positions, the four (two models x two lengths) interleaved
step by step; their ratio bounds the whole-run ratio from above (a run averages over lengths).

    python benchmarks/bench_growth.py [--repeats 3] [--layers 12]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers.generation.logits_process import LogitsProcessorList

import common
import decodekit

TARGET = 1.5
SHORT, LONG = 128, 1024


class StepClock:
    """Records a timestamp per decoding step; used as a transformers processor and a decodekit callback."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, *args: Any) -> Any:
        self.stamps.append(time.perf_counter())
        return args[1] if len(args) == 2 else None  # a processor returns the scores unchanged

    def step_ms(self, first: int, last: int) -> float:
        """Median milliseconds between consecutive steps ``first..last`` (1-based token numbers)."""
        gaps = [b - a for a, b in zip(self.stamps[first - 1 : last - 1], self.stamps[first:last])]
        return statistics.median(gaps) * 1e3


def step_costs(hf: Any, native: Any, prompt: int, args: Any) -> dict[str, common.Timings]:
    """One decode step of each model with ``prompt + n`` cached positions, n in (SHORT, LONG), interleaved."""
    g = torch.Generator().manual_seed(args.seed + 1)
    token = torch.randint(0, common.VOCAB, (1, 1), generator=g)
    calls: dict[str, Callable[[], Any]] = {}
    for n in (SHORT, LONG):
        length = prompt + n
        ids = torch.randint(0, common.VOCAB, (1, length), generator=g)
        mask = torch.ones(1, length + 1, dtype=torch.bool)
        position = torch.tensor([[length]])
        cache = native.new_cache(1, length + 1)
        native.step(ids, position_ids=torch.arange(length)[None], attention_mask=mask[:, :length], cache=cache)
        with torch.no_grad():
            past = hf(ids, use_cache=True, logits_to_keep=1).past_key_values

        def dk_step(cache: Any = cache, mask: torch.Tensor = mask, position: torch.Tensor = position, length: int = length) -> None:
            cache.length = length  # forget the previous call's position: the cache stays at `length`
            native.step(token, position_ids=position, attention_mask=mask, cache=cache)

        def tf_step(past: Any = past, mask: torch.Tensor = mask, position: torch.Tensor = position, length: int = length) -> None:
            with torch.no_grad():
                hf(token, past_key_values=past, attention_mask=mask.long(), position_ids=position, use_cache=True,
                   logits_to_keep=1)  # fmt: skip
            past.crop(-1)  # drop the position just added: the cache stays at `length`

        calls[f"decodekit {n}"] = dk_step
        calls[f"transformers {n}"] = tf_step
    return common.round_robin(calls, repeats=max(args.repeats, 9), warmup=2, calls=3)


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], repeats=3, warmup=1)
    p.add_argument("--layers", type=int, default=12, help="n_layer of the GPT-2 config (12 = GPT-2 124M)")
    p.add_argument("--prompt", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    common.setup(args)

    hf = common.random_gpt2(args.seed, n_positions=2048, n_layer=args.layers)
    native = common.native_copy(hf)
    ids = torch.randint(0, common.VOCAB, (1, args.prompt), generator=torch.Generator().manual_seed(args.seed))
    attention = torch.ones_like(ids)
    clocks: dict[str, StepClock] = {}

    def tf(n: int) -> Callable[[], Any]:
        def run() -> None:
            clock = clocks[f"transformers {n}"] = StepClock()
            hf.generate(ids, attention_mask=attention, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        eos_token_id=None, pad_token_id=0, logits_processor=LogitsProcessorList([clock]))  # fmt: skip

        return run

    def dk(n: int) -> Callable[[], Any]:
        def run() -> None:
            clock = clocks[f"decodekit {n}"] = StepClock()
            decodekit.generate(native, ids, max_new_tokens=n, on_token=clock)

        return run

    timed = {f"{name} {n}": make(n) for n in (SHORT, LONG) for name, make in (("decodekit", dk), ("transformers", tf))}
    warm = {name: (dk if name.startswith("decodekit") else tf)(16) for name in timed}
    times = common.round_robin(timed, repeats=args.repeats, warmup=args.warmup, warm=warm)

    rows, verdict = [], ""
    for name in ("decodekit", "transformers"):
        short, long = times[f"{name} {SHORT}"], times[f"{name} {LONG}"]
        per_short, per_long = short.median / SHORT, long.median / LONG
        ratio = per_long / per_short
        clock = clocks[f"{name} {LONG}"]
        early, late = clock.step_ms(100, SHORT), clock.step_ms(LONG - 24, LONG)
        rows.append([name, f"{per_short * 1e3:.2f}", f"{per_long * 1e3:.2f}", f"**{ratio:.3f}**",
                     f"{(long.best / LONG) / (short.best / SHORT):.3f}",
                     f"{(long.cpu_median / LONG) / (short.cpu_median / SHORT):.3f}",
                     f"{early:.2f}", f"{late:.2f}", f"{late / early:.3f}"])  # fmt: skip
        if name == "decodekit":
            verdict = f"Target (decodekit): <= {TARGET}. Measured {ratio:.3f}: {'met' if ratio <= TARGET else 'NOT met'}."

    steps = step_costs(hf, native, args.prompt, args)
    step_rows = []
    for name in ("decodekit", "transformers"):
        short, long = steps[f"{name} {SHORT}"], steps[f"{name} {LONG}"]
        step_rows.append([name, f"{short.median * 1e3:.2f}", f"{long.median * 1e3:.2f}",
                          f"{long.median / short.median:.3f}", f"{long.best / short.best:.3f}",
                          f"{long.cpu_median / short.cpu_median:.3f}"])  # fmt: skip

    body = common.table(
        ["contender", f"ms/token at {SHORT}", f"ms/token at {LONG}", f"ratio {LONG}/{SHORT} (median wall)", "(fastest run)",
         "(CPU time)", "step ms, tokens 100-128", f"step ms, tokens {LONG - 24}-{LONG}", "late / early step"],
        rows,
    )  # fmt: skip
    body += "\n\n" + verdict
    body += (
        f"\n\nOne forward step with {args.prompt}+{SHORT} and {args.prompt}+{LONG} cached positions (model alone, "
        f"interleaved, median of {max(args.repeats, 9)} samples of 3 steps):\n\n"
        + common.table(
            ["model", f"ms/step at {SHORT}", f"ms/step at {LONG}", "ratio (median)", "(fastest)", "(CPU time)"], step_rows
        )
    )
    common.report(
        f"Growth: cost per token at {LONG} vs {SHORT} new tokens",
        args,
        body,
        setup_lines=[
            f"model: GPT2LMHeadModel(GPT2Config(n_positions=2048, n_layer={args.layers})) seeded {args.seed}, "
            "float32 (n_layer=12 is GPT-2 124M's shape); decodekit runs the native GPT loaded from the same weights",
            f"batch 1, greedy, prompt {args.prompt} random tokens; ms/token = median wall time of the call / new tokens",
        ],
    )


if __name__ == "__main__":
    main()
