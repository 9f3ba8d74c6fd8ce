"""The DRY ("Don't Repeat Yourself") repetition penalty, with llama.cpp's semantics, as tensors."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from decodekit.errors import ConfigError
from decodekit.processors.base import BuildContext, LogitsProcessor, to_dtype
from decodekit.validation import token_sequences, validate

DEFAULT_SEQUENCE_BREAKERS = ["\n", ":", '"', "*"]

# llama.cpp's bound on the exponent: about log(float32 max), as a float32 constant
_FLOAT_MAX_LOG = 88.7228391
_BLOCK = 64  # match lengths examined per pass; a longer repeat takes another pass


class DRY(LogitsProcessor):
    """Penalise tokens that would extend a sequence already repeated in the context.

    Let ``L(i)`` be the length of the longest suffix of the context that also ends just before an
    earlier occurrence of token ``i`` (so emitting ``i`` would repeat ``L(i) + 1`` tokens). If
    ``L(i) >= allowed_length``::

        x_i' = x_i - multiplier * base ** (L(i) - allowed_length)

    Repeats are looked for among the last ``penalty_last_n`` tokens (-1: the whole context, prompt
    included; 0: off). A *sequence breaker* (a token sequence, by default the tokens of ``"\\n"``,
    ``":"``, ``'"'`` and ``"*"``) cuts repeats: a suffix never reaches back past the most recent
    breaker, and a one-token breaker is never penalised itself. ``multiplier = 0`` turns DRY off;
    typical values: multiplier 0.8, base 1.75, allowed length 2.

    llama.cpp's ``llama_sampler_dry`` semantics (from koboldcpp, by pi6am), computed for all
    rows at once by comparing the context with shifted copies of itself instead of llama.cpp's
    per-sequence Z-algorithm. As in llama.cpp, the exponent is clamped at
    ``int(88.7228391 / log(base))`` computed in float32 (:func:`max_exponent`: 128 at base 2,
    158 at base 1.75), and the penalty is computed in double precision and then rounded to
    float32. The clamp does not keep the penalty finite: where ``multiplier * base **
    max_exponent`` exceeds float32's maximum (about 3.4e38: multiplier 1 at base 2, or 2 at
    base 1.75), a long enough repeat gets an infinite penalty and its token becomes ``-inf``
    (removed), as in llama.cpp. One difference: llama.cpp also treats every vocabulary
    token whose text *contains* a breaker string as a breaker; here a breaker is exactly the
    tokenization of its string (or the token ids given).
    """

    name = "dry"
    order = 45  # after the other penalties, as in llama.cpp's chain
    test_params = [
        {"dry_multiplier": 0.8},
        {"dry_multiplier": 1.0, "dry_base": 1.1, "dry_allowed_length": 1, "dry_sequence_breakers": [[0], [1, 2]]},
        lambda v: {"dry_multiplier": 5.0, "dry_base": 3.0, "dry_allowed_length": 0, "dry_sequence_breakers": [[v - 1]]},
        {"dry_multiplier": 1e30, "dry_base": 100.0, "dry_allowed_length": 1, "dry_penalty_last_n": 6},
        {"dry_multiplier": 2.0, "dry_base": 1.0, "dry_penalty_last_n": 0},
    ]

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        dry_multiplier: float = Field(default=0.0, ge=0.0, allow_inf_nan=False, description="penalty scale; 0 = off, typical 0.8")
        dry_base: float = Field(default=1.75, ge=1.0, allow_inf_nan=False, description="growth per repeated token, >= 1")
        dry_allowed_length: int = Field(default=2, ge=0, description="repeats this long go unpunished")
        dry_sequence_breakers: list[str | list[int]] = Field(
            default_factory=lambda: list(DEFAULT_SEQUENCE_BREAKERS),
            description="strings (tokenized) or token-id sequences that end a repeat",
        )
        dry_penalty_last_n: int = Field(default=-1, ge=-1, description="context tokens searched; -1 = all, 0 = off")

        @field_validator("dry_sequence_breakers")
        @classmethod
        def _non_empty(cls, value: list[Any]) -> list[Any]:
            return token_sequences(value)

    def __init__(
        self,
        dry_multiplier: float,
        dry_base: float = 1.75,
        dry_allowed_length: int = 2,
        dry_sequence_breakers: Sequence[Sequence[int]] = (),
        dry_penalty_last_n: int = -1,
    ) -> None:
        if any(isinstance(b, str) for b in dry_sequence_breakers):
            raise ConfigError(
                "dry_sequence_breakers: the constructor takes token-id sequences; "
                "build from settings (decodekit.build_chain) to have strings tokenized"
            )
        p = validate(
            self.Params,
            dry_multiplier=dry_multiplier,
            dry_base=dry_base,
            dry_allowed_length=dry_allowed_length,
            dry_sequence_breakers=[list(b) for b in dry_sequence_breakers],
            dry_penalty_last_n=dry_penalty_last_n,
        )
        self.dry_multiplier = float(p.dry_multiplier)
        self.dry_base = float(p.dry_base)
        self.dry_allowed_length = p.dry_allowed_length
        self.dry_sequence_breakers: list[list[int]] = [list(b) for b in p.dry_sequence_breakers]  # type: ignore[arg-type]
        self.dry_penalty_last_n = p.dry_penalty_last_n
        self._max_exponent = max_exponent(self.dry_base)
        by_len: dict[int, list[list[int]]] = {}
        for b in self.dry_sequence_breakers:
            by_len.setdefault(len(b), []).append(b)
        self._breakers = {n: torch.tensor(seqs, dtype=torch.long) for n, seqs in sorted(by_len.items())}
        self._single = sorted({b[0] for b in self.dry_sequence_breakers if len(b) == 1})
        self._cache: dict[tuple[int, torch.device], tuple[torch.Tensor, dict[int, torch.Tensor]]] = {}

    @classmethod
    def from_params(cls, params: BaseModel, context: BuildContext) -> DRY:
        breakers = [
            context.tokens("dry_sequence_breakers", b) if isinstance(b, str) else list(b)
            for b in params.dry_sequence_breakers  # type: ignore[attr-defined]
        ]
        if context.vocab_size is not None:
            for b in breakers:
                if max(b) >= context.vocab_size:
                    raise ConfigError(
                        f"dry_sequence_breakers: token id {max(b)} is outside the vocabulary (size {context.vocab_size})"
                    )
        values = params.model_dump()
        values["dry_sequence_breakers"] = breakers
        return cls(**values)

    def _on(self, vocab_size: int, device: torch.device) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The one-token breakers as a ``[V]`` mask, and the breakers by length, on ``device``."""
        key = (vocab_size, device)
        if key not in self._cache:
            if self._single and self._single[-1] >= vocab_size:
                raise ConfigError(
                    f"dry_sequence_breakers: token id {self._single[-1]} is outside the vocabulary (size {vocab_size})"
                )
            single = torch.zeros(vocab_size, dtype=torch.bool)
            single[self._single] = True
            self._cache[key] = (single.to(device), {n: s.to(device) for n, s in self._breakers.items()})
        return self._cache[key]

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.dry_multiplier == 0.0 or self.dry_penalty_last_n == 0:
            return logits
        t = input_ids.shape[-1]
        n = t if self.dry_penalty_last_n == -1 else min(t, self.dry_penalty_last_n)
        if n <= self.dry_allowed_length or n < 2:
            return logits
        batch, vocab = logits.shape
        single, breakers = self._on(vocab, logits.device)
        window = input_ids[:, t - n :].to(logits.device)  # [B, N], the tokens searched

        # Repeat lengths: for each earlier position j, how far the suffix ending at j matches
        # the suffix of the whole window, cut at the most recent sequence breaker.
        cap = n - 1 if self._max_exponent == 0 else min(n - 1, self.dry_allowed_length + self._max_exponent)
        lengths = suffix_match_lengths(window, cap)  # [B, N-1]
        lengths = torch.minimum(lengths, repeat_limit(window, breakers)[:, None])

        # The token after position j would extend that repeat: its penalty, the largest one per token.
        follows = window[:, 1:]  # [B, N-1]
        counted = (lengths >= self.dry_allowed_length) & ~single[follows]  # one-token breakers are exempt
        exponent = (lengths - self.dry_allowed_length).clamp(min=0)
        if self._max_exponent > 0:
            exponent = exponent.clamp(max=self._max_exponent)
        # llama.cpp: float penalty = multiplier * std::pow(base, exponent), the power in double
        power = torch.pow(_float32(self.dry_base), exponent.to(torch.float64))
        penalty = torch.where(counted, (_float32(self.dry_multiplier) * power).float(), 0.0)  # may be inf
        per_token = torch.zeros((batch, vocab), dtype=torch.float32, device=logits.device)
        per_token.scatter_reduce_(-1, follows, penalty, reduce="amax")  # [B, V]
        return to_dtype(logits.float() - per_token, logits)


