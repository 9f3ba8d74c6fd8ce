"""The vocabulary sort the filters use: numpy's on CPU, torch's elsewhere; the same values either way."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decodekit.processors import TopP, TypicalP
from decodekit.processors.sorting import sort_values, sort_with_order
from decodekit.testing import logits

NEG_INF = float("-inf")


@settings(max_examples=60, deadline=None)
@given(x=logits(dtypes=(torch.float32,)))
def test_sorted_values_equal_torch_sort(x: torch.Tensor) -> None:
    for x in (x, x.double()):
        check_sorts(x)


def check_sorts(x: torch.Tensor) -> None:
    expected = torch.sort(x, dim=-1).values
    assert torch.equal(sort_values(x), expected)
    values, order = sort_with_order(x)
    assert torch.equal(values, expected)
    assert order.dtype == torch.long
    assert torch.equal(x.gather(-1, order), values)  # a permutation that sorts each row
    assert torch.equal(order.sort(dim=-1).values, torch.arange(x.shape[-1]).expand_as(order))


def test_ties_minus_inf_and_strided_rows() -> None:
    x = torch.tensor([[0.5, NEG_INF, 0.5, 2.0, NEG_INF, -1.0], [3.0, 3.0, 3.0, 1.0, 0.0, 3.0]])
    strided = torch.cat([x, x], dim=-1)[:, ::2]  # not contiguous
    for t in (x, strided, x.double()):
        assert torch.equal(sort_values(t), torch.sort(t, dim=-1).values)
        values, order = sort_with_order(t)
        assert torch.equal(t.gather(-1, order), values)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtypes_numpy_lacks_take_torch_sort(dtype: torch.dtype) -> None:
    x = torch.randn(3, 300).to(dtype)
    assert sort_values(x).dtype == dtype
    assert torch.equal(sort_values(x), torch.sort(x, dim=-1).values)


def reference_top_p(x: torch.Tensor, p: float) -> torch.Tensor:
    """TopP's rule with torch's sort and a counted comparison (as the filter was written first)."""
    ascending = torch.sort(x, dim=-1).values
    cum = ascending.float().softmax(dim=-1).cumsum(dim=-1)
    n_removed = (cum <= 1.0 - p).sum(dim=-1, keepdim=True).clamp(max=x.shape[-1] - 1)
    return torch.where(x < ascending.gather(-1, n_removed), NEG_INF, x)


@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0])
@pytest.mark.parametrize("p", [0.3, 0.9, 0.999])
def test_top_p_keeps_what_the_torch_sorted_rule_keeps(scale: float, p: float) -> None:
    x = torch.randn(4, 50257, generator=torch.Generator().manual_seed(7)) * scale
    x[:, :100] = NEG_INF  # banned tokens sort first
    assert torch.equal(TopP(p)(None, x), reference_top_p(x, p))
    per_row = TopP(torch.tensor([p, 1.0, 0.0, p]))(None, x)
    assert torch.equal(per_row[0], reference_top_p(x[:1], p)[0])
    assert torch.equal(per_row[1], x[1])  # p = 1: unchanged
    assert int((per_row[2] > NEG_INF).sum()) == 1  # p = 0: the most likely only


def test_typical_keeps_a_distance_prefix_whichever_sort_ran() -> None:
    x = torch.randn(4, 5000, generator=torch.Generator().manual_seed(3)) * 2
    out = TypicalP(0.5)(None, x)
    logp = x.log_softmax(-1)
    distance = (-logp + (logp * logp.exp()).sum(-1, keepdim=True)).abs()
    kept = out > NEG_INF
    # every kept token is closer to the entropy than every removed one, and the kept mass reaches 0.5
    assert bool((distance.masked_fill(~kept, -1).amax(-1) < distance.masked_fill(kept, float("inf")).amin(-1)).all())
    assert bool((logp.exp().masked_fill(~kept, 0).sum(-1) >= 0.5 - 1e-6).all())


@pytest.mark.parametrize("scale", [0.05, 1.0, 6.0])
def test_nucleus_bounds_are_the_filters_nucleus(scale: float) -> None:
    from decodekit.processors.truncation import nucleus_bounds

    x = torch.randn(5, 3001, generator=torch.Generator().manual_seed(11)) * scale
    x[1, :40] = NEG_INF
    x[2, 7:19] = x[2].max()  # a tie at the top
    p = torch.tensor([[0.9], [0.5], [0.2], [1.0], [0.0]])
    floor, lse = nucleus_bounds(x, 1.0 - p.double())
    expected = TopP(p.squeeze(-1))(None, x)
    assert torch.equal(torch.where(x < floor, NEG_INF, x), expected)
    torch.testing.assert_close(lse, torch.logsumexp(expected, dim=-1, keepdim=True), rtol=0, atol=2e-6)


def test_a_workspace_reuses_its_buffers_and_changes_no_result() -> None:
    import copy
    import pickle

    from decodekit.processors.sorting import Workspace
    from decodekit.processors.truncation import nucleus_bounds

    workspace = Workspace()
    for seed in range(3):
        x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sort_values(x, workspace), torch.sort(x, dim=-1).values)
        with_ws, without = nucleus_bounds(x, 0.1, 1, workspace), nucleus_bounds(x, 0.1)
        assert all(torch.equal(a, b) for a, b in zip(with_ws, without))
    first = workspace.buffer("sorted", (4, 1000), torch.float32, torch.device("cpu"))
    assert sort_values(torch.randn(4, 1000), workspace).data_ptr() == first.data_ptr()  # the same buffer, again
    top_p = TopP(0.9)
    top_p(None, torch.randn(2, 300))
    for clone in (copy.deepcopy(top_p), pickle.loads(pickle.dumps(top_p))):
        assert clone._workspace._buffers == {}  # copies start empty


def check_bins_against_sort(x: torch.Tensor, tail: torch.Tensor, min_keep: int = 1) -> bool:
    """The binned nucleus equals the sorted one where it answers; whether it answered."""
    from decodekit.processors.sorting import nucleus_by_bins
    from decodekit.processors.truncation import nucleus_by_sort

    binned = nucleus_by_bins(x, tail, min_keep)
    if binned is None:
        return False
    floor, lse = binned
    expected_floor, expected_lse = nucleus_by_sort(x, tail, min_keep)
    assert torch.equal(floor, expected_floor)
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=2e-6 * (1 + expected_lse.abs().max().item()))
    return True


@settings(max_examples=150, deadline=None)
@given(x=logits(dtypes=(torch.float32,), vocab=st.integers(1, 400)), data=st.data())
def test_the_binned_nucleus_equals_the_sorted_one(x: torch.Tensor, data: st.DataObject) -> None:
    tails = st.sampled_from([0.0, 1e-6, 0.05, 0.1, 0.5, 0.7, 0.95])
    tail = torch.tensor([[data.draw(tails)] for _ in range(x.shape[0])], dtype=torch.float64)
    check_bins_against_sort(x, tail, data.draw(st.sampled_from([1, 1, 3])))


@pytest.mark.parametrize("scale", [0.01, 0.3, 1.0, 5.0, 30.0])
def test_the_binned_nucleus_answers_on_a_real_vocabulary(scale: float) -> None:
    x = torch.randn(8, 50257, generator=torch.Generator().manual_seed(5)) * scale
    x[3, :500] = NEG_INF
    x[4, 100:140] = x[4].max()  # ties at the top
    x[5, ::7] = x[5, 3]  # many ties inside
    tail = torch.tensor([[0.1], [0.0], [0.5], [0.05], [0.9], [0.1], [1e-7], [0.3]], dtype=torch.float64)
    assert check_bins_against_sort(x, tail)  # answered, and equal to the sort
    check_bins_against_sort(x, tail, min_keep=5)  # equal where it answers (a nucleus under 5 tokens is left to the sort)


def test_the_binned_nucleus_declines_what_it_cannot_decide() -> None:
    from decodekit.processors.sorting import nucleus_by_bins

    x = torch.randn(2, 1000)
    tail = torch.full((2, 1), 0.1, dtype=torch.float64)
    assert nucleus_by_bins(x.double(), tail) is None  # float32 only
    assert nucleus_by_bins(torch.where(x > 2, float("inf"), x), tail) is None  # +inf at the top
    same = torch.zeros(2, 1000)  # every logit in one bin: more candidates than it sorts
    assert nucleus_by_bins(same, tail) is None
    assert nucleus_by_bins(x, torch.ones(2, 1, dtype=torch.float64)) is None  # p = 0: the whole top bin removed
