"""Per-row, counter-based random numbers: reproducible, batch-independent, no host sync.

Row ``b`` draws from a stream determined by its own seed alone, so a row's samples do not change
with what else is in the batch, and the same seed gives the same tokens on CPU and GPU. Numbers
come from a stateless integer hash of ``(seed, draw counter, column)``, computed with ordinary
tensor ops (no Python loop over rows, no ``torch.Generator`` per row).
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32`` in int64, without signed overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return ((x * lo) + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32, by Chris Wellons) on int64 tensors in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _hash32_int(x: int) -> int:
    """:func:`hash32` of one Python int in ``[0, 2**32)`` (no tensor, no device work)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _xorshift_(x: torch.Tensor, s: int, scratch: torch.Tensor) -> None:
    """``x ^= x >>> s`` in place on int32 bit patterns (logical shift: torch's ``>>`` is
    arithmetic on signed ints, so the sign copies are masked off)."""
    torch.bitwise_right_shift(x, s, out=scratch)
    scratch &= (1 << (32 - s)) - 1
    x ^= scratch


def _hash32_bits(x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """:func:`hash32` on int32 tensors holding the 32 bits: wrap-around multiplies, half the memory
    and a third of the operations of the int64 form; the same bits (tests check). With
    ``inplace=True`` ``x`` is overwritten (one temporary the size of ``x``)."""
    if not inplace:
        x = x.clone()
    scratch = torch.empty_like(x)
    _xorshift_(x, 16, scratch)
    x *= 0x7FEB352D
    _xorshift_(x, 15, scratch)
    x *= 0x846CA68B - (1 << 32)
    _xorshift_(x, 16, scratch)
    return x


def _as_bits(x: torch.Tensor) -> torch.Tensor:
    """int64 values, taken mod 2**32, as int32 bit patterns."""
    x = x.to(torch.int64) & _MASK32
    return torch.where(x >= (1 << 31), x - (1 << 32), x).to(torch.int32)


class RowRandom:
    """Uniform and exponential noise, one independent stream per row.

    ``seeds``: ``[B]`` int64, one seed per row. Every call advances a counter shared by all rows
    (a Python int), so two runs that make the same calls get the same numbers. ``offsets``
    (optional ``[B]`` int64) shift each row's draw numbers: row ``b`` takes draw
    ``counter + offsets[b]``. The request engine sets a newcomer's offset to minus the counter
    at its admission, so its first step uses draw 0 as it would decoded alone.

    A sampler that needs several numbers for one step (the rejection rounds of top-p) takes
    them as sub-draws of that step's draw: ``uniform(n, draw=d, sub=r)``; sub-draw 0 is the plain
    draw ``d``. So every sampler consumes exactly one draw per step, and a row's stream does not
    depend on which sampler other rows, or earlier steps, used.
    """

    def __init__(self, seeds: torch.Tensor, offsets: torch.Tensor | None = None) -> None:
        self.seeds = _as_bits(seeds.reshape(-1, 1))  # [B, 1] int32 bits
        self.offsets = None if offsets is None else offsets.reshape(-1, 1).to(torch.int64)  # [B, 1]
        self.counter = 0
        self._columns: dict[tuple[int, torch.device], torch.Tensor] = {}

    @property
    def batch_size(self) -> int:
        return self.seeds.shape[0]

    def select(self, index: torch.Tensor) -> RowRandom:
        """The streams of rows ``index`` (for beams and repeated samples)."""
        out = RowRandom.__new__(RowRandom)
        out.seeds = self.seeds[index]
        out.offsets = None if self.offsets is None else self.offsets[index]
        out.counter = self.counter
        out._columns = self._columns
        return out

    def assign(self, rows: torch.Tensor, seeds: torch.Tensor) -> None:
        """Give rows ``rows`` new streams with seeds ``seeds``, starting at their draw 0 now."""
        if self.offsets is None:
            self.offsets = torch.zeros_like(self.seeds, dtype=torch.int64)
        self.seeds = self.seeds.clone()
        self.offsets = self.offsets.clone()
        self.seeds[rows] = _as_bits(seeds.reshape(-1, 1).to(self.seeds.device))
        self.offsets[rows] = -self.counter

    def next_draw(self) -> int:
        """Take one draw number for this step (its sub-draws go with it)."""
        draw = self.counter
        self.counter += 1
        return draw

    def _bits(self, n: int, draw: int | None = None, sub: int = 0) -> torch.Tensor:
        device = self.seeds.device
        cols = self._columns.get((n, device))  # hashed column ids, computed once per width
        if cols is None:
            cols = _hash32_bits(_as_bits(torch.arange(n, dtype=torch.int64, device=device) + 0x632BE5AB))
            self._columns[(n, device)] = cols
        if draw is None:
            draw = self.next_draw()
        if self.offsets is None:
            key = _hash32_int((draw + 0x9E3779B9) & _MASK32)
            if sub:
                key = _hash32_int(key ^ _hash32_int((sub + 0x85EBCA6B) & _MASK32))
            key_bits: int | torch.Tensor = key - (1 << 32) if key >= 1 << 31 else key
        else:  # one draw number per row: the same hash, on a [B, 1] tensor
            key_bits = hash32((self.offsets + draw + 0x9E3779B9) & _MASK32)
            if sub:
                key_bits = hash32(key_bits ^ _hash32_int((sub + 0x85EBCA6B) & _MASK32))
            key_bits = _as_bits(key_bits)
        stream = _hash32_bits(self.seeds ^ key_bits)  # [B, 1]
        return _hash32_bits(stream ^ cols, inplace=True)  # [B, n] int32 bits

    def reserve(self, n: int) -> int:
        """Set aside ``n`` draws (for a loop whose length varies with the data); returns the first.

        Draw ``first + i`` is then taken with ``exponential(..., draw=first + i)``, so the stream
        of every later call is the same however many of the ``n`` were used.
        """
        first = self.counter
        self.counter += n
        return first

    def uniform(self, n: int, *, draw: int | None = None, sub: int = 0) -> torch.Tensor:
        """``[B, n]`` float32 uniform in the open interval (0, 1): the top 24 bits of the hash."""
        bits = self._bits(n, draw, sub)
        bits >>= 8
        bits &= (1 << 24) - 1  # the top 24 bits, as a number in [0, 2**24)
        return bits.to(torch.float32).add_(0.5).mul_(1.0 / (1 << 24))

    def exponential(self, n: int, *, draw: int | None = None, sub: int = 0) -> torch.Tensor:
        """``[B, n]`` float32 draws from Exp(1)."""
        return self.uniform(n, draw=draw, sub=sub).log_().neg_()


SEED_LIMIT = 2**32
"""Seeds are integers with ``0 <= seed < SEED_LIMIT``: a row's stream is made from the seed's 32
bits, so a larger seed would only repeat a smaller one's samples. Seeds derived from one (``seed
+ row``) wrap around modulo ``SEED_LIMIT``, so they stay in the range too."""


def _seed_error(seed: object) -> str:
    return f"seed={seed!r} is not allowed: must be an integer with 0 <= seed < {SEED_LIMIT} (2**32)"


def row_seeds(seed: int | list[int] | torch.Tensor | None, batch_size: int, device: torch.device) -> torch.Tensor:
    """Seeds per row: an int gives ``(seed + row) % SEED_LIMIT``, a list gives one per row, None draws one.

    ``None`` draws from torch's global generator, so ``torch.manual_seed`` makes it repeatable.
    Every int seed given must be in ``[0, SEED_LIMIT)`` (:class:`ConfigError` otherwise); a tensor
    is taken as it is (checking it would cost a device sync).
    """
    from decodekit.errors import ConfigError

    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    if isinstance(seed, bool):
        raise ConfigError(f"seed={seed!r} is not allowed: must be an integer, a list of integers, or null")
    if isinstance(seed, int):
        if not 0 <= seed < SEED_LIMIT:
            raise ConfigError(_seed_error(seed))
        return (torch.arange(batch_size, dtype=torch.int64, device=device) + seed) % SEED_LIMIT
    if isinstance(seed, (list, tuple)):
        for s in seed:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < SEED_LIMIT:
                raise ConfigError(_seed_error(s))
    seeds = torch.as_tensor(seed, dtype=torch.int64, device=device).reshape(-1)
    if seeds.numel() != batch_size:
        raise ConfigError(f"seed: {seeds.numel()} seeds given for {batch_size} rows; give one per row or a single int")
    return seeds
