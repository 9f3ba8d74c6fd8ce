"""Train decodekit's embedded default model: a small byte-level GPT on Debian's fortunes.

The corpus is the text of Debian's ``fortunes`` and ``fortunes-min`` packages
(``apt-get install fortunes fortunes-min``), read from ``/usr/share/games/fortunes``:
every fortune file there except the ``off/`` (offensive) directory and the ``.dat`` / ``.u8``
index files. Fortunes are separated by lines holding only ``%``; terminal overstriking
(``X<backspace>Y``, used for bold and underline) is reduced to the printed character.

Tokens are UTF-8 bytes (0-255) plus one special token, 256, written before every fortune:
it ends the previous fortune and starts the next (GPT-2's ``<|endoftext|>`` plays both roles
the same way). So the vocabulary is 257, the tokenizer is
``ByteTokenizer(eos_token_id=256, bos_token_id=256, add_bos=True)`` (``encode`` puts 256
first), and the empty prompt ``[256]`` asks for a fresh fortune.

The split is by fortune (seeded shuffle): validation fortunes never appear in training.
The run is seeded and uses a fixed number of steps, so running it again with the same
torch version, CPU and thread count reproduces the weights (floating-point reductions
differ between thread counts and CPUs, so elsewhere expect the same numbers to within
noise, not the same bits); it writes ``model.safetensors`` (float16)
and ``config.json`` (model shape, tokenizer, corpus, training and validation numbers,
samples) into ``decodekit/data/default_model/``.

Usage::

    python tools/train_default_model.py                 # the shipped recipe (docs/default_model.md)
    python tools/train_default_model.py --bench 5       # time 5 steps, write nothing
    python tools/train_default_model.py --steps 200 --out /tmp/m   # a quick trial
    python tools/train_default_model.py --resume        # continue an interrupted run

The training state is saved every ``--checkpoint-every`` steps to ``--work-dir``; a resumed
run draws the same batches as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decodekit.models.gpt import GPT, GPTConfig  # noqa: E402

FORTUNE_DIR = Path("/usr/share/games/fortunes")
SEPARATOR = 256  # ends one fortune and starts the next
DEFAULT_OUT = ROOT / "decodekit" / "data" / "default_model"
OVERSTRIKE = re.compile(r".\x08")


# ------------------------------------------------------------------------------ corpus


def fortune_files(directory: Path = FORTUNE_DIR) -> list[Path]:
    """The fortune text files in ``directory``, sorted; not ``off/``, not ``.dat``/``.u8``."""
    if not directory.is_dir():
        raise SystemExit(
            f"error: {directory} not found: install the corpus with "
            "`apt-get update && apt-get install -y fortunes fortunes-min`"
        )
    files = sorted(
        p for p in directory.iterdir() if p.is_file() and p.suffix not in {".dat", ".u8"}
    )
    if not files:
        raise SystemExit(f"error: no fortune files in {directory}")
    return files


def read_fortunes(files: list[Path]) -> list[str]:
    """Every fortune in ``files``, overstriking removed, surrounding blank lines stripped."""
    fortunes = []
    for path in files:
        text = OVERSTRIKE.sub("", path.read_text(encoding="utf-8", errors="replace"))
        for entry in re.split(r"^%\s*$", text, flags=re.MULTILINE):
            entry = entry.strip("\n")
            if entry.strip():
                fortunes.append(entry + "\n")
    return fortunes


def encode(fortunes: list[str]) -> torch.Tensor:
    """One token stream: ``[256] fortune [256] fortune ...`` as int64."""
    out: list[int] = []
    for text in fortunes:
        out.append(SEPARATOR)
        out.extend(text.encode("utf-8"))
    return torch.tensor(out, dtype=torch.long)


# ------------------------------------------------------------------------------ training


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay from ``lr`` to ``min_lr``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def get_batch(data: torch.Tensor, batch: int, block: int, gen: torch.Generator):
    """``batch`` random windows of ``block + 1`` tokens: inputs and next-token targets."""
    starts = torch.randint(len(data) - block - 1, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(block + 1)
    windows = data[idx]
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def evaluate(model: GPT, data: torch.Tensor, block: int, max_windows: int | None = None) -> float:
    """Mean next-token loss (nats per token) over non-overlapping windows of ``data``."""
    model.eval()
    n = (len(data) - 1) // block
    if max_windows is not None:
        n = min(n, max_windows)
    x = data[: n * block].view(n, block)
    y = data[1 : n * block + 1].view(n, block)
    total = 0.0
    for i in range(0, n, 32):
        logits = model(x[i : i + 32])
        total += F.cross_entropy(logits.flatten(0, 1), y[i : i + 32].flatten(), reduction="sum").item()
    model.train()
    return total / (n * block)


@torch.no_grad()
def sample(model: GPT, prompt: bytes, max_new: int, temperature: float, seed: int) -> str:
    """A small cached sampling loop (the real one is :func:`decodekit.generate`)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[SEPARATOR, *prompt]])
    cache = model.new_cache(1, min(model.max_context, ids.shape[1] + max_new))
    mask = torch.ones(1, ids.shape[1], dtype=torch.bool)
    logits, cache = model.step(ids, position_ids=torch.arange(ids.shape[1])[None], attention_mask=mask, cache=cache)
    out = []
    for _ in range(max_new):
        probs = torch.softmax(logits / temperature, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=gen))
        if token == SEPARATOR or cache.length >= cache.max_length:
            break
        out.append(token)
        mask = torch.ones(1, cache.length + 1, dtype=torch.bool)
        logits, cache = model.step(
            torch.tensor([[token]]), position_ids=torch.tensor([[cache.length]]), attention_mask=mask, cache=cache
        )
    model.train()
    return prompt.decode("utf-8", errors="replace") + bytes(out).decode("utf-8", errors="replace")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=192)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a busy machine)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bfloat16 autocast for training (2x faster on CPUs with AVX512-BF16)")
    p.add_argument("--bench", type=int, default=0, help="time this many steps and exit")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/decodekit_default_model_train"),
                   help="where the resumable training state is kept")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--resume", action="store_true", help="continue from --work-dir/last.pt")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    files = fortune_files()
    fortunes = read_fortunes(files)
    order = list(range(len(fortunes)))
    random.Random(args.seed).shuffle(order)
    n_val = int(len(order) * args.val_fraction)
    val = encode([fortunes[i] for i in order[:n_val]])
    train = encode([fortunes[i] for i in order[n_val:]])
    corpus_sha = hashlib.sha256("".join(fortunes).encode("utf-8")).hexdigest()
    print(f"corpus: {len(files)} files, {len(fortunes)} fortunes, train {len(train)} tokens, val {len(val)} tokens")

    config = GPTConfig(
        block_size=args.block_size, vocab_size=257, n_layer=args.n_layer, n_head=args.n_head,
        n_embd=args.n_embd, bias=True,
    )
    model = GPT(config)
    n_params = model.num_parameters()
    print(f"model: {n_params / 1e6:.2f}M parameters, {config.model_dump()}")

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.99),
    )
    gen = torch.Generator().manual_seed(args.seed)
    steps = args.bench or args.steps
    history: list[dict] = []
    first_step, prior_seconds = 0, 0.0
    state_file = args.work_dir / "last.pt"
    if args.resume:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        first_step, history = state["step"] + 1, state["history"]
        prior_seconds = state.get("elapsed", 0.0)
        print(f"resumed from {state_file} at step {first_step}")
    t0 = time.time()
    model.train()
    for step in range(first_step, steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        x, y = get_batch(train, args.batch, args.block_size, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            elapsed = time.time() - t0
            tps = (step + 1 - first_step) * args.batch * args.block_size / elapsed
            print(f"step {step:5d} loss {loss.item():.4f} lr {lr_at(step, args):.2e} "
                  f"{elapsed:7.1f}s {tps:,.0f} tok/s", flush=True)
        if not args.bench and step > 0 and (step % args.eval_every == 0 or step == steps - 1):
            vl = evaluate(model, val, args.block_size, max_windows=64)
            history.append({"step": step, "train_loss": round(loss.item(), 4), "val_loss": round(vl, 4)})
            print(f"  eval step {step}: val loss {vl:.4f} (ppl {math.exp(vl):.3f})", flush=True)
            print("  sample:", repr(sample(model, b"The ", 120, 0.8, args.seed)), flush=True)
        if not args.bench and (step + 1) % args.checkpoint_every == 0:
            args.work_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                        "step": step, "history": history, "elapsed": prior_seconds + time.time() - t0}, state_file)
    if args.bench:
        return
    train_seconds = prior_seconds + time.time() - t0

    # final numbers: full validation set; training loss on as many train windows as val has
    val_loss = evaluate(model, val, args.block_size)
    train_loss = evaluate(model, train, args.block_size, max_windows=(len(val) - 1) // args.block_size)
    print(f"final: train loss {train_loss:.4f}, val loss {val_loss:.4f}, val ppl {math.exp(val_loss):.4f}, "
          f"{val_loss / math.log(2):.4f} bits/byte, {train_seconds / 60:.1f} min")
    prompts = [b"", b"The ", b"A computer ", b"Love is ", b"Q: Why did the chicken"]
    samples = [{"prompt": p.decode(), "temperature": 0.8, "seed": args.seed + i,
                "text": sample(model, p, 200, 0.8, args.seed + i)} for i, p in enumerate(prompts)]
    for s in samples:
        print("---", s["prompt"], "\n" + s["text"])

    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}  # tied to transformer.wte.weight
    save_file(state, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    meta = {
        "format": "decodekit-gpt",
        "model": config.model_dump(),
        "weights_dtype": "float16",
        "tokenizer": {"kind": "byte", "eos_token_id": SEPARATOR, "bos_token_id": SEPARATOR, "add_bos": True},
        "parameters": n_params,
        "corpus": {
            "description": "Debian packages fortunes + fortunes-min (/usr/share/games/fortunes, "
                           "without off/ and .dat/.u8 files); fortunes split on '%' lines, "
                           "overstriking removed, token 256 before each fortune",
            "files": [f.name for f in files],
            "fortunes": len(fortunes),
            "sha256": corpus_sha,
            "train_tokens": len(train),
            "val_tokens": len(val),
            "val_fraction": args.val_fraction,
        },
        "training": {
            "seed": args.seed, "steps": args.steps, "batch_size": args.batch,
            "block_size": args.block_size, "lr": args.lr, "min_lr": args.min_lr,
            "warmup": args.warmup, "weight_decay": args.weight_decay, "optimizer": "AdamW(0.9, 0.99)",
            "schedule": "linear warmup + cosine", "bf16_autocast": args.bf16,
            "threads": args.threads, "torch": torch.__version__,
            "minutes": round(train_seconds / 60, 1),
            "train_loss": round(train_loss, 4), "val_loss": round(val_loss, 4),
            "val_perplexity": round(math.exp(val_loss), 4),
            "val_bits_per_byte": round(val_loss / math.log(2), 4),
            "history": history,
        },
        "samples": samples,
    }
    (args.out / "config.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}/model.safetensors ({(args.out / 'model.safetensors').stat().st_size / 1e6:.2f} MB) and config.json")


if __name__ == "__main__":
    main()
