"""One seed range, 0 <= seed < 2**32, for the library and the command; derived seeds stay in it."""

from __future__ import annotations

import pytest
import torch

from decodekit.errors import ConfigError
from decodekit.models.gpt import GPT, GPTConfig
from decodekit.random import SEED_LIMIT, RowRandom, row_seeds
from decodekit.samplers import Multinomial
from decodekit.text import generate_text
from decodekit.tokenization import ByteTokenizer

CPU = torch.device("cpu")


def test_the_range_is_what_the_random_streams_use() -> None:
    # a row's stream is made from 32 bits of its seed: 2**32 would repeat seed 0
    wrapped = RowRandom(torch.tensor([0, SEED_LIMIT])).uniform(8)
    assert SEED_LIMIT == 2**32 and torch.equal(wrapped[0], wrapped[1])


def test_seeds_derived_for_rows_wrap_inside_the_range() -> None:
    assert row_seeds(SEED_LIMIT - 2, 4, CPU).tolist() == [SEED_LIMIT - 2, SEED_LIMIT - 1, 0, 1]
    assert row_seeds(3, 2, CPU).tolist() == [3, 4]


@pytest.mark.parametrize("seed", [-1, SEED_LIMIT, 2**63 - 1, 99999999999999999999, [0, -3], [0, SEED_LIMIT]])
def test_a_seed_outside_the_range_is_refused_in_one_line(seed) -> None:
    with pytest.raises(ConfigError, match=r"^seed=-?\d+ is not allowed: must be an integer with 0 <= seed < 4294967296 \(2\*\*32\)$"):
        row_seeds(seed, 2, CPU)


def test_each_sample_is_labelled_with_a_seed_that_makes_it_again() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=1, n_head=1, n_embd=16)).eval()
    tok = ByteTokenizer()
    both = generate_text(model, tok, "ab", sampler=Multinomial(), max_new_tokens=6, num_samples=2, seed=SEED_LIMIT - 1)
    assert [r.seed for r in both] == [SEED_LIMIT - 1, 0]
    assert both[0].tokens != both[1].tokens  # the seeds matter here
    for r in both:
        (again,) = generate_text(model, tok, "ab", sampler=Multinomial(), max_new_tokens=6, seed=r.seed)
        assert again.tokens == r.tokens
