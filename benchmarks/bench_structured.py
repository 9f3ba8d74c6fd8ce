"""Structured output: the JSON-schema mask's cost per step against a GPT-2 124M decode step.

GPT-2 124M with random weights (built in memory), batch 1 and 8. The mask runs on a vocabulary of
50,257 tokens shaped like GPT-2's: GPT-2's own tokenizer cannot be downloaded here, so the
vocabulary is synthetic: the 256 bytes (printable ones as text), then the most frequent 2-10
character pieces of this repository's text and code, with and without a leading space, as BPE
would make them, then ``<|endoftext|>`` (id 50256, EOS). Reported:

- the decode step: ``decodekit.generate`` of 32 new tokens (16-token prompt, greedy, no EOS),
  per token;
- the mask per step: ``Structured(json_schema=...)`` called for 32 consecutive steps on random
  logits, the argmax of its output appended each time (a random walk through the schema's
  language), per step: consuming the last token, filling the mask, applying it;
- the compile time of each schema (the vocabulary is built once per tokenizer, also stated).

transformers' ``generate`` with a logits processor from the same backend: llguidance 1.9 ships
none for transformers (only tokenizer helpers), so that column is left out.

    python benchmarks/bench_structured.py [--batches 1 8] [--repeats 5]
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

import torch

import common
from decodekit.processors import Structured

TARGET = 0.10  # mask cost per step <= 10% of a decode step
SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}},
            "home": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
        },
        "required": ["name", "age", "tags", "home"],
    },
    "list of records": {
        "type": "array",
        "items": {"type": "object", "properties": {"id": {"type": "integer"}, "text": {"type": "string"}}, "required": ["id", "text"]},
    },
}


class SyntheticBPE:
    """A GPT-2-sized vocabulary for the mask (``itos``), see the module docstring."""

    def __init__(self, size: int = common.VOCAB) -> None:
        root = Path(__file__).resolve().parent.parent
        text = " ".join(p.read_text(errors="ignore") for p in sorted(root.glob("**/*.py")) + sorted(root.glob("**/*.md")) if ".venv" not in p.parts)
        counts: collections.Counter[str] = collections.Counter()
        for word in text.split():
            for n in range(2, 11):
                for i in range(0, max(len(word) - n + 1, 0)):
                    counts[word[i : i + n]] += 1
        singles = [chr(b) if 32 <= b < 127 else chr(0x100 + b) for b in range(256)]
        pieces: list[str] = []
        seen = set(singles)
        for piece, _ in counts.most_common():
            for form in (" " + piece, piece):
                if form not in seen and len(singles) + len(pieces) < size - 1:
                    seen.add(form)
                    pieces.append(form)
        self.itos = singles + pieces + ["<|endoftext|>"]
        self.vocab_size = len(self.itos)
        self.eos_token_id = self.vocab_size - 1
        self.bos_token_id = self.pad_token_id = None

    def encode(self, text: str) -> list[int]:
        return [ord(c) if ord(c) < 256 else 0 for c in text]


def mask_steps(processor: Structured, batch: int, steps: int, seed: int) -> float:
    """Seconds per step of ``steps`` processor calls on random logits, argmax appended each time."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, 16), generator=g)
    logits = [torch.randn(batch, common.VOCAB, generator=g) * 3.0 for _ in range(steps)]
    processor.begin(ids)
    start = time.perf_counter()
    for x in logits:
        out = processor(ids, x)
        ids = torch.cat([ids, out.argmax(dim=-1, keepdim=True)], dim=1)
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], repeats=5, warmup=1)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=32)
    args = p.parse_args()
    common.setup(args)

    start = time.perf_counter()
    vocabulary = SyntheticBPE()
    first = Structured(json_schema=SCHEMAS["person"], tokenizer=vocabulary, vocab_size=common.VOCAB)
    with_vocab = time.perf_counter() - start
    compile_ms = {}
    for name, schema in SCHEMAS.items():
        t0 = time.perf_counter()
        Structured(json_schema=schema, tokenizer=vocabulary, vocab_size=common.VOCAB)
        t1 = time.perf_counter()
        compile_ms[name] = (t1 - t0) * 1e3  # the vocabulary is built once per tokenizer (cached)
    model = common.native_copy(common.random_gpt2())
    rows = []
    for batch in args.batches:
        ids = torch.randint(0, common.VOCAB, (batch, 16), generator=torch.Generator().manual_seed(batch))
        outputs: dict[str, torch.Tensor] = {}
        step = common.decodekit_generate(model, ids, args.steps, "greedy", outputs, "dk")
        timings = common.round_robin({"step": step}, repeats=args.repeats, warmup=args.warmup)
        per_step = timings["step"].median / args.steps
        for name, schema in SCHEMAS.items():
            processor = Structured(json_schema=schema, tokenizer=vocabulary, vocab_size=common.VOCAB)
            mask_steps(processor, batch, 4, 0)  # warm-up
            masks = sorted(mask_steps(processor, batch, args.steps, r) for r in range(args.repeats))
            cost = masks[len(masks) // 2]
            ratio = cost / per_step
            rows.append([batch, name, f"{per_step * 1e3:.1f}", f"{cost * 1e3:.2f}", f"**{ratio:.1%}**",
                         common.met(ratio, TARGET, at_least=False)])  # fmt: skip
    del first
    body = common.table(["batch", "schema", "decode step (ms)", "mask per step (ms)", "mask / step", "<= 10%"], rows)
    body += "\n\n" + "\n".join(f"- compile `{n}` (a new processor, vocabulary cached): {ms:.1f} ms" for n, ms in compile_ms.items())
    common.report(
        "Structured output: JSON-schema mask against a GPT-2 124M decode step",
        args,
        body,
        setup_lines=[
            "model: GPT-2 124M shape, random weights seeded 0, float32, decodekit's native GPT; "
            f"decode step = decodekit.generate of {args.steps} new tokens (16-token prompt, greedy) / {args.steps}",
            f"vocabulary: synthetic byte-level BPE-like, {common.VOCAB} tokens (GPT-2's tokenizer is not available offline); "
            f"first processor (vocabulary + schema) built in {with_vocab * 1e3:.0f} ms",
            f"mask per step: median over {args.repeats} walks of {args.steps} steps (consume, fill, apply)",
            "transformers generate with an llguidance logits processor: llguidance 1.9 has none for transformers; not measured",
        ],
    )


if __name__ == "__main__":
    main()
