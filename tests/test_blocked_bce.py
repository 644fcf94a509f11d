"""The plain fused BCE in blocks of rows (``losses/_fused_bce.py``, from ``_BLOCKED_ENTRIES`` entries):
its gradient formed in the forward and scaled in the backward, against torch's BCE and against the
whole-block kernel that smaller blocks use.

The block sizes are lowered here so that small inputs cross several blocks (and a ragged last one);
one test runs at the real sizes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from losses import MultiTaskLoss, functional
from losses import _fused_bce as fused

f64 = {"dtype": torch.float64}


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 entries from 256 entries on: a [37, 8] block runs as five blocks of 8 rows."""
    monkeypatch.setattr(fused, "_BLOCK_ENTRIES", 64)
    monkeypatch.setattr(fused, "_BLOCKED_ENTRIES", 256)


def _inputs(batch, tasks, dtype, seed=0, extreme=False):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, tasks, generator=gen, dtype=torch.float64) * 3).to(dtype)
    y = (torch.rand(batch, tasks, generator=gen) < 0.3).to(dtype)
    weights = (torch.rand(batch, tasks, generator=gen) + 0.5).to(dtype)
    mask = torch.rand(batch, tasks, generator=gen) < 0.8
    pos_weight = (torch.rand(tasks, generator=gen) * 4 + 0.5).to(dtype)
    if extreme:  # huge and infinite logits where labelled, NaN and infinities where not
        x[0, 0], x[1, 1], x[2, 0] = 1e30, -1e30, float("inf")
        y[2, 0] = 0.0
        mask[:3, :2] = True
        mask[3:6, 0] = False
        x[3, 0], x[4, 0], x[5, 0] = float("nan"), float("inf"), -float("inf")
    return x, y, weights, mask, pos_weight


def _sums_and_gradient(x, y, pos_weight, weights, mask, factor=1.0):
    x = x.clone().requires_grad_()
    sums, total = functional.unchecked_multi_task_bce(x, y, pos_weight, weights, mask, factor=factor)
    (grad,) = torch.autograd.grad(total, x)
    return sums.detach(), grad


def _torch_sums_and_gradient(x, y, pos_weight, weights, mask):
    """torch's BCE element losses, weighed, the unlabelled entries' inputs replaced before the math."""
    x = x.clone().requires_grad_()
    labelled_x = torch.where(mask, x, 0.0)
    losses = F.binary_cross_entropy_with_logits(
        labelled_x, torch.where(mask, y, 0.0), weight=weights, pos_weight=pos_weight, reduction="none"
    )
    losses = torch.where(mask, losses, 0.0)
    (grad,) = torch.autograd.grad(losses.sum(), x)
    return losses.detach().sum(0), grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("batch", "tasks"), [(37, 8), (64, 16), (300, 3)])
@pytest.mark.parametrize("weighted", [True, False])
def test_blocks_match_torch_with_a_mask_and_nan_labels(small_blocks, dtype, batch, tasks, weighted):
    x, y, weights, mask, pos_weight = _inputs(batch, tasks, dtype)
    weights = weights if weighted else None
    nan_labels = torch.where(mask, y, float("nan"))
    sums, grad = _sums_and_gradient(x, nan_labels, pos_weight, weights, mask)
    want_sums, want_grad = _torch_sums_and_gradient(
        x, y, pos_weight, torch.ones_like(x) if weights is None else weights, mask
    )
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(sums, want_sums, **tolerance)
    torch.testing.assert_close(grad, want_grad, **tolerance)
    assert not grad[~mask].any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_blocks_give_the_whole_block_kernel_values(small_blocks, monkeypatch, dtype):
    """Row weights ``[B]``, no mask, extreme logits: the blocked and whole-block kernels agree."""
    x, y, weights, mask, pos_weight = _inputs(301, 5, dtype, seed=1, extreme=True)
    row_weights = weights[:, 0]
    got = _sums_and_gradient(x, y, pos_weight, row_weights, None, factor=0.25)
    got_masked = _sums_and_gradient(x, torch.where(mask, y, float("nan")), pos_weight, weights, mask)
    monkeypatch.setattr(fused, "_BLOCKED_ENTRIES", 10**9)  # the whole-block kernel
    want = _sums_and_gradient(x, y, pos_weight, row_weights, None, factor=0.25)
    want_masked = _sums_and_gradient(x, torch.where(mask, y, float("nan")), pos_weight, weights, mask)
    tolerance = {"rtol": 1e-12, "atol": 0.0} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    for (sums, grad), (want_sums, want_grad) in ((got, want), (got_masked, want_masked)):
        torch.testing.assert_close(sums, want_sums, equal_nan=True, **tolerance)
        torch.testing.assert_close(grad, want_grad, equal_nan=True, **tolerance)
    # +inf with label 0 is inf, as in torch; the NaN and infinite logits left out by the mask add nothing.
    assert got_masked[0][0].item() == float("inf")
    assert got_masked[1][3:6, 0].tolist() == [0.0, 0.0, 0.0]


