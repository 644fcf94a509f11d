"""The fused pair losses (losses._pair_losses): values and gradients against plain autograd ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from losses._pair_losses import PAIR_LOSSES, SortedPairLossSums, sorted_pair_loss_sums

REFERENCE = {"logistic": F.softplus, "hinge": lambda z: torch.relu(1 + z)}


# ---- SortedPairLossSums: the pair weights formed from sorted rows, the gradient in entry order ----


def _sorted_pairs(columns: int, dtype: torch.dtype, weighted: bool, swap: bool) -> tuple[torch.Tensor, ...]:
    """``columns`` blocks of 8 entries, a random sort order, pairs inside a block, rows ``[x, (gain, disc), (w)]``."""
    gen = torch.Generator().manual_seed(10 * columns + 2 * weighted + swap)
    n = 8 * columns
    x = (torch.randn(n, generator=gen, dtype=dtype) * 3).requires_grad_()
    order = torch.randperm(n, generator=gen)
    # Sorted position i holds entry order[i]: pairs are of two sorted positions of the same column.
    by_column = order.argsort().reshape(columns, 8)  # the sorted positions of each column's entries
    first = torch.randint(0, 8, (30,), generator=gen)
    second = (first + torch.randint(1, 8, (30,), generator=gen)) % 8
    column = torch.randint(0, columns, (30,), generator=gen)
    higher, lower = by_column[column, first], by_column[column, second]
    rows = [x.detach().index_select(0, order)]
    if swap:
        rows += [torch.rand(n, generator=gen, dtype=dtype), torch.rand(n, generator=gen, dtype=dtype)]
    if weighted:
        rows.append(torch.rand(n, generator=gen, dtype=dtype) + 0.5)
    return x, torch.stack(rows), order, higher, lower, column


def _sorted_reference(x, rows, order, higher, lower, column, columns, kind):
    """Plain autograd ops, member by member: the weight is w_h w_l |gain_h - gain_l| |disc_h - disc_l|."""
    sorted_x = x[order]
    weight = torch.ones_like(higher, dtype=x.dtype)
    if len(rows) in (2, 4):
        weight = weight * rows[-1, higher] * rows[-1, lower]
    if len(rows) >= 3:
        weight = weight * (rows[1, higher] - rows[1, lower]).abs() * (rows[2, higher] - rows[2, lower]).abs()
    per_pair = REFERENCE[kind](sorted_x[lower] - sorted_x[higher]) * weight
    return torch.zeros(columns, dtype=x.dtype).index_add(0, column, per_pair)


@pytest.mark.parametrize("kind", sorted(PAIR_LOSSES))
@pytest.mark.parametrize("columns", [1, 3])
@pytest.mark.parametrize(("weighted", "swap"), [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sorted_rows_values_and_gradients_match_autograd(kind, columns, weighted, swap, dtype):
    x, rows, order, higher, lower, column = _sorted_pairs(columns, dtype, weighted, swap)
    col = None if columns == 1 else column
    expected = _sorted_reference(x, rows, order, higher, lower, column, columns, kind)
    scale = torch.arange(1.0, columns + 1, dtype=dtype)
    (expected_grad,) = torch.autograd.grad((expected * scale).sum(), x)
    got = SortedPairLossSums.apply(x, rows, order, higher, lower, col, columns, kind, weighted, swap)
    (grad,) = torch.autograd.grad((got * scale).sum(), x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert expected_grad.abs().sum() > 0


@pytest.mark.parametrize("kind", sorted(PAIR_LOSSES))
@pytest.mark.parametrize("columns", [1, 3])
def test_sorted_rows_gradcheck(kind, columns):
    x, rows, order, higher, lower, column = _sorted_pairs(columns, torch.float64, True, True)
    if kind == "hinge":  # keep margins off the kink, where the derivative is one-sided
        keep = (rows[0, lower] - rows[0, higher] + 1).abs() > 1e-3
        higher, lower, column = higher[keep], lower[keep], column[keep]
    col = None if columns == 1 else column

    def sums(z: torch.Tensor) -> torch.Tensor:
        # The rows hold the sorted logits as values: gradcheck's perturbed inputs must reach them too.
        moved = torch.cat([z.detach()[order].unsqueeze(0), rows[1:]])
        return SortedPairLossSums.apply(z, moved, order, higher, lower, col, columns, kind, True, True)

    assert torch.autograd.gradcheck(sums, (x,))


def test_sorted_rows_learnt_weights_run_as_plain_ops_with_their_gradient():
    x, rows, order, higher, lower, _ = _sorted_pairs(1, torch.float64, True, False)
    rows = rows.clone().requires_grad_()
    got = sorted_pair_loss_sums(x, rows, order, higher, lower, None, 1, "logistic", True, False)
    expected = _sorted_reference(x, rows, order, higher, lower, torch.zeros_like(higher), 1, "logistic")
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got.sum(), (x, rows))
    expected_grads = torch.autograd.grad(expected.sum(), (x, rows))
    torch.testing.assert_close(grads, expected_grads)
    assert grads[1][-1].abs().sum() > 0


def test_sorted_rows_under_torch_func_run_as_plain_ops():
    x, rows, order, higher, lower, _ = _sorted_pairs(1, torch.float64, True, True)
    grad = torch.func.grad(
        lambda z: sorted_pair_loss_sums(z, rows, order, higher, lower, None, 1, "logistic", True, True).sum()
    )(x.detach())
    expected = _sorted_reference(x, rows, order, higher, lower, torch.zeros_like(higher), 1, "logistic")
    torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), x)[0])


def test_logistic_slope_past_the_softplus_threshold_is_about_one():
    x = torch.tensor([0.0, 30.0, 30.0], dtype=torch.float64, requires_grad=True)
    order = torch.arange(3)
    higher, lower = torch.tensor([0, 2]), torch.tensor([1, 0])
    rows = x.detach().unsqueeze(0)
    sums = sorted_pair_loss_sums(x, rows, order, higher, lower, None, 1, "logistic", False, False)
    sums.sum().backward()
    # margin 30 (slope exactly 1: x[1] +1, x[0] -1) and margin -30 (slope sigmoid(-30): x[0] +, x[2] -)
    small = torch.sigmoid(torch.tensor(-30.0, dtype=torch.float64))
    torch.testing.assert_close(x.grad, torch.stack([small - 1, torch.tensor(1.0, dtype=torch.float64), -small]))


@pytest.mark.parametrize(("weighted", "swap"), [(False, False), (True, False), (False, True), (True, True)])
def test_fused_sums_are_bit_for_bit_the_plain_ops_sums(weighted, swap):
    """The fused pass forms the weights in place over its gathered rows: the same ops, the same bits.

    An in-place |delta NDCG| without weights once summed a row of the gathers (another offset, so
    another summation order in the dot product): float32 sums then moved in the last bit.
    """
    gen = torch.Generator().manual_seed(5)
    n, pairs = 4000, 50001  # rows of the gathers at an offset that is no multiple of 64 bytes
    x = torch.randn(n, generator=gen)
    order = torch.randperm(n, generator=gen)
    higher, lower = torch.randint(0, n, (pairs,), generator=gen), torch.randint(0, n, (pairs,), generator=gen)
    rows = [x.index_select(0, order)]
    if swap:
        rows += [torch.rand(n, generator=gen), torch.rand(n, generator=gen)]
    if weighted:
        rows.append(torch.rand(n, generator=gen) + 0.5)
    stacked = torch.stack(rows)
    fused = SortedPairLossSums.apply(x, stacked, order, higher, lower, None, 1, "logistic", weighted, swap)
    with torch.enable_grad():  # a rows tensor that requires grad takes the plain ops
        plain = sorted_pair_loss_sums(
            x, stacked.requires_grad_(), order, higher, lower, None, 1, "logistic", weighted, swap
        )
    assert torch.equal(fused, plain.detach())
