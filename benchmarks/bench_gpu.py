"""GPU: decodekit's static-cache decoding (CUDA graph) against transformers' generate, eager and static+compiled.

The one prepared script of issue 17 for a machine with a CUDA GPU (CI never runs it). In one run:

1. correctness: a small native GPT and Llama (float32) decode the same greedy tokens on the CPU,
   on the device with the default cache and on the device with ``static_cache=True``, with a
   float32 and with a bfloat16 key/value cache (``kv_cache="bf16"``); GPT-2 124M
   (random weights, bf16) against transformers' greedy tokens on the same weights, the first
   divergence reported where their kernels differ;
2. no host sync in the steady state: a static-cache run with ``check_every`` beyond its length
   under ``torch.cuda.set_sync_debug_mode("error")`` from its third step to its last;
3. speed: GPT-2 124M (same weights both sides) and a Llama-shaped ~1B (random weights, the same
   shape each side; native Llama for decodekit), bf16, 128 new tokens, batch 1 / 8 / 64, greedy and
   top-p 0.9: tokens/s of decodekit (default cache; static cache), transformers ``generate`` eager
   and with ``cache_implementation="static"`` (which compiles the forward), time to first token,
   peak memory, and at batch 1 the fraction of the bandwidth bound (weight bytes per token over a
   measured device copy).

    python benchmarks/bench_gpu.py --models "GPT-2 124M"        # on the GPU machine: ~5 minutes
    python benchmarks/bench_gpu.py --models "Llama-shaped ~1B"  # the second call (each compiles 3 shapes)
    python benchmarks/bench_gpu.py --device cpu --quick         # checks the script itself on CPU

On CPU there is no CUDA graph and no compile (``--quick`` also shrinks the models and sizes).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

import common

TARGETS = "decodekit static >= 2x transformers static+compiled at batch 1, >= 1.2x at batch 64; top-p within 10% of greedy"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls after one warm-up, and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], out


def first_divergence(a: torch.Tensor, b: torch.Tensor) -> str:
    differ = (a != b).nonzero()
    if not len(differ):
        return "identical"
    row, col = differ[0].tolist()
    return f"first divergence at row {row}, new token {col}: {int(a[row, col])} vs {int(b[row, col])}"


def correctness(device: torch.device) -> list[str]:
    import decodekit
    from decodekit.models.cache import set_kv_cache
    from decodekit.models.gpt import GPT, GPTConfig
    from decodekit.models.llama import Llama, LlamaConfig

    lines = []
    torch.manual_seed(0)
    small = {
        "GPT": GPT(GPTConfig(block_size=128, vocab_size=512, n_layer=4, n_head=4, n_embd=128)).eval(),
        "Llama": Llama(LlamaConfig(vocab_size=512, block_size=128, n_layer=4, n_head=8, n_kv_head=2, n_embd=128, intermediate_size=256)).eval(),
    }
    ids = torch.randint(0, 512, (4, 12), generator=torch.Generator().manual_seed(1))
    for name, model in small.items():
        for kv_cache in ("auto", "bf16"):  # bf16: keys and values rounded as written (model.kv_cache=bf16)
            set_kv_cache(model.cpu(), kv_cache)
            cpu = decodekit.generate(model, ids, max_new_tokens=48).tokens
            on = model.to(device)
            dynamic = decodekit.generate(on, ids.to(device), max_new_tokens=48).tokens.cpu()
            static = decodekit.generate(on, ids.to(device), max_new_tokens=48, static_cache=True).tokens.cpu()
            lines.append(f"small {name} float32, kv_cache={kv_cache}, 48 greedy tokens at batch 4: {device} default vs CPU "
                         f"{first_divergence(dynamic, cpu)}; {device} static vs CPU {first_divergence(static, cpu)}")  # fmt: skip
        set_kv_cache(model, "auto")
    return lines


def sync_free(device: torch.device, model: Any, ids: torch.Tensor, n: int) -> str:
    """Whether a static-cache run's steady state (steps 3 to n) makes no host-device sync."""
    import decodekit

    if device.type != "cuda":
        return "no host sync in the steady state: not checked (needs CUDA)"

    def watch(step: int, tokens: torch.Tensor, finished: torch.Tensor) -> None:
        torch.cuda.set_sync_debug_mode("error" if 2 <= step < n - 1 else "default")

    try:
        decodekit.generate(model, ids, max_new_tokens=n, static_cache=True, check_every=n + 1, on_token=watch)
        return f"no host sync in the steady state: yes (steps 3 to {n - 1} under set_sync_debug_mode('error'))"
    except RuntimeError as e:
        return f"no host sync in the steady state: NO ({str(e).splitlines()[0]})"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def models(args: argparse.Namespace, device: torch.device) -> dict[str, tuple[Any, Any, int]]:
    """name -> (decodekit model, transformers model, weight bytes read per token)."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    from decodekit.models.llama import Llama, LlamaConfig

    small = dict(n_layer=2, n_embd=128, n_head=4) if args.quick else {}
    hf = common.random_gpt2(args.seed, **small)
    gpt = (common.native_copy(hf).to(device, args.dtype).eval(), hf.to(device, args.dtype).eval())
    shape = dict(hidden=256, inter=512, layers=2, heads=8, kv=2, vocab=32000) if args.quick else \
        dict(hidden=2048, inter=5632, layers=16, heads=32, kv=8, vocab=32000)  # fmt: skip
    torch.manual_seed(args.seed)
    with torch.device(device):  # a billion parameters initialise in seconds there, in minutes on a CPU
        hf_llama = LlamaForCausalLM(HFLlamaConfig(
            hidden_size=shape["hidden"], intermediate_size=shape["inter"], num_hidden_layers=shape["layers"],
            num_attention_heads=shape["heads"], num_key_value_heads=shape["kv"], vocab_size=shape["vocab"],
            max_position_embeddings=1024)).to(args.dtype).eval()  # fmt: skip
        native_llama = Llama(LlamaConfig(vocab_size=shape["vocab"], block_size=1024, n_layer=shape["layers"], n_head=shape["heads"],
                                         n_kv_head=shape["kv"], n_embd=shape["hidden"], intermediate_size=shape["inter"]))  # fmt: skip
        native_llama = native_llama.to(args.dtype).eval()
    hf_llama.generation_config.eos_token_id, hf_llama.generation_config.pad_token_id = None, 0

    def weight_bytes(m: Any) -> int:  # read once per token: all but the input embeddings (GPT-2's wte is its head)
        return sum(p.numel() * p.element_size() for n, p in m.named_parameters() if "wpe" not in n and "embed_tokens" not in n)

    return {"GPT-2 124M": (*gpt, weight_bytes(gpt[1])), "Llama-shaped ~1B": (native_llama, hf_llama, weight_bytes(hf_llama))}


def contenders(ours: Any, theirs: Any, ids: torch.Tensor, n: int, mode: str) -> dict[str, Callable[[int], Any]]:
    import decodekit
    from decodekit.processors import TopP
    from decodekit.samplers import Multinomial

    ours_kw = dict(processors=[TopP(0.9)], sampler=Multinomial(), seed=0) if mode == "top_p" else {}
    theirs_kw = dict(do_sample=True, top_p=0.9, top_k=0) if mode == "top_p" else dict(do_sample=False)
    mask = torch.ones_like(ids)

    def hf(cache: str | None) -> Callable[[int], Any]:
        extra = {} if cache is None else {"cache_implementation": cache}
        return lambda k: theirs.generate(ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, **theirs_kw, **extra)[:, ids.shape[1]:]

    return {
        "decodekit default": lambda k: decodekit.generate(ours, ids, max_new_tokens=k, **ours_kw).tokens,
        "decodekit static": lambda k: decodekit.generate(ours, ids, max_new_tokens=k, static_cache=True, **ours_kw).tokens,
        "transformers eager": hf(None),
        "transformers static+compiled": hf("static"),
    }


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a device copy of 1 GiB (256 MiB on CPU), counting bytes read."""
    x = torch.empty(2**28 if device.type == "cuda" else 2**26, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    seconds, _ = timed(lambda: y.copy_(x), device, 5)
    return x.numel() * 4 / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default="GPT-2 124M,Llama-shaped ~1B")
    p.add_argument("--quick", action="store_true", help="small models and sizes: check the script, not the speed")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    args.dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    n = 8 if args.quick else args.new_tokens
    batches = [1, 2] if args.quick else [int(b) for b in args.batches.split(",")]

    lines = correctness(device)
    built = models(args, device)
    gpt, hf_gpt, _ = built["GPT-2 124M"]
    ids = torch.randint(0, 1000, (2, args.prompt), generator=torch.Generator().manual_seed(2)).to(device)
    check = contenders(gpt, hf_gpt, ids, 32, "greedy")
    agree = first_divergence(check["decodekit static"](32).cpu(), check["transformers eager"](32).cpu())
    lines.append(f"GPT-2 124M {args.dtype}, 32 greedy tokens at batch 2, decodekit static vs transformers eager: {agree}")
    lines.append(sync_free(device, gpt, ids, 32))

    bandwidth = copy_bandwidth(device)
    rows = []
    for name in args.models.split(","):
        ours_model, theirs_model, weight_bytes = built[name]
        for batch in batches:
            prompt = torch.randint(0, 1000, (batch, args.prompt), generator=torch.Generator().manual_seed(3)).to(device)
            for mode in ("greedy", "top_p"):
                for side, fn in contenders(ours_model, theirs_model, prompt, n, mode).items():
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    seconds, _ = timed(lambda fn=fn: fn(n), device, args.repeats)
                    # a 1-token generate; not for the compiled side, whose static cache would take
                    # other shapes and compile again (its first token is in its tok/s anyway)
                    first = float("nan") if "compiled" in side else timed(lambda fn=fn: fn(1), device, args.repeats)[0]
                    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
                    tok_s = batch * n / seconds
                    bound = f"{tok_s / (bandwidth / weight_bytes):.0%}" if batch == 1 else ""
                    rows.append([name, batch, mode, side, f"{tok_s:.1f}", f"{first * 1e3:.1f}", f"{peak:.0f}", bound])
    body = common.table(["model", "batch", "mode", "contender", "tok/s", "time to first token ms", "peak MiB", "of bound (batch 1)"], rows)
    body += "\n\n" + "\n".join(f"- {line}" for line in lines)
    body += f"\n- device copy bandwidth {bandwidth / 1e9:.0f} GB/s; targets: {TARGETS}"
    title = f"GPU decoding: decodekit static cache against transformers ({device}, {args.dtype})"
    setup = [f"{n} new tokens, prompt {args.prompt}, median of {args.repeats} runs after a warm-up; time to first token: a 1-token generate",
             f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else common.cpu_model()}"]  # fmt: skip
    if args.no_save:
        print(f"## {title}\n\n" + "\n".join(f"- {s}" for s in setup) + "\n\n" + body)
    else:
        args.threads = torch.get_num_threads()
        common.report(title, args, body, setup_lines=setup)


if __name__ == "__main__":
    main()
