"""The focal kernel of the fused BCE (``losses/_fused_bce.py``): its gradient formed in the forward,
its blocks of rows, and its two ways to raise a sigmoid to ``gamma`` (products for an integer
``power``, exponentials otherwise), against the formula of Lin et al. in float64.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from losses import MultiTaskLoss, Task, functional
from losses import _fused_bce as fused
from tests.compiled import assert_compiled_matches_eager

f64 = {"dtype": torch.float64}
#: Logits where the terms of the loss under- or overflow, round to 0 or 1, or cancel.
EXTREME = (-1e4, -100.0, -50.0, -30.0, -20.0, -10.0, -3.0, -0.5, 0.0, 0.5, 3.0, 10.0, 20.0, 30.0, 50.0, 100.0, 1e4)


def _reference(x, y, pos_weight, gamma, focal_alpha=None, label_smoothing=None, weights=None, mask=None):
    """Element losses, float64: -a1 p y' (1 - s)^g log s - a0 (1 - y') s^g log(1 - s), from log-sigmoids."""
    x, y, alpha = x.double(), y.double(), focal_alpha
    if label_smoothing is not None:
        y = y * (1 - label_smoothing.double()) + label_smoothing.double() / 2
    a1 = pos_weight if alpha is None else pos_weight * torch.where(alpha.isnan(), 1.0, alpha.double())
    a0 = torch.ones_like(pos_weight) if alpha is None else torch.where(alpha.isnan(), 1.0, 1 - alpha.double())
    log_s, log_q = F.logsigmoid(x), F.logsigmoid(-x)
    losses = -a1 * y * torch.exp(gamma * log_q) * log_s - a0 * (1 - y) * torch.exp(gamma * log_s) * log_q
    if weights is not None:
        losses = losses * weights.double()
    return losses if mask is None else torch.where(mask, losses, 0.0)


def _kernel(x, y, pos_weight, gamma, power, **options):
    """Per-task sums and the gradient of their total, through the fused node (``power`` as a module passes it)."""
    x = x.clone().requires_grad_()
    sums, total = functional.unchecked_multi_task_bce(
        x, y, pos_weight, factor=1.0, focal_gamma=gamma, focal_power=power, **options
    )
    (grad,) = torch.autograd.grad(total, x)
    return sums.detach(), grad


def _reference_sums_and_gradient(x, y, pos_weight, gamma, **options):
    x = x.double().requires_grad_()
    losses = _reference(x, y, pos_weight.double(), gamma.double(), **options)
    (grad,) = torch.autograd.grad(losses.sum(), x)
    return losses.detach().sum(0), grad


@pytest.mark.parametrize(("gammas", "power"), [((0.0, 2.0), 2), ((0.0, 1.0), 1), ((0.0, 3.0), 3), ((0.0, 2.5), 0)])
@pytest.mark.parametrize(("label", "smoothing"), [(0.0, 0.0), (1.0, 0.0), (1.0, 0.1), (0.3, 0.0)])
def test_float32_extreme_logits_match_float64(gammas, power, label, smoothing):
    # One logit per column (B = 1), so each task's sum is one element loss; each logit under
    # both gammas of the row. The losses (two terms of one sign) are exact to a few float32
    # roundings, relative, down to underflow, and so is the gradient of a hard label (one term);
    # with two targets the gradient's terms cancel, exact to a few roundings of the larger one.
    logits = torch.tensor([EXTREME, EXTREME]).reshape(1, -1)
    gamma = torch.tensor(gammas).repeat_interleave(len(EXTREME))
    columns = logits.shape[1]
    labels = torch.full((1, columns), label)
    pos_weight = torch.full((columns,), 3.0)
    alpha = torch.tensor([0.25, math.nan]).repeat(columns // 2)
    options = {"focal_alpha": alpha, "label_smoothing": torch.full((columns,), smoothing)}
    sums, grad = _kernel(logits, labels, pos_weight, gamma, power, **options)
    ref_sums, ref_grad = _reference_sums_and_gradient(logits, labels, pos_weight, gamma, **options)
    assert sums.dtype == grad.dtype == torch.float32
    torch.testing.assert_close(sums.double(), ref_sums, rtol=4e-6, atol=1e-37)
    one_term = label in (0.0, 1.0) and smoothing == 0.0
    torch.testing.assert_close(grad.double(), ref_grad, rtol=4e-6, atol=1e-37 if one_term else 2e-7)


@pytest.mark.parametrize("power", [0, 2])
def test_float64_blocks_with_weights_and_a_mask_match_the_formula(power):
    # More rows than one block of the kernel holds, and a last block of another height; NaN
    # labels and logits where the mask is false.
    gen = torch.Generator().manual_seed(0)
    batch, tasks = 12345, 14
    x = torch.randn(batch, tasks, generator=gen, **f64) * 4
    y = (torch.rand(batch, tasks, generator=gen) < 0.2).double()
    weights = torch.rand(batch, tasks, generator=gen, **f64) + 0.5
    mask = torch.rand(batch, tasks, generator=gen) < 0.8
    assert batch * tasks > fused._BLOCK_ENTRIES
    gamma = torch.tensor([0.0, 2.0] * (tasks // 2), **f64)
    if power == 0:
        gamma[1] = 0.5
    pos_weight = torch.linspace(1.0, 4.0, tasks, **f64)
    smoothing = torch.full((tasks,), 0.05, **f64)
    nan_x, nan_y = x.masked_fill(~mask, math.nan), y.masked_fill(~mask, math.nan)
    options = {"label_smoothing": smoothing, "weights": weights, "mask": mask}
    sums, grad = _kernel(nan_x, nan_y, pos_weight, gamma, power, **options)
    ref_sums, ref_grad = _reference_sums_and_gradient(x, y, pos_weight, gamma, **options)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)  # two targets: the terms cancel
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize(
    ("gammas", "power"),
    [((0.0, 2.0), 2), ((2.0, 2.0), 2), ((1.0, 0.0), 1), ((3.0,), 3), ((0.0, 0.5), 0), ((2.0, 3.0), 0), ((4.0,), 0)],
)
def test_the_power_is_chosen_at_construction(gammas, power):
    loss = MultiTaskLoss([Task(f"t{i}", focal_gamma=gamma) for i, gamma in enumerate(gammas)])
    assert loss.kinds[0]._focal_power == power
    # A focal row without a gamma (an alpha alone): products with every floor 1, no exp.
    assert MultiTaskLoss([Task("a", focal_alpha=0.25), Task("b")]).kinds[0]._focal_power == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_products_and_exponentials_agree(dtype):
    tasks = [Task("a", focal_gamma=2.0, focal_alpha=0.25), Task("b", label_smoothing=0.1), Task("c", focal_gamma=2.0)]
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(4096, 3, generator=gen, **f64) * 5).to(dtype)
    y = (torch.rand(4096, 3, generator=gen) < 0.3).to(dtype)
    loss = MultiTaskLoss(tasks).to(dtype)
    assert loss.kinds[0]._focal_power == 2
    results = []
    for power in (2, 0):
        loss.kinds[0]._focal_power = power
        z = x.clone().requires_grad_()
        out = loss(z, y)
        out["loss"].backward()
        results.append((out, z.grad))
    (products, product_grad), (exponentials, exponential_grad) = results
    for key in products:
        torch.testing.assert_close(products[key], exponentials[key])
    torch.testing.assert_close(product_grad, exponential_grad)


FOCAL_TASKS = (
    Task("a", focal_gamma=2.0, focal_alpha=0.25, pos_weight=2.0),
    Task("b", label_smoothing=0.1),
    Task("c", focal_gamma=2.0, label_smoothing=0.05),
)


def _focal_batch(batch=64, seed=2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, generator=gen, **f64) * 3
    y = (torch.rand(batch, 3, generator=gen) < 0.3).double()
    weights = torch.rand(batch, 3, generator=gen, **f64) + 0.5
    mask = torch.rand(batch, 3, generator=gen) < 0.8
    return x, y, weights, mask


def _loop_reference(x, y, weights, mask):
    """The mean focal loss of each task, float64, over its labelled rows; and their mean."""
    pos_weight = torch.tensor([2.0, 1.0, 1.0], **f64)
    gamma = torch.tensor([2.0, 0.0, 2.0], **f64)
    alpha = torch.tensor([0.25, math.nan, math.nan], **f64)
    smoothing = torch.tensor([0.0, 0.1, 0.05], **f64)
    losses = _reference(x, y, pos_weight, gamma, alpha, smoothing, weights, mask)
    task_losses = losses.sum(0) / mask.sum(0)
    return task_losses, task_losses.mean()


@pytest.mark.parametrize("gammas", [(2.0, 0.0, 2.0), (2.0, 0.0, 2.5)], ids=["products", "exponentials"])
def test_a_second_backward_with_retain_graph_forms_the_gradient_again(gammas):
    # The first backward scales the forward's gradient in place; a second one must not see that.
    tasks = [dataclasses.replace(task, focal_gamma=gamma) for task, gamma in zip(FOCAL_TASKS, gammas, strict=True)]
    x, y, weights, mask = _focal_batch()
    loss = MultiTaskLoss(tasks).double()
    z = x.clone().requires_grad_()
    out = loss(z, y, weights, mask)
    (first,) = torch.autograd.grad(out["loss"], z, retain_graph=True)
    (second,) = torch.autograd.grad(out["loss"], z, retain_graph=True)
    (task_grad,) = torch.autograd.grad(out["loss/a"], z, retain_graph=True)
    out["loss"].backward(retain_graph=True)
    out["loss"].backward()
    ref_z = x.clone().requires_grad_()
    gamma, alpha = torch.tensor(gammas, **f64), torch.tensor([0.25, math.nan, math.nan], **f64)
    smoothing, pos_weight = torch.tensor([0.0, 0.1, 0.05], **f64), torch.tensor([2.0, 1.0, 1.0], **f64)
    ref_tasks = _reference(ref_z, y, pos_weight, gamma, alpha, smoothing, weights, mask).sum(0) / mask.sum(0)
    (ref,) = torch.autograd.grad(ref_tasks.mean(), ref_z, retain_graph=True)
    (ref_task,) = torch.autograd.grad(ref_tasks[0], ref_z)
    torch.testing.assert_close(first, ref)
    torch.testing.assert_close(second, ref)
    torch.testing.assert_close(task_grad, ref_task)
    torch.testing.assert_close(z.grad, 2 * ref)


def test_values_and_gradients_match_the_formula_in_float64():
    x, y, weights, mask = _focal_batch(batch=300)
    z = x.clone().requires_grad_()
    out = MultiTaskLoss(FOCAL_TASKS).double()(z, y.masked_fill(~mask, math.nan), weights, mask)
    out["loss"].backward()
    ref_z = x.clone().requires_grad_()
    task_losses, total = _loop_reference(ref_z, y, weights, mask)
    total.backward()
    torch.testing.assert_close(torch.stack([out[f"loss/{t.name}"] for t in FOCAL_TASKS]), task_losses.detach())
    torch.testing.assert_close(z.grad, ref_z.grad)


def test_no_gradient_is_formed_when_none_is_asked(monkeypatch):
    formed = []
    kernel = fused._focal_sums

    def recording(*args, **kwargs):
        sums, grad = kernel(*args, **kwargs)
        formed.append(grad is not None)
        return sums, grad

    monkeypatch.setattr(fused, "_focal_sums", recording)
    x, y, weights, mask = _focal_batch()
    loss = MultiTaskLoss(FOCAL_TASKS).double()
    z = x.clone().requires_grad_()
    with_grad = loss(z, y, weights, mask)
    with torch.no_grad():
        without = loss(z, y, weights, mask)
    detached = loss(x, y, weights, mask)
    assert formed == [True, False, False]
    for key in with_grad:
        assert torch.equal(without[key], with_grad[key].detach()), key
        assert torch.equal(detached[key], with_grad[key].detach()), key


def test_double_backward_with_products():
    x, y, weights, mask = _focal_batch(batch=6)
    loss = MultiTaskLoss(FOCAL_TASKS).double()
    assert loss.kinds[0]._focal_power == 2
    z = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: loss(t, y, weights, mask)["loss"], (z,))
    assert torch.autograd.gradgradcheck(lambda t: loss(t, y, weights, mask)["loss"], (z,))


def test_infinite_logits_of_tasks_without_modulation():
    # With products, a gamma-0 task's modulation is exactly 1 also at an infinite logit (the
    # exponential form gave exp(0 * -inf), NaN): its loss is inf where the logit is infinitely
    # wrong, as a focal task's; torch's BCE gives inf for (+inf, 0) and NaN for (-inf, 1).
    loss = MultiTaskLoss([Task("focal", focal_gamma=2.0), Task("plain", pos_weight=2.0)])
    for logit, label, torch_value in ((math.inf, 0.0, math.inf), (-math.inf, 1.0, math.nan)):
        x, y = torch.full((1, 2), logit), torch.full((1, 2), label)
        out = loss(x, y)
        assert out["loss/plain"].item() == out["loss/focal"].item() == math.inf
        reference = F.binary_cross_entropy_with_logits(x[:, 1], y[:, 1], pos_weight=torch.tensor(2.0)).item()
        assert reference == torch_value or math.isnan(reference) == math.isnan(torch_value)


def test_torch_compile_fullgraph_with_products():
    x, y, weights, mask = _focal_batch()
    loss = MultiTaskLoss(FOCAL_TASKS)
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    assert_compiled_matches_eager(loss, compiled, x.float(), y.float(), weights.float(), mask)
    torch._dynamo.reset()


def test_a_replaced_gamma_buffer_takes_exponentials():
    # torch.func.functional_call may hand the row another focal_gamma: the power read from the
    # Tasks at construction no longer holds, and the kernel takes the exponentials of the buffer's.
    x, y, weights, mask = _focal_batch()
    loss = MultiTaskLoss(FOCAL_TASKS).double()
    replaced = [
        dataclasses.replace(task, focal_gamma=gamma) for task, gamma in zip(FOCAL_TASKS, (0.5, 0.0, 2.0), strict=True)
    ]
    expected = MultiTaskLoss(replaced).double()(x, y, weights, mask)
    gamma = torch.tensor([0.5, 0.0, 2.0], **f64)
    out = torch.func.functional_call(loss, {"kinds.0.focal_gamma": gamma}, (x, y, weights, mask))
    for key in expected:
        torch.testing.assert_close(out[key], expected[key])
    assert loss.kinds[0]._focal_power == 2
    moved = copy.deepcopy(loss).float()  # a cast keeps the power: the same Tasks, the same values
    assert moved.kinds[0].focal_gamma is moved.kinds[0]._gamma_of_power
