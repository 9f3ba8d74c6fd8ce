"""decodekit's native CPU kernels for a step's few rows: built once on first use, library kernels otherwise.

A batch-1 decoding step on CPU is a chain of matrix-vector products, each streaming a weight
from memory once; the library kernels behind ``F.linear`` (MKL, oneDNN) reach a fraction of the
memory bandwidth there. ``cpu.cpp`` (next to this file) has AVX-512 kernels for 1 to 8 rows in each
weight format: float32, bfloat16 (AVX512-BF16), int8 weights (int16 inputs), and int8 x int8
(AVX512-VNNI). They read each weight row in order with two accumulators and split rows over
torch's thread pool. ``blocks.h`` builds on them: attention for one new position per row, and
a whole GPT or Llama step (embeddings, blocks, head) in one call for a step's 1 to 8
rows (the models gather and keep the arguments: :mod:`decodekit.models.native`). Three operators
serve the decoding loop once a process has loaded the kernels (:func:`logits_ops`,
:func:`loop_ops`): the greedy argmax, the invalid-logits check and the record of a step's tokens,
each with its torch version's answers.

Which kernels a model's few-row products take is the ``kernels`` setting:

- ``"auto"`` (the default): the native kernels where this CPU has AVX-512 (F, BW, VL, DQ) and
  they are built or can be built (a C++ compiler and ninja; the first build takes about ten
  seconds and is kept in the cache folder, ``$DECODEKIT_CACHE`` or ``~/.cache/decodekit``); the
  library kernels otherwise.
- ``"native"``: the native kernels, or one :class:`~decodekit.errors.ConfigError` line saying why
  not.
- ``"library"``: ``F.linear`` and the formats' library kernels only.

Rows on CPU, in float32, outside autograd and ``torch.compile``, take them up to each layer's
``native_rows`` (float32 4, the others 8: where they beat the library kernels); a longer
prefill, larger batches and everything on a GPU go as before. Each row is summed as it would be
alone, so its result does not depend on the batch. Results agree with the library kernels' to
float32 rounding (the sums run in another order), except ``int8``, whose native kernel rounds each
input row to int16 with its own scale (``max|x| / 32767``: closer to the float32 product than the
library kernel's bfloat16 input and output) and sums exactly in integers, and ``w8a8``, whose
results are the same bits (integer sums, the same scales).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import mmap
import os
import platform
import sys
from pathlib import Path
from typing import Any, Literal

import torch

from decodekit.errors import ConfigError

__all__ = ["KERNELS", "Kernels", "check_kernels", "huge_pages", "huge_zeros", "logits_ops", "loop_ops", "native_kernels",
           "use_kernels"]

logger = logging.getLogger("decodekit")

Kernels = Literal["auto", "native", "library"]
KERNELS: tuple[str, ...] = ("auto", "native", "library")

_SOURCE = Path(__file__).with_name("cpu.cpp")
_HEADERS = [Path(__file__).with_name("rows.h"), Path(__file__).with_name("blocks.h")]
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-fopenmp"]
_NEEDED = ("avx512f", "avx512bw", "avx512vl", "avx512dq")


class NativeKernels:
    """The loaded operators and what this CPU can run (``bf16``: AVX512-BF16, ``vnni``: AVX512-VNNI)."""

    def __init__(self, ops: Any, flags: set[str]) -> None:
        self.ops = ops
        self.bf16 = "avx512_bf16" in flags
        self.vnni = "avx512_vnni" in flags

    def __repr__(self) -> str:
        return f"NativeKernels(bf16={self.bf16}, vnni={self.vnni})"

    # one per process: copies of a model share it, and a pickled model loads it again
    def __copy__(self) -> NativeKernels:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> NativeKernels:
        return self

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _reloaded, ()


def _reloaded() -> NativeKernels | None:
    return native_kernels()[0]


_loaded: NativeKernels | None = None
_why_not: str | None = None  # set once loading has failed: the reason, and no second try


def check_kernels(kernels: object) -> str:
    """``kernels`` itself if it names a choice, else one :class:`ConfigError` line."""
    if kernels not in KERNELS:
        raise ConfigError(f"kernels={kernels!r} is not allowed: expected one of {', '.join(KERNELS)}")
    return kernels  # type: ignore[return-value]


def cpu_flags() -> set[str]:
    """This CPU's feature flags as Linux names them (empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cache_folder() -> Path:
    """Where built kernels are kept: ``$DECODEKIT_CACHE/kernels``, else ``~/.cache/decodekit/kernels``."""
    root = os.environ.get("DECODEKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "decodekit"
    )
    return Path(root) / "kernels"


