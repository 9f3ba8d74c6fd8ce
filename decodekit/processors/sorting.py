"""Sorting the vocabulary dimension, fast on CPU.

torch's CPU sort of ``[B, V]`` logits is a comparison sort per row that also moves indices; numpy's
(2.x) sorts with vectorised networks (AVX-512 or AVX2 where the CPU has them). On GPT-2's 50,257
tokens at batch 8 (2-core AVX-512 machine): values 1.7 ms against 19 ms, values with their order
5.9 ms against 17 ms. The sorted values are the same whoever sorts; the order of tied values may
differ, which no filter here depends on (each keeps tie groups whole). Elsewhere (GPU, float16 /
bfloat16, autograd, inside ``torch.compile``) ``torch.sort`` runs.

:func:`nucleus_by_bins` finds a top-p nucleus sorting only the logits near each row's cut: on
GPT-2's vocabulary at batch 8, 1.4 ms against 9.1 ms for the sort-based
:func:`~decodekit.processors.truncation.nucleus_by_sort` (one thread, a 2-core AMD EPYC whose
numpy sort of ``[8, 50257]`` takes 8 ms).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

_NUMPY_DTYPES = (torch.float32, torch.float64)


def _on_numpy(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu" and x.dtype in _NUMPY_DTYPES and not x.requires_grad
        and x.dim() > 0 and not torch.compiler.is_compiling()
    )  # fmt: skip


def sort_values(x: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
    """``torch.sort(x, dim=-1).values``: ascending along the last dimension. With a
    ``workspace``, on CPU the result is its buffer, sorted in place (nothing allocated)."""
    if not _on_numpy(x):
        return torch.sort(x, dim=-1).values
    if workspace is None:
        return torch.from_numpy(np.ascontiguousarray(np.sort(x.numpy(), axis=-1)))
    out = workspace.buffer("sorted", x.shape, x.dtype, x.device)
    np.copyto(out.numpy(), x.numpy())
    out.numpy().sort(axis=-1)
    return out


class Workspace:
    """Buffers kept from one decoding step to the next, so that a step's sort and sums allocate
    nothing (a fresh ``[B, V]`` array each step costs page faults: in a decoding loop, about as
    much as the arithmetic). Per user of it (a filter, a sampler); copies and pickles start empty.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}

    def buffer(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor kept under ``name`` for this shape, dtype and device."""
        key = (name, tuple(shape), dtype, device)
        found = self._buffers.get(key)
        if found is None:
            if len(self._buffers) >= 8:  # shapes change (another batch size): keep the newest only
                self._buffers.clear()
            found = self._buffers[key] = torch.empty(tuple(shape), dtype=dtype, device=device)
        return found

    def __getstate__(self) -> dict[str, Any]:
        return {"_buffers": {}}


def sort_with_order(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of ``torch.sort(x, dim=-1)``: ascending along the last dimension
    (tied values' indices in either order)."""
    if not _on_numpy(x):
        values, order = torch.sort(x, dim=-1)
        return values, order
    a = x.numpy()
    order = np.argsort(a, axis=-1)
    values = np.ascontiguousarray(np.take_along_axis(a, order, axis=-1))
    return torch.from_numpy(values), torch.from_numpy(np.ascontiguousarray(order)).long()


BINS = 1024  # value bins per row of :func:`nucleus_by_bins`
SPAN = 64.0  # logits further than this below a row's top share its last bin (probability < 1e-27)
MAX_CANDIDATES = 1 / 8  # more than this share of the logits in the crossing bins: sort instead


def nucleus_by_bins(
    x: torch.Tensor, tail: torch.Tensor, min_keep: int = 1, workspace: Workspace | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(floor, lse)`` of each row's top-p nucleus (see
    :func:`~decodekit.processors.truncation.nucleus_bounds`) without sorting the vocabulary; or
    ``None`` where this does not apply (not on CPU, a logit not finite at the top, too many
    candidates, a row the binned sums cannot decide), and the caller sorts.

    ``x``: float32 ``[B, V]``; ``tail``: ``[B, 1]`` (``1 - p``). Each row's logits are put into
    ``BINS`` equal bins of value below its largest (ties share a bin); one pass sums each bin's
    probability, which gives the bin where the ascending cumulative mass crosses ``tail``; only
    that bin's logits (a few hundred in a row of 50,257 random ones) are sorted, with their row
    as the high bits of the sort key, to find the exact crossing token. The three ``[B, V]``
    buffers are the ``workspace``'s. On GPT-2's vocabulary at batch 8 this is several times
    cheaper than sorting it (benchmarks/bench_logprobs.py).
    """
    if not _on_numpy(x) or x.dim() != 2 or x.dtype != torch.float32:
        return None
    a = np.ascontiguousarray(x.numpy())
    b, v = a.shape
    top = a.max(axis=1, keepdims=True)  # [B, 1]
    if not np.isfinite(top).all():
        return None
    per_bin, bin_of = _bin_masses(a, top, workspace or Workspace())  # [B, BINS] float64, [B, V]
    smaller = per_bin[:, ::-1].cumsum(axis=1)[:, ::-1] - per_bin  # [B, BINS] mass of the bins below each
    total = smaller[:, :1] + per_bin[:, :1]
    t = tail.double().numpy().reshape(b, 1)
    all_kept = t[:, 0] == 0  # p = 1 removes nothing
    cut = t[:, 0] * total[:, 0]  # [B]
    crossing = np.where(all_kept, -1, np.minimum((smaller > cut[:, None]).sum(axis=1), BINS - 1))  # [B] the bin where the mass crosses
    where = np.flatnonzero(bin_of == crossing[:, None])  # the crossing bins' logits, row by row
    if where.size > MAX_CANDIDATES * a.size:
        return None
    rows = where // v
    counts = np.bincount(rows, minlength=b)
    start = counts.cumsum() - counts  # [B] each row's first candidate
    values = np.append(_sorted_by_row(a.ravel()[where], rows), np.float32(0))  # ascending within each row; one spare
    running = np.append(np.exp(values[:-1] - top[rows, 0]).astype(np.float64).cumsum(), 0.0)  # spare: index -1
    before = running[start - 1] * (start > 0)  # [B] the running sum before each row's first candidate
    inside = running[:-1] - before[rows]  # the mass up to each candidate, within its row's bin
    under = smaller[np.arange(b), np.maximum(crossing, 0)]  # [B] mass of the bins under the crossing one
    removed = np.bincount(rows, weights=under[rows] + inside <= cut[rows], minlength=b).astype(np.int64)
    if not ((removed < counts) | all_kept).all():  # the bins' sums and the candidates' disagree at the edge
        return None
    floor = np.where(all_kept, a.min(axis=1), values[np.minimum(start + removed, values.size - 1)])  # [B]
    tied = np.bincount(rows, weights=values[:-1] < floor[rows], minlength=b).astype(np.int64)  # kept from here
    above = per_bin.cumsum(axis=1) - per_bin  # [B, BINS] the mass of the bins over each
    last = np.maximum(start + counts - 1, 0)
    in_bin = running[last] - np.where(tied > 0, running[start + tied - 1], before)  # kept mass in the crossing bin
    kept = np.where(all_kept, total[:, 0], above[np.arange(b), np.maximum(crossing, 0)] + in_bin)
    if min_keep > 1 and bool(((a >= floor[:, None]).sum(axis=1) < min_keep).any()):
        return None
    lse = top[:, 0] + np.log(kept).astype(np.float32)
    return torch.from_numpy(floor[:, None].astype(np.float32)), torch.from_numpy(lse[:, None])


def _bin_masses(a: np.ndarray, top: np.ndarray, workspace: Workspace) -> tuple[np.ndarray, np.ndarray]:
    """Each row's logits ``a`` in ``BINS`` equal bins of value from its ``top`` down to its smallest
    (at most ``SPAN`` below; bin 0 holds the top, the last everything further down): the
    probability mass of each bin (times the row's normaliser) ``[B, BINS]``, and each logit's bin."""
    b, v = a.shape
    low = np.maximum(a.min(axis=1, keepdims=True), top - SPAN)
    scale = (BINS / np.maximum(top - low, np.float32(1e-30))).astype(np.float32)
    d, mass, bin_of = (workspace.buffer(name, (b, v), dtype, torch.device("cpu"))
                       for name, dtype in (("d", torch.float32), ("mass", torch.float32), ("bin", torch.int64)))  # fmt: skip
    dn, mn = d.numpy(), mass.numpy()
    np.subtract(top, a, out=dn)  # >= 0 (inf for -inf logits)
    np.negative(dn, out=mn)
    np.exp(mn, out=mn)  # each token's probability times the row's normaliser
    with np.errstate(over="ignore"):  # far below the top: the last bin
        np.multiply(dn, scale, out=dn)
    d.clamp_(max=BINS - 1)  # (torch: 4x numpy's minimum here)
    bin_of.copy_(d)
    per_bin = torch.zeros(b, BINS).scatter_add_(1, bin_of, mass).numpy().astype(np.float64)
    return per_bin, bin_of.numpy()


def _sorted_by_row(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``values`` (float32) sorted ascending within each row, rows in order: one sort of 64-bit
    keys, the row in the high half and the value's bits, made to order as the numbers, in the low."""
    bits = values.view(np.uint32)
    ordered = np.where(bits >> 31 != 0, ~bits, bits | np.uint32(1 << 31))  # -0.0 before +0.0; equal values either way
    keys = np.sort((rows.astype(np.uint64) << np.uint64(32)) | ordered.astype(np.uint64))
    low = (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    return np.where(low >> 31 != 0, low & np.uint32(0x7FFFFFFF), ~low).view(np.float32)
