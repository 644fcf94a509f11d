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
    (narrow_keys, _), (wide_keys, _) = _ragged.flat_keys(small, mask), _ragged.flat_keys(wide, mask)
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


def _binary_batch(size: int, columns: int, seed: int = 0):
    """0/1 labels (NaN at some left-out entries), unsorted group ids, a mask."""
    gen = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, max(size // 12, 1), (size,), generator=gen) * 5 - 7
    keep = torch.rand(size, columns, generator=gen) < 0.8
    labels = (torch.rand(size, columns, generator=gen) < 0.35).double()
    labels[~keep & (torch.rand(size, columns, generator=gen) < 0.5)] = float("nan")
    keys, bound = _ragged.flat_keys(groups, keep)
    flat = lambda t: t.t().reshape(-1)  # noqa: E731
    return keys, bound, flat(labels), flat(keep)


def _general(monkeypatch):
    """Turn the 0/1 fast paths off: every label then goes through the general sort."""
    monkeypatch.setattr(_ragged, "_binary", lambda labels, keep: None)


@pytest.mark.parametrize("size", [300, 40000])  # a comparison sort below 32768 entries, a radix sort above
@pytest.mark.parametrize("columns", [1, 3])
def test_0_1_labels_sort_in_int32_to_the_same_runs(size, columns, monkeypatch):
    keys, bound, labels, keep = _binary_batch(size, columns)
    assert _ragged._binary(labels, keep) is not None
    fast = _ragged.sort_runs(keys, labels, size, keep, bound)
    _general(monkeypatch)
    general = _ragged.sort_runs(keys, labels, size, keep, bound)
    # Both sorts are stable: ties in entry order, so every field is the same tensor.
    for name in ("order", "start", "tie_start", "higher"):
        assert torch.equal(getattr(fast, name), getattr(general, name)), name
    assert (fast.column is None) == (general.column is None) == (columns == 1)


def test_graded_labels_and_non_binary_values_take_the_general_path():
    keep = torch.tensor([True, True, False, True])
    assert _ragged._binary(torch.tensor([0.0, 1.0, 7.0, 1.0]), keep) is not None  # 7 is left out
    assert _ragged._binary(torch.tensor([0.0, 2.0, 1.0, 1.0]), keep) is None
    assert _ragged._binary(torch.tensor([0.0, 0.5, 1.0, 1.0]), keep) is None
    assert _ragged._binary(torch.tensor([0.0, float("nan"), 1.0, 1.0]), keep) is None


@pytest.mark.parametrize("kind", list(RANKINGS))
@pytest.mark.parametrize("columns", [1, 3])
def test_0_1_labels_give_the_general_sums_and_gradients(kind, columns, monkeypatch):
    gen = torch.Generator().manual_seed(4)
    batch = 500
    groups = torch.randint(0, 40, (batch,), generator=gen)
    logits = (torch.randint(-4, 5, (batch, columns), generator=gen).double() / 2).requires_grad_()  # ties
    labels = (torch.rand(batch, columns, generator=gen) < 0.3).double()
    weights = torch.rand(batch, columns, generator=gen, dtype=torch.float64) + 0.5
    mask = torch.rand(batch, columns, generator=gen) < 0.8
    labels[~mask] = float("nan")
    sums, counts = unchecked_ranking_sums(logits, labels, groups, weights, mask, kind)
    (grad,) = torch.autograd.grad(sums.sum(), logits)
    _general(monkeypatch)
    general_sums, general_counts = unchecked_ranking_sums(logits, labels, groups, weights, mask, kind)
    (general_grad,) = torch.autograd.grad(general_sums.sum(), logits)
    # The same runs in the same order: the same sums and gradients, bit for bit.
    assert bool((counts > 0).all())
    assert torch.equal(counts, general_counts)
    assert torch.equal(sums, general_sums)
    assert torch.equal(grad, general_grad)


@pytest.mark.parametrize("span", [2**29, 2**30])  # keys of the int32 sort; keys too wide for it
def test_group_ids_spanning_up_to_2_30_values(span):
    gen = torch.Generator().manual_seed(5)
    batch = 64
    small = torch.randint(0, 2, (batch,), generator=gen)
    logits = torch.randn(batch, 1, generator=gen, dtype=torch.float64)
    labels = (torch.rand(batch, 1, generator=gen) < 0.4).double()
    expected = {kind: unchecked_ranking_sums(logits, labels, small, None, None, kind) for kind in RANKINGS}
    _, bound = _ragged.flat_keys(small * span, torch.ones(batch, 1, dtype=torch.bool))
    assert (2 * bound <= 2**31) == (span == 2**29)
    for kind in RANKINGS:
        sums, counts = unchecked_ranking_sums(logits, labels, small * span, None, None, kind)
        assert torch.equal(counts, expected[kind][1])
        torch.testing.assert_close(sums, expected[kind][0], rtol=1e-12, atol=1e-12)