def logits_ops(logits: torch.Tensor) -> Any:
    """The native operators for ``logits`` (``argmax_rows``, ``invalid_rows``) where this process has
    loaded the kernels already (a model took them) and ``logits`` is a contiguous float32 CPU matrix
    ``[B, V]``, ``V > 0``; else ``None``. Never builds or loads: their answers equal the torch
    versions', so where they run is a matter of speed only."""
    if (_loaded is None or logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.dim() != 2
            or not logits.shape[-1] or not logits.is_contiguous()):  # fmt: skip
        return None
    return _loaded.ops


def loop_ops(device: torch.device) -> Any:
    """The native operators for the decoding loop's bookkeeping (``settle_rows``) where this process
    has loaded the kernels already and the loop runs on CPU; else ``None`` (never builds or loads:
    the answers are the torch version's)."""
    return _loaded.ops if _loaded is not None and device.type == "cpu" else None


def native_kernels() -> tuple[NativeKernels | None, str | None]:
    """``(kernels, None)`` once the native kernels are loaded (built first if needed), else
    ``(None, why not)``. Tried once per process."""
    global _loaded, _why_not
    if _loaded is None and _why_not is None:
        try:
            _loaded = _load()
        except Exception as e:  # no compiler, no ninja, a failed build: the library kernels then
            _why_not = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    return _loaded, _why_not


def _load() -> NativeKernels:
    flags = cpu_flags()
    if platform.machine().lower() not in ("x86_64", "amd64") or not all(f in flags for f in _NEEDED):
        raise RuntimeError("this CPU lacks AVX-512 (F, BW, VL, DQ), which the native kernels need")
    source = b"".join(p.read_bytes() for p in (_SOURCE, *_HEADERS))
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), torch.__version__.encode(),
                                     sys.version.encode()])).hexdigest()[:16]  # fmt: skip
    name = f"decodekit_cpu_{key}"
    folder = cache_folder() / name
    library = folder / f"{name}.so"
    if not library.is_file():
        from torch.utils import cpp_extension

        folder.mkdir(parents=True, exist_ok=True)
        print(f"decodekit: building the native CPU kernels once (about 10 s), into {folder}", file=sys.stderr)
        cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=_FLAGS, build_directory=str(folder),
                           is_python_module=False, verbose=False)  # fmt: skip
    else:
        torch.ops.load_library(str(library))
    return NativeKernels(torch.ops.decodekit_cpu, flags)


def use_kernels(model: Any, kernels: str = "auto") -> Any:
    """Route ``model``'s few-row CPU products through the kernels ``kernels`` names; returns ``model``.

    With native kernels, every float32 :class:`~decodekit.models.packing.Linear` (plain
    ``nn.Linear`` layers become one, unpacked) stores its weight row-major, which they read in
    order, and every converted projection (:mod:`decodekit.models.weights`) gets them too. A model
    on a GPU, or one that is no torch module, is left as it is.
    """
    from torch import nn

    from decodekit.models.packing import Linear, row_major
    from decodekit.models.weights import converted_layers

    check_kernels(kernels)
    module = model if isinstance(model, nn.Module) else getattr(model, "model", None)
    if not isinstance(module, nn.Module):
        return model
    on_cpu = all(p.device.type == "cpu" for p in module.parameters()) and all(
        b.device.type == "cpu" for b in module.buffers()
    )
    found: NativeKernels | None = None
    if kernels != "library" and on_cpu:
        found, why_not = native_kernels()
        if found is None:
            if kernels == "native":
                raise ConfigError(f"kernels='native' is not available here: {why_not}; use kernels=auto or library")
            logger.info("decodekit: library CPU kernels (native ones unavailable: %s)", why_not)
    for layer in module.modules():
        if type(layer) is nn.Linear and found is not None:
            layer.__class__ = Linear
            layer.packing = False  # it was not packed before; only its few-row path changes
        if isinstance(layer, Linear):
            layer.kernels = found
    for layer in converted_layers(module):
        layer.use_kernels(found)
    if found is not None:
        row_major(module)
        huge_pages(module)
    return model


