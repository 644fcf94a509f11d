"""The ranked columns' fork (losses._column_fork): the gradients of both reads meet in one buffer, unchanged."""

from __future__ import annotations

import pytest
import torch

from losses import MultiTaskLoss, Task
from losses import _column_fork as fork_module
from losses._column_fork import ColumnFork, fork_columns

SPANS = {"span": ((1, 2), torch.tensor([1, 2])), "index": (None, torch.tensor([3, 0]))}


def _plain(x, span, index):
    return x, (x.narrow(1, *span) if span is not None else x.index_select(1, index))


@pytest.mark.parametrize("columns", list(SPANS))
def test_values_and_gradients_are_those_of_two_plain_reads(columns):
    span, index = SPANS[columns]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    up_all, up_cols = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(6, 2, generator=gen)
    grads = []
    for read in (ColumnFork.apply, _plain):
        every, cols = read(x, span, index)
        assert torch.equal(every, x.detach())
        assert torch.equal(cols, _plain(x, span, index)[1].detach())
        (grad,) = torch.autograd.grad((every * up_all).sum() + (cols.sin() * up_cols).sum(), x)
        grads.append(grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("columns", list(SPANS))
def test_one_read_alone_and_a_broadcast_gradient(columns):
    span, index = SPANS[columns]
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    every, cols = ColumnFork.apply(x, span, index)
    (only_cols,) = torch.autograd.grad(cols.sum() * 3, x, retain_graph=True)
    expected = torch.zeros(5, 4, dtype=torch.float64)
    expected[:, index] = 3
    assert torch.equal(only_cols, expected)
    (only_every,) = torch.autograd.grad((every * 2).sum(), x, retain_graph=True)
    assert torch.equal(only_every, torch.full((5, 4), 2.0, dtype=torch.float64))
    # every.sum() sends a broadcast (expanded, not contiguous) gradient: it is copied, not written through.
    (both,) = torch.autograd.grad(every.sum() + cols.sum(), x)
    assert torch.equal(both, expected / 3 + 1)


@pytest.mark.parametrize("columns", list(SPANS))
def test_gradcheck_and_gradgradcheck(columns):
    span, index = SPANS[columns]
    x = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)

    def f(z):
        every, cols = ColumnFork.apply(z, span, index)
        return (every**2).sum() + (cols**3).sum()

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_no_fork_without_a_gradient_to_form():
    x = torch.randn(3, 4)
    every, cols = fork_columns(x, (1, 2), torch.tensor([1, 2]))
    assert every is x
    assert cols._base is x
    with torch.no_grad():
        every, cols = fork_columns(x.requires_grad_(), (1, 2), torch.tensor([1, 2]))
    assert every is x
    assert every.grad_fn is None


def _ranked_head(consecutive):
    tasks = [Task("a", pos_weight=2.0), Task("b", ranking="lambda_ndcg"), Task("c"), Task("d", ranking="softmax")]
    if consecutive:  # the ranked logits are one span of columns, read as a view
        tasks[2] = Task("c", ranking="lambda_ndcg")
        tasks[3] = Task("d")
    gen = torch.Generator().manual_seed(3)
    batch = 64
    logits = torch.randn(batch, 4, generator=gen, requires_grad=True)
    labels = (torch.rand(batch, 4, generator=gen) < 0.4).float()
    weights = torch.rand(batch, 4, generator=gen) + 0.5
    mask = torch.rand(batch, 4, generator=gen) < 0.8
    groups = torch.randint(0, 8, (batch,), generator=gen)
    return MultiTaskLoss(tasks), (logits, labels, weights, mask), groups


@pytest.mark.parametrize("consecutive", [True, False])
def test_the_loss_gradient_is_bitwise_that_of_two_plain_reads(consecutive, monkeypatch):
    loss, inputs, groups = _ranked_head(consecutive)
    assert (loss.ranking._spans is not None) == consecutive
    (forked,) = torch.autograd.grad(loss(*inputs, groups=groups)["loss"], inputs[0])
    monkeypatch.setattr(fork_module, "fork_columns", _plain)
    monkeypatch.setattr("losses._ranking_terms.fork_columns", _plain)
    (plain,) = torch.autograd.grad(loss(*inputs, groups=groups)["loss"], inputs[0])
    assert forked.abs().sum() > 0
    assert torch.equal(forked, plain)


def test_a_second_backward_gives_the_same_gradient():
    loss, inputs, groups = _ranked_head(consecutive=True)
    total = loss(*inputs, groups=groups)["loss"]
    (first,) = torch.autograd.grad(total, inputs[0], retain_graph=True)
    (second,) = torch.autograd.grad(total, inputs[0])
    assert torch.equal(first, second)
