"""The fused softmax list loss (losses._list_losses): values and gradients against the same math as plain ops."""

from __future__ import annotations

import math

import pytest
import torch

from losses import ranking_losses
from losses._list_losses import SoftmaxListSums


def _entries(columns: int, dtype: torch.dtype, weighted: bool, seed: int = 0) -> ranking_losses.Ragged:
    """Graded labels in 9 groups of 1 to 8 rows per column, 20% left out holding NaN, weights or none."""
    gen = torch.Generator().manual_seed(seed + 10 * columns + weighted)
    batch = 40
    logits = (torch.randn(batch, columns, generator=gen, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, 3, (batch, columns), generator=gen).to(dtype)
    groups = torch.randint(0, 9, (batch,), generator=gen) * 5 - 7
    mask = torch.rand(batch, columns, generator=gen) < 0.8
    weights = (torch.rand(batch, columns, generator=gen, dtype=torch.float64) + 0.5).to(dtype) if weighted else None
    logits[~mask] = math.nan
    labels[~mask] = math.inf
    return ranking_losses.ragged_entries(logits.requires_grad_(), labels, groups, weights, mask)


@pytest.mark.parametrize("columns", [1, 3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_values_and_gradients_match_plain_ops(columns, weighted, dtype):
    ragged = _entries(columns, dtype, weighted)
    (sums, counts), (expected_sums, expected_counts) = (
        ranking_losses._softmax_term(ragged),
        ranking_losses._softmax_plain(ragged),
    )
    torch.testing.assert_close(sums, expected_sums)
    torch.testing.assert_close(counts, expected_counts)
    assert bool((counts > 0).all())
    scale = torch.arange(1.0, columns + 1, dtype=dtype)
    (grad,) = torch.autograd.grad((sums * scale).sum(), ragged.logits)
    (expected_grad,) = torch.autograd.grad((expected_sums * scale).sum(), ragged.logits)
    torch.testing.assert_close(grad, expected_grad)
    assert bool(grad.isfinite().all())
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("columns", [1, 3])
def test_gradcheck(columns):
    ragged = _entries(columns, torch.float64, True, seed=1)
    runs, order = ragged.runs, ragged.runs.order
    run_column = None if runs.column is None else torch.zeros_like(runs.start).scatter_(0, runs.start, runs.column)
    x = torch.where(ragged.keep, ragged.logits, 0.0).detach().requires_grad_()
    others = torch.stack([ragged.labels, ragged.weights])

    def sums(z: torch.Tensor) -> torch.Tensor:
        # The rows hold the logits as values: gradcheck's perturbed inputs must reach them too.
        rows = torch.cat([z.detach().unsqueeze(0), others]).index_select(1, order)
        return SoftmaxListSums.apply(z, rows, order, runs.start, runs.higher, run_column, columns, True)[0]

    assert torch.autograd.gradcheck(sums, (x,))


def test_learnt_weights_run_as_plain_ops_with_their_gradient():
    ragged = _entries(1, torch.float64, True, seed=2)
    weights = ragged.weights.detach().requires_grad_()
    ragged = ragged._replace(weights=weights)
    sums, _ = ranking_losses._softmax_term(ragged)
    (grad,) = torch.autograd.grad(sums.sum(), weights)
    assert bool(grad[ragged.keep].ne(0).any())
    assert torch.equal(grad[~ragged.keep], torch.zeros(int((~ragged.keep).sum()), dtype=torch.float64))


def test_under_torch_func_the_same_math_runs_as_plain_ops():
    ragged = _entries(1, torch.float64, False, seed=3)
    x = torch.where(ragged.keep, ragged.logits, 0.0).detach()

    def total(z: torch.Tensor) -> torch.Tensor:
        return ranking_losses._softmax_term(ragged._replace(logits=z))[0].sum()

    grad = torch.func.grad(total)(x)
    (expected,) = torch.autograd.grad(
        ranking_losses._softmax_plain(ragged._replace(logits=x.requires_grad_()))[0].sum(), x
    )
    torch.testing.assert_close(grad, expected)
