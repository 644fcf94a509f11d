"""Ragged runs (losses._ragged): group ids of any spread give the same runs, pairs and losses."""

from __future__ import annotations

import pytest
import torch

from losses import _ragged
from losses.ranking_losses import RANKINGS, unchecked_ranking_sums


def _batch(columns: int):
    gen = torch.Generator().manual_seed(columns)
    batch = 60
    small = torch.randint(0, 7, (batch,), generator=gen) * 3 - 5  # 7 groups, ids spanning 19 values
    # The same groups under hash-like ids spread over the whole int64 range.
    table = torch.tensor([-(2**62), -12345678901234, -1, 0, 2**40 + 3, 2**61, 2**63 - 1])
    wide = table[(small + 5) // 3]
    logits = torch.randn(batch, columns, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (batch, columns), generator=gen).double()
    weights = torch.rand(batch, columns, generator=gen, dtype=torch.float64) + 0.5
    mask = torch.rand(batch, columns, generator=gen) < 0.8
    return small, wide, logits, labels, weights, mask


@pytest.mark.parametrize("columns", [1, 3])
def test_keys_stay_below_2_31_and_order_groups_alike(columns):
    small, wide, *_, mask = _batch(columns)
    narrow_keys, wide_keys = _ragged.flat_keys(small, mask), _ragged.flat_keys(wide, mask)
    for keys in (narrow_keys, wide_keys):
        assert int(keys.min()) >= 0
        assert int(keys.max()) < 2**31
    # Equal keys for the same entries, and the same order of keys: the same runs after a sort.
    same = narrow_keys.unsqueeze(0) == narrow_keys.unsqueeze(1)
    assert torch.equal(same, wide_keys.unsqueeze(0) == wide_keys.unsqueeze(1))
    below = narrow_keys.unsqueeze(0) < narrow_keys.unsqueeze(1)
    assert torch.equal(below, wide_keys.unsqueeze(0) < wide_keys.unsqueeze(1))


@pytest.mark.parametrize("kind", list(RANKINGS))
@pytest.mark.parametrize("columns", [1, 3])
def test_hash_like_group_ids_give_the_same_sums_and_gradients(kind, columns):
    small, wide, logits, labels, weights, mask = _batch(columns)
    sums, counts = unchecked_ranking_sums(logits, labels, small, weights, mask, kind)
    (grad,) = torch.autograd.grad(sums.sum(), logits)
    wide_sums, wide_counts = unchecked_ranking_sums(logits, labels, wide, weights, mask, kind)
    (wide_grad,) = torch.autograd.grad(wide_sums.sum(), logits)
    assert bool((counts > 0).all())
    torch.testing.assert_close(wide_sums, sums)
    torch.testing.assert_close(wide_counts, counts)
    torch.testing.assert_close(wide_grad, grad)


@pytest.mark.parametrize("size", [200, 40000])  # a comparison sort below 32768 entries, a radix sort above
def test_sort_by_key_then_descending_orders_ties_by_entry_and_leaves_its_inputs(size):
    gen = torch.Generator().manual_seed(size)
    keys = torch.randint(0, 30, (size,), generator=gen)
    values = torch.randint(-2, 3, (size,), generator=gen).float() / 2  # ties, and -0.0 beside 0.0
    values[::7] = -0.0
    keys_before, values_before = keys.clone(), values.clone()
    packed, order = _ragged.sort_by_key_then_descending(keys, values)
    expected = sorted(range(size), key=lambda e: (int(keys[e]), -float(values[e]), e))
    assert order.tolist() == expected
    assert torch.equal(packed, _ragged._packed(keys, values)[order])
    assert torch.equal(keys, keys_before)
    assert torch.equal(values, values_before)
