"""The DRY ("Don't Repeat Yourself") repetition penalty, with llama.cpp's semantics, as tensors."""

from __future__ import annotations

import math
import struct
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from decodekit.errors import ConfigError
from decodekit.processors.base import BuildContext, LogitsProcessor, to_dtype
from decodekit.processors.rows import is_sequences_per_row, padded_sequences, row_values
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

    Per row: every setting takes one value per row (``dry_multiplier=[0.0, 0.8]``;
    ``dry_sequence_breakers`` one list of breakers per row), and each row is penalised exactly as
    it would be alone: its own window, exponent clamp and breakers (held padded, ``[B, K, L]``),
    all rows at once. Negative (padding) ids are never part of a repeat or a breaker.
    """

    name = "dry"
    order = 45  # after the other penalties, as in llama.cpp's chain
    negative_padding = True
    row_fields = (
        "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n",
        "_breakers", "_breaker_lengths", "_max_exponents",
    )  # fmt: skip
    row_params = {
        "dry_multiplier": 0.0,
        "dry_base": 1.75,
        "dry_allowed_length": 2,
        "dry_sequence_breakers": list(DEFAULT_SEQUENCE_BREAKERS),
        "dry_penalty_last_n": -1,
    }
    row_padding = {"_breakers": -1, "_breaker_lengths": 0}
    row_test_values = {"dry_sequence_breakers": [list(DEFAULT_SEQUENCE_BREAKERS), [], [[0]], [[1, 2], [3]], [[2], [2, 5, 1]]]}
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
        dry_multiplier: Any,
        dry_base: Any = 1.75,
        dry_allowed_length: Any = 2,
        dry_sequence_breakers: Any = (),
        dry_penalty_last_n: Any = -1,
    ) -> None:
        self.init_setting("dry_multiplier", dry_multiplier)
        self.init_setting("dry_base", dry_base)
        self.init_setting("dry_allowed_length", dry_allowed_length, int)
        self.init_setting("dry_penalty_last_n", dry_penalty_last_n, int)
        per_row = is_sequences_per_row(dry_sequence_breakers)
        breakers = row_values(dry_sequence_breakers, _checked_breakers) if per_row else [_checked_breakers(dry_sequence_breakers)]
        if per_row and self.rows is not None and len(breakers) != self.rows:
            raise ConfigError(f"dry: dry_sequence_breakers has {len(breakers)} per-row values, another setting {self.rows}")
        self.dry_sequence_breakers = breakers if per_row else breakers[0]
        if per_row or self.rows is not None:  # every setting one value per row
            self.rows = len(breakers) if per_row else self.rows
            breakers = breakers if per_row else breakers * self.rows
            for name in ("dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n"):
                value = getattr(self, name)
                if not isinstance(value, torch.Tensor):
                    self.init_setting(name, [value] * self.rows, float if isinstance(value, float) else int)
        bases = self.dry_base.tolist() if isinstance(self.dry_base, torch.Tensor) else [self.dry_base]
        exponents = [max_exponent(b) for b in bases]
        self._max_exponent = exponents[0]  # the scalar build's clamp
        self._max_exponents = torch.tensor(exponents, dtype=torch.long) if self.rows is not None else None
        padded = padded_sequences(breakers)  # [B, K, L] ids, [B, K] lengths; B = 1 for a scalar build
        by_row = self._max_exponents is not None
        self._breakers, self._breaker_lengths = padded if by_row else (None, None)  # per-row fields
        self._shared_breakers = None if by_row else padded  # a scalar build's, for every row
        self._host = _HostFacts.of(breakers, self)
        self.active = self.any_row_on()

    @classmethod
    def from_params(cls, params: BaseModel, context: BuildContext) -> DRY:
        values = params.model_dump()
        values["dry_sequence_breakers"] = _breaker_ids(values["dry_sequence_breakers"], context)
        return cls(**values)

    @classmethod
    def from_row_params(cls, values: dict[str, list[Any]], shared: dict[str, Any], context: BuildContext) -> DRY:
        rows = dict(values)
        rows["dry_sequence_breakers"] = row_values(values["dry_sequence_breakers"], lambda given: _breaker_ids(given, context))
        return cls(**rows, **shared)

    def any_row_on(self) -> bool:
        m, n = self.dry_multiplier, self.dry_penalty_last_n
        if isinstance(m, torch.Tensor):
            return bool(((m != 0.0) & (n != 0)).any())
        return m != 0.0 and n != 0

    def assign(self, rows: torch.Tensor, other: LogitsProcessor) -> None:
        super().assign(rows, other)  # re-pads the breakers to the longer lists
        if isinstance(other, DRY):
            self._host = self._host.merged(other._host)

    def _settings(self, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """``[B]`` multiplier and base (float32-rounded, in float64), allowed length, window, clamp."""
        if self._max_exponents is not None:  # built per row (an engine may set `rows` on a scalar build)
            return tuple(
                t.to(device)
                for t in (self.dry_multiplier, self.dry_base, self.dry_allowed_length, self.dry_penalty_last_n, self._max_exponents)
            )
        values = (self.dry_multiplier, self.dry_base, self.dry_allowed_length, self.dry_penalty_last_n, self._max_exponent)
        return tuple(
            torch.full((batch,), v, dtype=torch.float64 if isinstance(v, float) else torch.long, device=device) for v in values
        )

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return logits
        self.check_batch(logits)
        host = self._host
        t = input_ids.shape[-1]
        width = t if host.whole_context else min(t, host.longest_window)  # covers every row's window
        if width < 2 or width <= host.least_allowed:
            return logits
        batch, vocab = logits.shape
        if host.biggest_single >= vocab:
            raise ConfigError(
                f"dry_sequence_breakers: token id {host.biggest_single} is outside the vocabulary (size {vocab})"
            )
        multiplier, base, allowed, last_n, clamp = self._settings(batch, logits.device)
        ids = input_ids.to(logits.device)
        count = (ids >= 0).sum(dim=-1)  # [B] tokens per row
        n = torch.where(last_n < 0, count, torch.minimum(count, last_n))  # [B] each row's window, as alone
        on = (multiplier != 0.0) & (last_n != 0) & (n > allowed) & (n >= 2)  # [B]: alone, the rest return early

        # The searched tokens, right-aligned in `width` columns; outside a row's window each
        # position holds its own negative value, so it matches nothing (not even another one).
        position = torch.arange(width, device=ids.device)
        window = ids[:, t - width :]
        inside = (position >= width - n[:, None]) & (window >= 0)  # [B, W]
        window = torch.where(inside, window, -2 - position)
        shared = self._shared_breakers is not None
        breakers, breaker_lengths = self._shared_breakers if shared else (self._breakers, self._breaker_lengths)
        breakers = breakers.to(ids.device).expand(batch, -1, -1)
        breaker_lengths = breaker_lengths.to(ids.device).expand(batch, -1)

        # Repeat lengths: for each earlier position j, how far the suffix ending at j matches
        # the suffix of the whole window, cut at each row's clamp and most recent sequence breaker.
        cap = width - 1 if host.unclamped else min(width - 1, host.longest_reach)
        row_cap = torch.where(clamp == 0, n - 1, torch.minimum(n - 1, allowed + clamp))  # [B]
        lengths = torch.minimum(suffix_match_lengths(window, cap), row_cap[:, None])  # [B, W-1]
        limit = repeat_limit(window, breakers, breaker_lengths, host.breaker_sizes)
        lengths = torch.minimum(lengths, limit[:, None])

        # The token after position j would extend that repeat: its penalty, the largest one per token.
        follows = window[:, 1:]  # [B, W-1]
        one_token = breakers[:, None, :, 0].masked_fill(breaker_lengths[:, None, :] != 1, -1)  # [B, 1, K]
        exempt = (follows[:, :, None] == one_token).any(dim=-1)  # one-token breakers are never penalised
        counted = (lengths >= allowed[:, None]) & inside[:, :-1] & inside[:, 1:] & ~exempt & on[:, None]
        exponent = (lengths - allowed[:, None]).clamp(min=0)
        exponent = torch.where(clamp[:, None] > 0, torch.minimum(exponent, clamp[:, None]), exponent)
        # llama.cpp: float penalty = multiplier * std::pow(base, exponent), the power in double
        base32, multiplier32 = base.float().double(), multiplier.float().double()  # settings are float there
        power = torch.pow(base32[:, None], exponent.to(torch.float64))
        penalty = torch.where(counted, (multiplier32[:, None] * power).float(), 0.0)  # may be inf
        per_token = torch.zeros((batch, vocab), dtype=torch.float32, device=logits.device)
        per_token.scatter_reduce_(-1, follows.clamp(min=0), penalty, reduce="amax")  # [B, V]
        out = to_dtype(logits.float() - per_token, logits)
        if logits.dtype == torch.float32:  # off rows have no penalty, and x - 0 is x: no shift in float32
            return out
        return torch.where(on[:, None], out, logits)  # half types: to_dtype shifts a row; off rows are not


class _HostFacts:
    """What the call needs as Python values (tensor widths, loops), so it never syncs: bounds over
    every row, widened when rows are assigned (a bound wider than a row needs changes no result)."""

    def __init__(self, **facts: Any) -> None:
        self.__dict__.update(facts)

    @classmethod
    def of(cls, breakers: list[list[list[int]]], dry: DRY) -> _HostFacts:
        def host(name: str) -> list[Any]:
            v = getattr(dry, name)
            return v.tolist() if isinstance(v, torch.Tensor) else [v]

        exponents = dry._max_exponents.tolist() if dry._max_exponents is not None else [dry._max_exponent]
        allowed, last_n = host("dry_allowed_length"), host("dry_penalty_last_n")
        return cls(
            whole_context=any(n < 0 for n in last_n),
            longest_window=max(last_n),
            least_allowed=min(allowed),
            unclamped=any(e == 0 for e in exponents),
            longest_reach=max(a + e for a, e in zip(allowed, exponents)),
            breaker_sizes=sorted({len(b) for row in breakers for b in row}),
            biggest_single=max((b[0] for row in breakers for b in row if len(b) == 1), default=-1),
        )

    def merged(self, other: _HostFacts) -> _HostFacts:
        return _HostFacts(
            whole_context=self.whole_context or other.whole_context,
            longest_window=max(self.longest_window, other.longest_window),
            least_allowed=min(self.least_allowed, other.least_allowed),
            unclamped=self.unclamped or other.unclamped,
            longest_reach=max(self.longest_reach, other.longest_reach),
            breaker_sizes=sorted(set(self.breaker_sizes) | set(other.breaker_sizes)),
            biggest_single=max(self.biggest_single, other.biggest_single),
        )


def _checked_breakers(breakers: Any) -> list[list[int]]:
    """Token-id breakers as lists (strings are tokenized only when built from settings)."""
    if not isinstance(breakers, (list, tuple)):
        raise ConfigError(f"dry_sequence_breakers: {breakers!r} is not allowed: give a list of token-id sequences")
    if any(isinstance(b, str) for b in breakers):
        raise ConfigError(
            "dry_sequence_breakers: the constructor takes token-id sequences; "
            "build from settings (decodekit.build_chain) to have strings tokenized"
        )
    p = validate(DRY.Params, dry_sequence_breakers=[list(b) for b in breakers])
    return [list(b) for b in p.dry_sequence_breakers]  # type: ignore[arg-type]


def _breaker_ids(breakers: list[Any], context: BuildContext) -> list[list[int]]:
    """Breakers as token ids: strings tokenized; ids outside a known vocabulary refused."""
    ids = [context.tokens("dry_sequence_breakers", b) if isinstance(b, str) else list(b) for b in breakers]
    if context.vocab_size is not None:
        for b in ids:
            if max(b) >= context.vocab_size:
                raise ConfigError(
                    f"dry_sequence_breakers: token id {max(b)} is outside the vocabulary (size {context.vocab_size})"
                )
    return ids


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


def repeat_limit(window: torch.Tensor, breakers: torch.Tensor, lengths: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``[B]``: how many tokens follow the most recent complete sequence breaker (``N`` if none).

    ``breakers`` ``[B, K, L]`` and ``lengths`` ``[B, K]`` are each row's own (padded);
    ``sizes`` the distinct breaker lengths over all rows. Where breakers of different lengths
    start at that same position, the longest one counts, as in llama.cpp.
    """
    batch, n = window.shape
    best_start = torch.full((batch,), -1, dtype=torch.long, device=window.device)
    best_len = torch.zeros((batch,), dtype=torch.long, device=window.device)
    for length in sizes:  # shortest first
        if length > n:
            continue
        spans = window.unfold(-1, length, 1)  # [B, P, length], P = N - length + 1
        same = (spans[:, :, None, :] == breakers[:, None, :, :length]).all(dim=-1)  # [B, P, K]
        hit = (same & (lengths == length)[:, None, :]).any(dim=-1)  # [B, P]
        positions = torch.arange(spans.shape[1], device=window.device)
        start = torch.where(hit, positions, -1).amax(dim=-1)  # [B], -1: none
        better = (start > best_start) | ((start == best_start) & (start >= 0))
        best_start = torch.where(better, start, best_start)
        best_len = torch.where(better, length, best_len)
    return torch.where(best_start >= 0, n - best_start - best_len, n)