_HUGE = 2 << 20  # a transparent huge page on x86-64


@functools.cache
def huge_pages_available() -> bool:
    """Whether Linux hands out transparent huge pages to memory that asks (``always`` or ``madvise``);
    read once a process (every large cache asks)."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return hasattr(mmap, "MADV_HUGEPAGE") and ("[always]" in mode or "[madvise]" in mode)


def huge_block(nbytes: int) -> torch.Tensor:
    """``nbytes`` zero bytes (``uint8``) from a 2 MB boundary, in memory that asks Linux for 2 MB pages
    before its first touch (so they are made huge); the mapping lives as long as any view of it."""
    arena = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arena.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(arena, dtype=torch.uint8)
    start = -raw.data_ptr() % _HUGE
    return raw[start : start + nbytes]


HUGE_ZEROS = 8 << 20  # smaller tensors keep ordinary pages (a touched huge page is 2 MB zeroed)


def huge_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """A zero CPU tensor on 2 MB pages where Linux offers them and it takes ``HUGE_ZEROS`` bytes or more
    (``None`` otherwise). A key/value cache is read in short runs, one per row and head, each
    starting anew for the prefetchers; on 4 KB pages each run crosses a page every 4 KB (measured:
    12 layers of GPT-2 124M's attention at 8 rows of 200 positions, 8.6 ms on 4 KB pages, 6.6 on
    huge ones; a bfloat16 cache 5.8 and 4.7)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_ZEROS or not huge_pages_available():
        return None
    return huge_block(nbytes).view(dtype).view(shape)


def huge_pages(module: Any) -> int:
    """Move the weights ``module``'s native kernels stream into one block of memory backed
    by 2 MB pages; returns the bytes moved (0 where Linux has no transparent huge pages).

    A step streams every weight once, and with 4 KB pages the CPU's prefetchers stop at each
    page's end and the TLB misses every few rows: on the 2-core AMD EPYC development machine the
    same kernels read GPT-2 124M's bfloat16 weights at 31.6 GB/s from huge pages against 19.6 from
    plain ones on one thread (55 against 35 on two; float32 32 against 24, 59-61 against 45). The
    values, dtypes and shapes stay the same: a float32 layer's parameter (tied embeddings
    included) gets the new storage, a converted layer a new weight buffer; copies and pickles of
    the model get ordinary memory.
    """
    from torch import nn

    from decodekit.models.packing import Linear
    from decodekit.models.weights import converted_layers

    if not isinstance(module, nn.Module) or not huge_pages_available():
        return 0
    moves: list[tuple[Any, torch.Tensor]] = []  # (a parameter, or (buffers, key)), the tensor
    seen: set[int] = set()
    for layer in module.modules():
        if isinstance(layer, Linear) and layer.kernels is not None:
            found = layer._parameters["weight"]
            if id(found) not in seen:
                seen.add(id(found))
                moves.append((found, found.data))
    for layer in converted_layers(module):
        if layer.kernels is not None:
            moves.append(((layer._buffers, "weight"), layer._buffers["weight"]))
    moves = [(where, t) for where, t in moves if t.device.type == "cpu" and t.is_contiguous() and t.numel()]
    offsets, total = [], 0
    for _, t in moves:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // 64) * 64  # each tensor on a cache line
    if total == 0:
        return 0
    block = huge_block(total)
    for (where, t), offset in zip(moves, offsets):
        n = t.numel() * t.element_size()
        moved = block[offset : offset + n].view(t.dtype).view(t.shape)
        moved.copy_(t)
        if isinstance(where, nn.Parameter):
            where.data = moved
        else:
            where[0][where[1]] = moved
    return total
