"""Per-row random streams: the fast int32 hash equals the reference, and streams look independent."""

from __future__ import annotations

import torch

from decodekit.random import RowRandom, _as_bits, _hash32_bits, hash32, row_seeds


def test_int32_hash_gives_the_reference_bits() -> None:
    x = torch.randint(0, 2**32, (4096,), dtype=torch.int64)
    assert torch.equal(_hash32_bits(_as_bits(x)).long() & 0xFFFFFFFF, hash32(x))


def test_uniform_and_exponential_moments() -> None:
    rng = RowRandom(torch.tensor([0, 1, 2]))
    u = rng.uniform(100_000)
    assert ((u > 0) & (u < 1)).all()
    assert torch.allclose(u.mean(-1), torch.full((3,), 0.5), atol=0.01)
    e = rng.exponential(100_000)
    assert torch.allclose(e.mean(-1), torch.ones(3), atol=0.02)
    assert torch.allclose(e.var(-1), torch.ones(3), atol=0.05)


def test_rows_draws_and_columns_are_decorrelated() -> None:
    rng = RowRandom(torch.arange(2))
    a, b = rng.uniform(50_000), rng.uniform(50_000)
    for x, y in ((a[0], a[1]), (a[0], b[0]), (a[0, :-1], a[0, 1:])):
        assert abs(torch.corrcoef(torch.stack([x, y]))[0, 1]) < 0.02


def test_a_row_stream_depends_on_its_seed_alone() -> None:
    together = RowRandom(torch.tensor([5, 9])).uniform(100)
    alone = RowRandom(torch.tensor([9])).uniform(100)
    assert torch.equal(together[1], alone[0])
    assert torch.equal(row_seeds(3, 2, torch.device("cpu")), torch.tensor([3, 4]))
