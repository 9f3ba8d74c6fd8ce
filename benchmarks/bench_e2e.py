"""End to end: tokens/s of decodekit's loop against transformers' generate and a bare KV-cached loop.

GPT-2 124M with seeded random weights, built in memory from ``GPT2Config()`` (nothing is
downloaded). Three contenders on the same weights:

- transformers: ``model.generate`` (EOS disabled, so exactly ``--new-tokens`` tokens);
- decodekit: ``decodekit.generate`` on the native GPT loaded from the same weights
  (``save_pretrained`` then ``decodekit.models.load_model``, which converts GPT-2 to the native GPT);
- bare loop: the same native model, prefill with ``model.step``, then ``model.step`` + argmax per
  token: no processors, no checks. The floor any loop on this model pays.

Greedy and top-p (0.9) sampling, batch 1 and 8. Targets: decodekit >= 1.1x transformers' tokens/s,
and within 5% of the bare loop. Greedy tokens must match between transformers and decodekit.

    python benchmarks/bench_e2e.py [--batches 1 8] [--modes greedy top_p] [--repeats 5]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import common

TARGET_VS_TRANSFORMERS = 1.1
TARGET_VS_BARE = 0.95


def bare_loop(model: Any, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding with nothing but the model: prefill, then step + argmax. ``[B, N]``."""
    batch, prompt = ids.shape
    mask = torch.ones(batch, prompt + new_tokens, dtype=torch.bool)
    cache = model.new_cache(batch, prompt + new_tokens)
    positions = torch.arange(prompt + new_tokens).expand(batch, -1)
    logits, cache = model.step(ids, position_ids=positions[:, :prompt], attention_mask=mask[:, :prompt], cache=cache)
    out = torch.empty(batch, new_tokens, dtype=torch.long)
    for i in range(new_tokens):
        token = logits.argmax(dim=-1)  # [B]
        out[:, i] = token
        if i + 1 == new_tokens:
            break
        end = prompt + i + 1
        logits, cache = model.step(
            token[:, None], position_ids=positions[:, end - 1 : end], attention_mask=mask[:, :end], cache=cache
        )
    return out


def contenders(hf: Any, native: Any, ids: torch.Tensor, n: int, modes: list[str], outputs: dict[str, torch.Tensor]
               ) -> dict[str, Callable[[], Any]]:  # fmt: skip
    """The timed calls; each keeps its last new tokens in ``outputs`` for the equality check."""

    def bare(n: int = n) -> Callable[[], Any]:
        def run() -> None:
            outputs["bare loop"] = bare_loop(native, ids, n)

        return run

    timed: dict[str, Callable[[], Any]] = {}
    for mode in modes:
        timed[f"transformers {mode}"] = common.transformers_generate(hf, ids, n, mode, outputs, f"transformers {mode}")
        timed[f"decodekit {mode}"] = common.decodekit_generate(native, ids, n, mode, outputs, f"decodekit {mode}")
    timed["bare loop"] = bare()
    return timed