def test_a_second_backward_and_per_task_losses(small_blocks):
    """retain_graph: the second backward forms the gradient again, bit for bit; per-task losses backpropagate."""
    x, y, weights, mask, pos_weight = _inputs(90, 6, torch.float64, seed=2)
    loss = MultiTaskLoss([f"t{i}" for i in range(6)], pos_weights=pos_weight.tolist()).double()
    x.requires_grad_()
    out = loss(x, torch.where(mask, y, float("nan")), weights, mask)
    (first,) = torch.autograd.grad(out["loss"], x, retain_graph=True)
    (second,) = torch.autograd.grad(out["loss"], x, retain_graph=True)
    assert torch.equal(first, second)
    (per_task,) = torch.autograd.grad(out["loss/t2"] * 3.0 + out["loss/t4"], x)
    _, want = _torch_sums_and_gradient(x.detach(), y, pos_weight, weights, mask)
    counts = mask.sum(0).double()
    factor = torch.zeros(6, **f64)
    factor[2], factor[4] = 3.0 / counts[2], 1.0 / counts[4]
    torch.testing.assert_close(per_task, want * factor, rtol=1e-12, atol=1e-14)


def test_gradcheck_and_double_backward(small_blocks):
    x, y, weights, mask, pos_weight = _inputs(40, 8, torch.float64, seed=3)
    x.requires_grad_()

    def total(logits):
        return functional.unchecked_multi_task_bce(logits, y, pos_weight, weights, mask, factor=0.5)[1]

    assert torch.autograd.gradcheck(total, (x,))
    assert torch.autograd.gradgradcheck(total, (x,))


def test_no_gradient_is_formed_without_grad(small_blocks):
    x, y, weights, mask, pos_weight = _inputs(50, 8, torch.float64, seed=4)
    with torch.no_grad():
        sums, _ = functional.unchecked_multi_task_bce(x.requires_grad_(), y, pos_weight, weights, mask)
    want, _ = _torch_sums_and_gradient(x.detach(), y, pos_weight, weights, mask)
    torch.testing.assert_close(sums, want, rtol=1e-12, atol=1e-12)


def test_real_block_sizes_match_torch():
    """At the real sizes: 2^21 entries in sixteen blocks of 2^17, float32, a mask with NaN labels."""
    batch, tasks = 32768, 64
    assert batch * tasks >= fused._BLOCKED_ENTRIES
    assert batch * tasks > fused._BLOCK_ENTRIES
    x, y, weights, mask, pos_weight = _inputs(batch, tasks, torch.float32, seed=5)
    sums, grad = _sums_and_gradient(x, torch.where(mask, y, float("nan")), pos_weight, weights, mask)
    want_sums, want_grad = _torch_sums_and_gradient(x.double(), y.double(), pos_weight.double(), weights.double(), mask)
    torch.testing.assert_close(sums.double(), want_sums, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)
