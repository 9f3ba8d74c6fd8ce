"""Per-row settings: validating one value per row, and the tensors that hold them.

A processor built per row keeps each setting as a ``[B]`` tensor (float64 for floats, so each
value is the exact Python float a scalar-built processor would hold; cast to float32 at the call,
as torch casts a Python scalar) and the names of those tensors in ``row_fields``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from decodekit.errors import ConfigError


def is_row_list(value: Any) -> bool:
    """Whether ``value`` gives one value per row: a list, tuple or 1-D tensor."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 1
    return isinstance(value, (list, tuple))


def row_values(value: Any, check: Callable[[Any], Any]) -> list[Any]:
    """Each row's value checked by ``check``; a bad one raises naming its row: ``row 3: top_p=1.5 ...``."""
    items = value.tolist() if isinstance(value, torch.Tensor) else list(value)  # host values, read once
    if not items:
        raise ConfigError(f"per-row values: {value!r} is empty; give one value per row")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(check(item))
        except ConfigError as exc:
            raise ConfigError(f"row {i}: {exc}") from None
    return out


def is_sequences_per_row(value: Any) -> bool:
    """Whether a setting that lists token sequences (``bad_words``) gives one list per row:
    every item is itself a list of sequences (``[[[5], [1, 2]], []]``)."""
    return (
        isinstance(value, (list, tuple))
        and bool(value)
        and all(isinstance(row, (list, tuple)) and all(isinstance(s, (list, tuple)) for s in row) for row in value)
    )


def padded_sequences(rows: Sequence[Sequence[Sequence[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's token sequences as ``[B, K, L]`` ids (``-1`` past each end) and ``[B, K]``
    lengths (0 where a row has fewer than ``K`` sequences): matched for all rows at once."""
    k = max(1, max(len(row) for row in rows))
    width = max(1, max((len(s) for row in rows for s in row), default=1))
    words = torch.full((len(rows), k, width), -1, dtype=torch.long)
    lengths = torch.zeros((len(rows), k), dtype=torch.long)
    for b, row in enumerate(rows):  # host packing, at construction
        for j, s in enumerate(row):
            words[b, j, : len(s)] = torch.tensor(list(s), dtype=torch.long)
            lengths[b, j] = len(s)
    return words, lengths


def float_rows(values: Sequence[float]) -> torch.Tensor:
    """``[B]`` float64: the exact values (cast to float32 where used, as a Python scalar would be)."""
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


def int_rows(values: Sequence[int]) -> torch.Tensor:
    return torch.tensor([int(v) for v in values], dtype=torch.long)


def column(values: torch.Tensor, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[B, 1]`` on ``like``'s device, in ``dtype`` (default float32 for floating values)."""
    if dtype is None:
        dtype = torch.float32 if values.is_floating_point() else values.dtype
    return values.to(device=like.device, dtype=dtype)[:, None]


def pad_to(values: torch.Tensor, shape: Sequence[int], fill: Any) -> torch.Tensor:
    """``values`` padded with ``fill`` at the end of every dimension after the first, to ``shape[1:]``."""
    if tuple(values.shape[1:]) == tuple(shape[1:]):
        return values
    out = torch.full((values.shape[0], *shape[1:]), fill, dtype=values.dtype, device=values.device)
    out[tuple(slice(0, n) for n in values.shape)] = values
    return out


def common_shape(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    """The elementwise largest of two shapes (the first dimension is ``a``'s)."""
    return [a.shape[0], *(max(x, y) for x, y in zip(a.shape[1:], b.shape[1:]))]


def real_tokens(input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: positions holding a token (negative ids are padding, never tokens)."""
    return input_ids >= 0


def prompt_lengths(input_ids: torch.Tensor) -> torch.Tensor:
    """``[B]`` long: tokens per row of a prompt (negative ids, padding, not counted)."""
    return real_tokens(input_ids).sum(dim=-1)


def generated_mask(input_ids: torch.Tensor, prompt_length: torch.Tensor | int | None) -> torch.Tensor:
    """``[B, T]`` bool: the positions generated after the prompt (the last ``n_b`` columns of row ``b``).

    ``n_b = (input_ids[b] >= 0).sum() - prompt_length[b]``; without ``begin`` (``None``) every
    real token counts.
    """
    real = real_tokens(input_ids)
    if prompt_length is None:
        return real
    t = input_ids.shape[-1]
    generated = real.sum(dim=-1) - _on(prompt_length, input_ids)  # [B]
    position = torch.arange(t, device=input_ids.device)
    return (position[None, :] >= (t - generated)[:, None]) & real


def generated_count(input_ids: torch.Tensor, prompt_length: torch.Tensor | int | None) -> torch.Tensor:
    """``[B]`` long: tokens generated so far per row (see :func:`generated_mask`)."""
    real = real_tokens(input_ids).sum(dim=-1)
    return real if prompt_length is None else real - _on(prompt_length, input_ids)


def _on(value: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor | int:
    return value.to(like.device) if isinstance(value, torch.Tensor) else value