def overhead_section(args: Any, bare_ms: dict[int, float]) -> str:
    """Per-token cost of each loop beyond the bare one, on a model whose forward costs little.

    A 1-layer, 64-wide GPT-2 with GPT-2's vocabulary: processing and sampling ``[B, 50257]``
    logits costs what it costs with GPT-2 124M, while the forward pass is cheap, so the loops'
    own costs stand out from the noise. Many short runs, interleaved.
    """
    hf = common.random_gpt2(args.seed, n_layer=1, n_embd=64, n_head=2)
    native = common.native_copy(hf)
    n, rows = args.new_tokens, []
    for batch in args.batches:
        ids = torch.randint(0, common.VOCAB, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
        timed = contenders(hf, native, ids, n, args.modes, {})
        times = common.round_robin(timed, repeats=max(args.repeats, 9), warmup=1)
        floor = times["bare loop"].median / n * 1e3
        for name, t in times.items():
            if name == "bare loop":
                continue
            extra = t.median / n * 1e3 - floor
            share = f"{extra / bare_ms[batch]:.1%}" if batch in bare_ms else "-"
            rows.append([batch, name, f"{t.median / n * 1e3:.2f}", f"{floor:.2f}", f"{extra:+.2f}", share])
    return (
        f"Loop overhead per token (a 1-layer, 64-wide GPT-2 with the same vocabulary, {n} new tokens, "
        f"median of {max(args.repeats, 9)} interleaved runs): what each loop adds to a bare greedy loop, and "
        "that addition as a share of the bare loop's ms/token with GPT-2 124M above.\n\n"
        + common.table(["batch", "loop", "ms/token", "bare loop ms/token", "added ms/token",
                        "added / GPT-2 124M bare ms/token"], rows)  # fmt: skip
    )


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], repeats=5, warmup=1)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--modes", nargs="+", default=["greedy", "top_p"], choices=["greedy", "top_p"])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens per row (random ids)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-overhead", dest="overhead", action="store_false",
                   help="skip the loop-overhead measurement on a tiny model")
    args = p.parse_args()
    common.setup(args)

    hf = common.random_gpt2(args.seed)
    native = common.native_copy(hf)
    n = args.new_tokens

    rows, checks, verdicts = [], [], []
    bare_ms: dict[int, float] = {}
    for batch in args.batches:
        g = torch.Generator().manual_seed(args.seed + batch)
        ids = torch.randint(0, common.VOCAB, (batch, args.prompt), generator=g)
        outputs: dict[str, torch.Tensor] = {}
        timed = contenders(hf, native, ids, n, args.modes, outputs)
        warm = contenders(hf, native, ids, 4, args.modes, {})  # warm-up: 4 new tokens each
        times = common.round_robin(timed, repeats=args.repeats, warmup=args.warmup, warm=warm)

        tokens = batch * n
        bare = times["bare loop"]
        bare_ms[batch] = bare.median / n * 1e3
        for mode in args.modes:
            tf, dk = times[f"transformers {mode}"], times[f"decodekit {mode}"]
            vs_tf, vs_bare = tf.median / dk.median, bare.median / dk.median
            rows.append([
                batch, mode, f"{tokens / tf.median:.1f}", f"{tokens / dk.median:.1f}", f"{tokens / bare.median:.1f}",
                f"**{vs_tf:.3f}x**", f"{tf.best / dk.best:.3f}x", f"{tf.cpu_median / dk.cpu_median:.3f}x",
                f"**{vs_bare:.3f}**", f"{bare.best / dk.best:.3f}", f"{bare.cpu_median / dk.cpu_median:.3f}",
                tf.spread(1, "s"), dk.spread(1, "s"),
            ])  # fmt: skip
            verdicts.append(
                f"batch {batch} {mode}: vs transformers {vs_tf:.3f}x (target >= {TARGET_VS_TRANSFORMERS}: "
                f"{common.met(vs_tf, TARGET_VS_TRANSFORMERS, at_least=True)}), vs bare loop {vs_bare:.3f} "
                f"(target >= {TARGET_VS_BARE}: {common.met(vs_bare, TARGET_VS_BARE, at_least=True)})"
            )
        if "greedy" in args.modes:
            same = torch.equal(outputs["transformers greedy"], outputs["decodekit greedy"])
            same_bare = torch.equal(outputs["bare loop"], outputs["decodekit greedy"])
            agree = (outputs["transformers greedy"] == outputs["decodekit greedy"]).float().mean().item()
            checks.append(
                f"batch {batch}: greedy tokens transformers == decodekit: {'yes' if same else f'NO ({agree:.1%} agree)'}; "
                f"bare loop == decodekit: {'yes' if same_bare else 'NO'}"
            )

    body = common.table(
        ["batch", "mode", "transformers tok/s", "decodekit tok/s", "bare loop tok/s (greedy)",
         "decodekit / transformers (median wall)", "(fastest run)", "(CPU time)",
         "decodekit / bare (median wall)", "(fastest run)", "(CPU time)", "transformers range", "decodekit range"],
        rows,
    )  # fmt: skip
    body += "\n\n" + "\n".join(f"- {c}" for c in checks + verdicts)
    if args.overhead:
        body += "\n\n" + overhead_section(args, bare_ms)
    common.report(
        f"End to end: GPT-2 124M (random weights), {n} new tokens",
        args,
        body,
        setup_lines=[
            f"model: GPT2LMHeadModel(GPT2Config()) seeded {args.seed}, float32; decodekit and the bare loop use the "
            "native GPT loaded from the same weights",
            f"prompt {args.prompt} random tokens per row, no padding; tokens/s = batch x {n} / median wall time of the "
            "whole call (prefill included)",
            "transformers: `generate(max_new_tokens=min_new_tokens=n, eos_token_id=None, do_sample=False)` or "
            "`(do_sample=True, top_p=0.9, top_k=0)`; decodekit: `generate(processors=None | TopP(0.9), "
            "sampler=Greedy() | Multinomial(), seed=0)`; bare loop: greedy (no sampling) in both rows",
        ],
    )


if __name__ == "__main__":
    main()
