"""decodekit against llama.cpp (llama-cpp-python) on the same GGUF weights, side by side in one run.

GPT-2 124M's shape with seeded random weights (``tools/export_gguf.py gpt2-random``) is written as
GGUF in F32, F16 and Q8_0. decodekit loads the F32 file (its native GPT, float32; also
``model.weights=bf16`` / ``int8`` when ``load_model`` has that setting); llama.cpp decodes each
file. 64 new tokens after a 16-token prompt, batch 1 and 8 (llama.cpp: 8 sequences in one
batch), greedy and top-p 0.9, 1 and 2 threads. Prints tokens/s and ratios; checks that greedy
tokens equal llama.cpp F32's (the first divergence otherwise); and the physical bound at batch
1: every weight is read once per token, so tokens/s <= memory bandwidth / weight bytes, with
the bandwidth measured here (a 512 MiB tensor copy) and the fraction of it each side reaches.
``--model llama`` runs a small Llama's shape instead (``tools/export_gguf.py llama-random``: 12
layers, width 1024, grouped-query attention, 200M parameters; decodekit's native Llama).
``--formats`` picks decodekit's weight formats (and so the llama.cpp types they are measured
against); ``--kv-cache auto,bf16`` runs each of them with both caches (``model.kv_cache``;
llama.cpp's cache is F16): at long contexts, e.g. ``--new-tokens 384 --batches 8``, the cache is a
large part of what a step reads.

Runs in its own environment (llama-cpp-python is built from source there, never in CI's):

    flock /work/cpu.lock bash benchmarks/llamacpp/setup.sh        # once: benchmarks/.venv-llamacpp
    benchmarks/.venv-llamacpp/bin/python benchmarks/bench_llamacpp.py
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import common

ROOT = Path(__file__).resolve().parent.parent
LLAMA_TYPES = ("F32", "F16", "Q8_0")
MODES = ("greedy", "top_p")
PEERS = (("float32", "F32"), ("bf16", "F16"), ("int8", "Q8_0"), ("w8a8", "Q8_0"))  # the ratios printed


MODELS = {"gpt2": "GPT-2 124M shape", "llama": "a small Llama shape (tools/export_gguf.py llama-random: 200M parameters)"}


def gguf_files(folder: Path, seed: int, model: str = "gpt2") -> dict[str, Path]:
    """The random model (``gpt2`` or ``llama``) in every type, written once (the same seed: the same weights)."""
    files = {}
    for kind in LLAMA_TYPES:
        path = folder / f"{model}-random-seed{seed}-{kind.lower()}.gguf"
        if not path.is_file():
            tool = [sys.executable, str(ROOT / "tools" / "export_gguf.py"), f"{model}-random", str(path)]
            subprocess.run([*tool, "--type", kind, "--seed", str(seed)], check=True)
        files[kind] = path
    return files


def bandwidth(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s: the best of ``repeats`` copies of a ``mib`` MiB tensor (read + write)."""
    torch.set_num_threads(threads)
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def decodekit_models(f32: Path, formats: list[str], kv_caches: list[str]) -> dict[str, Any]:
    """decodekit's contenders from the F32 file: ``decodekit <format>`` for each weight format (where
    load_model has ``weights``), ``decodekit <format> kv=<cache>`` for each cache but ``auto``."""
    from decodekit.models import load_model

    settings = inspect.signature(load_model).parameters
    models = {}
    for weights in formats:
        if weights != "float32" and "weights" not in settings:
            continue
        for kv in kv_caches:
            if kv != "auto" and "kv_cache" not in settings:
                continue
            kwargs = ({"weights": weights} if weights != "float32" else {}) | ({"kv_cache": kv} if kv != "auto" else {})
            models[f"decodekit {weights}" + (f" kv={kv}" if kv != "auto" else "")] = load_model(f32, device="cpu", **kwargs)[0]
    return models


def peer(name: str) -> str:
    """The llama.cpp type a decodekit contender is measured against: its weights' size."""
    return dict(PEERS)[name.split()[1]]


