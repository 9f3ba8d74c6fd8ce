"""Through the Hugging Face adapter: tokens/s of decodekit on a transformers model against its generate.

A Llama-shaped model with seeded random weights, built in memory from ``LlamaConfig`` (nothing is
downloaded): 12 layers, width 768, MLP 2048, 12 heads, vocabulary 32,000 (about 110M
parameters). Three contenders, each on its own copy of the same weights:

- transformers: ``model.generate`` (EOS disabled, so exactly ``--new-tokens`` tokens);
- decodekit (adapter): ``decodekit.generate`` on ``HFCausalLM(model)``, as ``load_model`` gives
  for a Hugging Face folder (prepacked weights off: the adapter's default);
- decodekit (adapter, packed): the same with ``pack_weights()``: the model's ``nn.Linear`` layers
  multiply by oneDNN-prepacked weights (see ``decodekit/models/packing.py``).

Greedy and top-p (0.9) sampling, batch 1 and 8. Greedy tokens must match across the three.

    python benchmarks/bench_hf_adapter.py [--batches 1 8] [--modes greedy top_p] [--repeats 5]
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

import common
from decodekit.models.hf import HFCausalLM

VOCAB = 32000


def llama(seed: int) -> Any:
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                      num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512)  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def contenders(hf: Any, plain: HFCausalLM, packed: HFCausalLM, ids: torch.Tensor, n: int, modes: list[str],
               outputs: dict[str, torch.Tensor]) -> dict[str, Callable[[], Any]]:  # fmt: skip
    """The timed calls; each keeps its last new tokens in ``outputs`` for the equality check."""
    timed: dict[str, Callable[[], Any]] = {}
    for mode in modes:
        for name, model in (("transformers", hf), ("decodekit", plain), ("decodekit packed", packed)):
            run = common.transformers_generate if model is hf else common.decodekit_generate
            timed[f"{name} {mode}"] = run(model, ids, n, mode, outputs, f"{name} {mode}")
    return timed


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], repeats=5, warmup=1)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    common.decoding_options(p)
    args = p.parse_args()
    common.setup(args)

    hf = llama(args.seed)
    plain = HFCausalLM(copy.deepcopy(hf))
    packed = HFCausalLM(copy.deepcopy(hf)).pack_weights()
    n = args.new_tokens

    rows, checks = [], []
    for batch in args.batches:
        g = torch.Generator().manual_seed(args.seed + batch)
        ids = torch.randint(0, VOCAB, (batch, args.prompt), generator=g)
        outputs: dict[str, torch.Tensor] = {}
        timed = contenders(hf, plain, packed, ids, n, args.modes, outputs)
        times = common.round_robin(timed, repeats=args.repeats, warmup=args.warmup)
        for mode in args.modes:
            tf = times[f"transformers {mode}"]
            for name in ("decodekit", "decodekit packed"):
                dk = times[f"{name} {mode}"]
                rows.append([
                    batch, mode, name, f"{batch * n / tf.median:.1f}", f"{batch * n / dk.median:.1f}",
                    f"**{tf.median / dk.median:.3f}x**", f"{tf.best / dk.best:.3f}x", f"{tf.cpu_median / dk.cpu_median:.3f}x",
                    tf.spread(1, "s"), dk.spread(1, "s"),
                ])  # fmt: skip
        if "greedy" in args.modes:
            ref = outputs["transformers greedy"]
            same = [name for name in ("decodekit", "decodekit packed") if torch.equal(outputs[f"{name} greedy"], ref)]
            checks.append(f"batch {batch}: greedy tokens equal to transformers': {', '.join(same) or 'neither'}"
                          f"{'' if len(same) == 2 else ' (NOT all)'}")  # fmt: skip

    body = common.table(
        ["batch", "mode", "decodekit contender", "transformers tok/s", "decodekit tok/s",
         "decodekit / transformers (median wall)", "(fastest run)", "(CPU time)", "transformers range", "decodekit range"],
        rows,
    )  # fmt: skip
    body += "\n\n" + "\n".join(f"- {c}" for c in checks)
    common.report(
        f"Hugging Face adapter: a Llama-shaped model (random weights), {n} new tokens",
        args,
        body,
        setup_lines=[
            "model: LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, "
            f"num_hidden_layers=12, num_attention_heads=12)) seeded {args.seed}, float32; each contender has its own copy",
            f"prompt {args.prompt} random tokens per row, no padding; tokens/s = batch x {n} / median wall time of the "
            "whole call (prefill included)",
            "transformers: `generate(max_new_tokens=min_new_tokens=n, eos_token_id=None, do_sample=False)` or "
            "`(do_sample=True, top_p=0.9, top_k=0)`; decodekit: `generate(HFCausalLM(model), processors=None | TopP(0.9), "
            "sampler=Greedy() | Multinomial(), seed=0)`, without and with `pack_weights()`",
        ],
    )


if __name__ == "__main__":
    main()
