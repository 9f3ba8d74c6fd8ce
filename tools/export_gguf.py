"""Write a decodekit model as a GGUF file that llama.cpp and decodekit both load.

    python tools/export_gguf.py default out/default-f32.gguf                 # the embedded model
    python tools/export_gguf.py gpt2-random out/gpt2-q8_0.gguf --type Q8_0   # GPT-2 124M shape, seeded random weights
    python tools/export_gguf.py llama-random out/llama-f16.gguf --type F16   # a small Llama shape, seeded random weights
    python tools/export_gguf.py path/to/ckpt.pt out/model-f16.gguf --type F16

``gpt2-random`` is GPT-2 124M's shape (12 layers, width 768, 12 heads, 1024 positions,
vocabulary 50,257) with GPT-2's initialisation from ``--seed``: the same seed gives the same
weights, so files of every type hold one model. ``llama-random`` is a small Llama's shape (12
layers, width 1024, 16 query and 4 key/value heads, SwiGLU 2816 wide, vocabulary 32,000, untied
head: 200M parameters) with weights drawn N(0, 0.02) and norms at 1, seeded alike. Any other source is what
:func:`decodekit.models.load_model` reads (a native GPT or Llama). The vocabulary written is
byte-level BPE (:func:`decodekit.models.gguf_export.byte_level_vocab`): the embedded model's own
tokenizer; for the others it only completes the file (prompts are given as token ids).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from decodekit.models import GPT, GPTConfig, load_model
from decodekit.models.gguf import TENSOR_TYPES
from decodekit.models.gguf_export import write_gguf

GPT2_124M = GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768)


def random_gpt2(seed: int) -> GPT:
    """GPT-2 124M's shape with GPT-2's weight initialisation, seeded."""
    torch.manual_seed(seed)
    return GPT(GPT2_124M).eval()


LLAMA_SMALL = dict(block_size=1024, vocab_size=32000, n_layer=12, n_head=16, n_kv_head=4, n_embd=1024,
                   intermediate_size=2816)


def random_llama(seed: int) -> torch.nn.Module:
    """A small Llama's shape (:data:`LLAMA_SMALL`), weights N(0, 0.02) and norms at 1, seeded."""
    from decodekit.models.llama import Llama, LlamaConfig

    torch.manual_seed(seed)
    model = Llama(LlamaConfig(**LLAMA_SMALL)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("source", help="'default', 'gpt2-random', 'llama-random', or a model load_model reads")
    p.add_argument("out", type=Path, help="the .gguf file to write")
    p.add_argument("--type", default="F32", choices=TENSOR_TYPES, help="weight tensor type (norms and biases stay F32)")
    p.add_argument("--seed", type=int, default=0, help="weights of gpt2-random and llama-random")
    args = p.parse_args(argv)
    if args.source == "gpt2-random":
        model = random_gpt2(args.seed)
    elif args.source == "llama-random":
        model = random_llama(args.seed)
    else:
        model, _ = load_model(args.source, device="cpu")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(model, args.out, tensor_type=args.type, name=args.source)
    print(f"{args.out}: {args.type}, {args.out.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