def kernels_line() -> str:
    """Which kernels decodekit's one-row products took (load_model's default, kernels=auto)."""
    try:
        from decodekit.kernels import native_kernels
    except ImportError:  # a version before the native kernels
        return "decodekit kernels: library"
    found, why_not = native_kernels()
    return f"decodekit kernels: {'native (decodekit/kernels)' if found else f'library ({why_not})'}"


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes read per token at batch 1: every weight once, the position and token tables excepted
    (one row each; a tied float32 head is counted under its own name, a converted head is its own copy)."""
    seen, total = set(), 0
    for name, t in model.state_dict().items():
        if "wpe" not in name and "wte" not in name and "tok_embeddings" not in name and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def file_bytes(path: Path) -> int:
    from decodekit.models.gguf import GGUFFile

    tensors = GGUFFile(path).reader.tensors
    skip = {"position_embd.weight"} | ({"token_embd.weight"} if any(t.name == "output.weight" for t in tensors) else set())
    return sum(t.n_bytes for t in tensors if t.name not in skip)  # an untied token table: one row a token


def architecture_checks(folder: Path, runner: Any) -> list[str]:
    """Greedy tokens of small random GPT-2 and Llama models (F32 GGUF), decodekit against llama.cpp."""
    import decodekit
    from decodekit.models import GPT, GPTConfig, load_model
    from decodekit.models.gguf_export import write_gguf
    from decodekit.models.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    llama = Llama(LlamaConfig(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=128))
    for p in llama.parameters():  # a trained model's scale, not torch's default init
        torch.nn.init.normal_(p, std=0.1) if p.dim() > 1 else torch.nn.init.normal_(p, mean=1.0, std=0.1)
    gpt = GPT(GPTConfig(block_size=128, vocab_size=512, n_layer=2, n_head=4, n_embd=64))
    ids = torch.randint(0, 511, (1, 12), generator=torch.Generator().manual_seed(1))
    lines = []
    for name, model in (("gpt2", gpt), ("llama (4 heads, 2 key/value heads)", llama)):
        path = write_gguf(model.eval(), folder / f"check-{name.split()[0]}-f32.gguf")
        theirs = runner(path, batch=1, length=44, threads=1)
        same = first_divergence(decodekit.generate(load_model(path, device="cpu")[0], ids, max_new_tokens=32).tokens.tolist(),
                                theirs.generate(ids.tolist(), 32, "greedy"))  # fmt: skip
        theirs.close()
        lines.append(f"small random {name}, F32, 32 greedy tokens: {same}")
    return lines


def first_divergence(a: list[list[int]], b: list[list[int]]) -> str:
    for row, (x, y) in enumerate(zip(a, b)):
        for pos, (s, t) in enumerate(zip(x, y)):
            if s != t:
                return f"row {row}, new token {pos}: decodekit {s}, llama.cpp {t}"
    return "identical"


def main() -> None:
    p = common.parser(__doc__.split("\n", 1)[0], repeats=3)
    p.add_argument("--thread-counts", default="1,2", help="thread counts to run, each for both sides")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    p.add_argument("--seed", type=int, default=0, help="the random weights")
    p.add_argument("--model", choices=sorted(MODELS), default="gpt2", help="the random model's shape")
    p.add_argument("--folder", type=Path, default=Path("/tmp/decodekit-bench-gguf"), help="where the GGUF files are kept")
    p.add_argument("--formats", default="float32,bf16,int8,w8a8", help="decodekit's weight formats (model.weights)")
    p.add_argument("--kv-cache", default="auto", help="decodekit's caches, e.g. auto,bf16 (model.kv_cache)")
    p.add_argument("--modes", default=",".join(MODES), help="greedy, top_p or both")
    args = p.parse_args()
    for option, given, allowed in (("--formats", args.formats, dict(PEERS)), ("--kv-cache", args.kv_cache, ("auto", "bf16")),
                                   ("--modes", args.modes, MODES)):  # fmt: skip
        if not set(given.split(",")) <= set(allowed):
            p.error(f"{option}={given}: each must be one of {', '.join(allowed)}")
    common.setup(args)
    from llamacpp.runner import LlamaCpp

    import decodekit
    from decodekit.processors import TopP
    from decodekit.samplers import Greedy, Multinomial

    thread_counts = [int(t) for t in args.thread_counts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    modes = args.modes.split(",")
    args.folder.mkdir(parents=True, exist_ok=True)
    files = gguf_files(args.folder, args.seed, args.model)
    ours = decodekit_models(files["F32"], args.formats.split(","), args.kv_cache.split(","))
    types = [k for k in LLAMA_TYPES if any(peer(name) == k for name in ours)]
    n, length = args.new_tokens, args.prompt + args.new_tokens
    theirs = {(k, b): LlamaCpp(files[k], batch=b, length=length, threads=1) for k in types for b in batches}
    vocab = next(iter(ours.values())).config.vocab_size
    ids = torch.randint(0, vocab - 1, (max(batches), args.prompt), generator=torch.Generator().manual_seed(1))

    # each format against the llama.cpp type of its size
    pairs = [(name, f"llama.cpp {peer(name)}") for name in ours]
    rows, checks, speeds = [], architecture_checks(args.folder, LlamaCpp), {}
    for threads in thread_counts:
        for runner in theirs.values():
            runner.set_threads(threads)
        for batch in batches:
            prompt = ids[:batch]
            for mode in modes:
                torch.set_num_threads(threads)
                outputs: dict[str, list[list[int]]] = {}
                processors, sampler = (TopP(0.9), Multinomial()) if mode == "top_p" else (None, Greedy())

                def ours_run(model: Any, key: str) -> Callable[[], None]:
                    def run() -> None:
                        out = decodekit.generate(model, prompt, processors=processors, sampler=sampler, max_new_tokens=n, seed=0)
                        outputs[key] = out.tokens.tolist()
                    return run  # fmt: skip

                def theirs_run(kind: str, key: str) -> Callable[[], None]:
                    def run() -> None:
                        outputs[key] = theirs[kind, batch].generate(prompt.tolist(), n, mode)
                    return run  # fmt: skip

                contenders = {k: ours_run(m, k) for k, m in ours.items()}
                contenders |= {f"llama.cpp {k}": theirs_run(k, f"llama.cpp {k}") for k in types}
                times = common.round_robin(contenders, repeats=args.repeats, warmup=args.warmup)
                tps = {k: batch * n / t.median for k, t in times.items()}
                speeds[threads, batch, mode] = tps
                line = ", ".join(f"{k} {v:.1f}" for k, v in tps.items())
                print(f"threads {threads}, batch {batch}, {mode}: tok/s {line}", flush=True)
                rows.append([threads, batch, mode, *(f"{v:.1f}" for v in tps.values()),
                             *(f"{tps[ours_k] / tps[theirs_k]:.2f}x" for ours_k, theirs_k in pairs)])  # fmt: skip
                if mode == "greedy" and "decodekit float32" in outputs:
                    for key in outputs:
                        if key.startswith("llama.cpp"):
                            same = first_divergence(outputs["decodekit float32"], outputs[key])
                            checks.append(f"threads {threads}, batch {batch}: decodekit float32 vs {key}: {same}")
    print("\n".join(checks))

    names = [*ours, *(f"llama.cpp {k}" for k in types)]
    header = ["threads", "batch", "mode", *(f"{k} tok/s" for k in names),
              *(f"{a.removeprefix('decodekit ')} / {b.removeprefix('llama.cpp ')}" for a, b in pairs)]  # fmt: skip
    sizes = {k: model_bytes(m) for k, m in ours.items()} | {f"llama.cpp {k}": file_bytes(files[k]) for k in types}
    bound_rows = []
    for threads in thread_counts:
        bw = bandwidth(threads)
        for name in names:
            bound = bw / sizes[name]
            got = speeds[threads, 1, "greedy"][name] if 1 in batches and "greedy" in modes else float("nan")
            bound_rows.append([threads, f"{bw / 1e9:.1f}", name, f"{sizes[name] / 2**20:.0f}", f"{bound:.1f}",
                               f"{got:.1f}", f"{got / bound:.0%}"])  # fmt: skip
    body = "\n\n".join([
        common.table(header, rows),
        "Greedy tokens against llama.cpp:\n\n" + "\n".join(f"- {c}" for c in checks),
        "Physical bound at batch 1 (greedy): each token reads every weight once.\n\n" + common.table(
            ["threads", "copy bandwidth GB/s", "contender", "weights MiB read per token", "bound tok/s",
             "measured tok/s", "fraction of bound"], bound_rows),
    ])  # fmt: skip
    import llama_cpp

    args.threads = " and ".join(map(str, thread_counts))
    common.report(
        "decodekit against llama.cpp on the same GGUF weights (bench_llamacpp.py)", args, body,
        setup_lines=[f"model: {MODELS[args.model]}, random weights (seed {args.seed}), GGUF F32 / F16 / Q8_0; "
                     f"prompt {args.prompt} tokens, {n} new tokens; llama-cpp-python {llama_cpp.__version__}",
                     kernels_line(), f"decodekit's key/value cache: {args.kv_cache} (model.kv_cache); llama.cpp's: F16, its default"],
    )  # fmt: skip
    for runner in theirs.values():
        runner.close()


if __name__ == "__main__":
    main()