def _float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (llama.cpp keeps its DRY settings as ``float``)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def max_exponent(base: float) -> int:
    """llama.cpp's clamp on the DRY exponent: ``int(88.7228391f / std::log(base))``, in float32.

    Every step is rounded to float32 as in llama.cpp (a double result rounded to float32 is the
    correctly rounded float32 result here), so base 2 gives 128 where the same formula in
    double precision gives 127. 0 (no clamp) for a base at or below ``1.000001f``.
    """
    base = _float32(base)
    if base <= _float32(1.000001):
        return 0
    return int(_float32(_float32(_FLOAT_MAX_LOG) / _float32(math.log(base))))


def suffix_match_lengths(window: torch.Tensor, cap: int) -> torch.Tensor:
    """``[B, N-1]``: for each position ``j < N-1``, the length of the longest common suffix of
    ``window[:, :j+1]`` and the whole ``window``, at most ``cap``.

    Compares, for 64 offsets ``m`` at a time, the window's ``m``-th token from the end with the
    ``m``-th token before each ``j`` (a sliding view of the window: no copy per offset). A further
    block of offsets (one host sync) is examined only while some suffix still matches in full.
    """
    batch, n = window.shape
    device = window.device
    lengths = torch.zeros((batch, n - 1), dtype=torch.long, device=device)
    alive = torch.ones((batch, n - 1), dtype=torch.bool, device=device)  # matched every offset so far
    start = 0
    while start < cap:
        size = min(_BLOCK, cap - start)
        pad = torch.full((batch, start + size - 1), -1, dtype=window.dtype, device=device)  # -1 matches no token
        earlier = torch.cat([pad, window[:, : n - 1 - start]], dim=-1).unfold(-1, size, 1)  # [B, N-1, size]
        latest = window[:, n - start - size : n - start]  # [B, size], the same offsets from the end
        same = earlier == latest[:, None, :]  # offsets run right to left: the last column is m = start
        full = same.all(dim=-1)
        last_miss = torch.where(same, -1, torch.arange(size, device=device)).amax(dim=-1)
        lengths += torch.where(alive, torch.where(full, size, size - 1 - last_miss), 0)
        alive = alive & full
        start += size
        if start < cap and not bool(alive.any()):
            break
    return lengths


def repeat_limit(window: torch.Tensor, breakers: dict[int, torch.Tensor]) -> torch.Tensor:
    """``[B]``: how many tokens follow the most recent complete sequence breaker (``N`` if none).

    Where breakers of different lengths start at that same position, the longest one counts,
    as in llama.cpp.
    """
    batch, n = window.shape
    best_start = torch.full((batch,), -1, dtype=torch.long, device=window.device)
    best_len = torch.zeros((batch,), dtype=torch.long, device=window.device)
    for length, seqs in breakers.items():  # breakers grouped by length, shortest first
        if length > n:
            continue
        spans = window.unfold(-1, length, 1)  # [B, P, length], P = N - length + 1
        hit = (spans[:, :, None, :] == seqs[None, None, :, :]).all(dim=-1).any(dim=-1)  # [B, P]
        positions = torch.arange(spans.shape[1], device=window.device)
        start = torch.where(hit, positions, -1).amax(dim=-1)  # [B], -1: none
        better = (start > best_start) | ((start == best_start) & (start >= 0))
        best_start = torch.where(better, start, best_start)
        best_len = torch.where(better, length, best_len)
    return torch.where(best_start >= 0, n - best_start - best_len, n)
