"""The fused pair losses (losses._pair_losses): values and gradients against plain autograd ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from losses._pair_losses import PAIR_LOSSES, PairLossSums, pair_loss_sums

REFERENCE = {"logistic": F.softplus, "hinge": lambda z: torch.relu(1 + z)}


def _pairs(columns: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(columns)
    x = (torch.randn(12, generator=gen, dtype=dtype) * 3).requires_grad_()
    higher = torch.randint(0, 12, (40,), generator=gen)
    lower = torch.randint(0, 12, (40,), generator=gen)
    weight = (torch.rand(40, generator=gen, dtype=dtype) + 0.5).requires_grad_()
    column = torch.randint(0, columns, (40,), generator=gen)
    return x, higher, lower, weight, column


@pytest.mark.parametrize("kind", sorted(PAIR_LOSSES))
@pytest.mark.parametrize("columns", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_values_and_gradients_match_autograd(kind, columns, dtype):
    x, higher, lower, weight, column = _pairs(columns, dtype)
    per_pair = REFERENCE[kind](x[lower] - x[higher]) * weight
    expected = (
        per_pair.sum().reshape(1) if columns == 1 else torch.zeros(columns, dtype=dtype).index_add(0, column, per_pair)
    )
    scale = torch.arange(1.0, columns + 1, dtype=dtype)
    expected_grads = torch.autograd.grad((expected * scale).sum(), (x, weight))
    got = PairLossSums.apply(x, higher, lower, weight, None if columns == 1 else column, columns, kind)
    grads = torch.autograd.grad((got * scale).sum(), (x, weight))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grads, expected_grads)


@pytest.mark.parametrize("kind", sorted(PAIR_LOSSES))
@pytest.mark.parametrize("columns", [1, 3])
def test_gradcheck(kind, columns):
    x, higher, lower, weight, column = _pairs(columns, torch.float64)
    if kind == "hinge":  # keep margins off the kink, where the derivative is one-sided
        margin = (x[lower] - x[higher]).detach()
        keep = (margin + 1).abs() > 1e-3
        higher, lower, weight, column = higher[keep], lower[keep], weight.detach()[keep].requires_grad_(), column[keep]
    col = None if columns == 1 else column
    assert torch.autograd.gradcheck(
        lambda a, b: PairLossSums.apply(a, higher, lower, b, col, columns, kind), (x, weight)
    )


def test_logistic_slope_past_the_softplus_threshold_is_about_one():
    x = torch.tensor([0.0, 30.0, 30.0], dtype=torch.float64, requires_grad=True)
    higher, lower = torch.tensor([0, 2]), torch.tensor([1, 0])
    pair_loss_sums(x, higher, lower, torch.ones(2, dtype=torch.float64), None, 1, "logistic").sum().backward()
    # margin 30 (slope exactly 1: x[1] +1, x[0] -1) and margin -30 (slope sigmoid(-30): x[0] +, x[2] -)
    small = torch.sigmoid(torch.tensor(-30.0, dtype=torch.float64))
    torch.testing.assert_close(x.grad, torch.stack([small - 1, torch.tensor(1.0, dtype=torch.float64), -small]))


def test_under_torch_func_the_same_math_runs_as_plain_ops():
    x, higher, lower, weight, _ = _pairs(1, torch.float64)
    weight = weight.detach()
    grad = torch.func.grad(lambda z: pair_loss_sums(z, higher, lower, weight, None, 1, "logistic").sum())(x.detach())
    expected = torch.autograd.grad((F.softplus(x[lower] - x[higher]) * weight).sum(), x)[0]
    torch.testing.assert_close(grad, expected)
