"""torch.func transforms (grad, vmap, jacrev, jvp) through MultiTaskLoss, for every task count and kind.

The reference is torch's own BCE per task, written with masks as multipliers (the test data holds
no NaN), which every transform can follow.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jacrev, jvp, vmap

from losses import MultiTaskLoss, Task

# torch's first jvp builds its decompositions with torch.jit.script, which warns in torch 2.13.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

POS_WEIGHTS = [1.0, 2.0, 0.5, 10.0, 3.0]


def _data(num_tasks, use_mask, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, num_tasks, generator=gen, dtype=torch.float64)
    labels = (torch.rand(6, num_tasks, generator=gen) < 0.4).double()
    weights = torch.rand(6, num_tasks, generator=gen, dtype=torch.float64) + 0.5
    mask = torch.rand(6, num_tasks, generator=gen) < 0.7 if use_mask else None
    return logits, labels, weights, mask


def _ours(num_tasks, use_mask, task_loss_reduction="mean", global_reduction="mean"):
    _, labels, weights, mask = _data(num_tasks, use_mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loss = MultiTaskLoss(
            [f"t{i}" for i in range(num_tasks)],
            pos_weights=POS_WEIGHTS[:num_tasks],
            task_weights=[1.0, 0.5, 2.0, 1.0, 3.0][:num_tasks],
            task_loss_reduction=task_loss_reduction,
            global_reduction=global_reduction,
        ).double()

    def per_task_and_total(z):
        out = loss(z, labels, weights, mask)
        return torch.stack(list(out.values()))

    return per_task_and_total


def _reference(num_tasks, use_mask, task_loss_reduction="mean", global_reduction="mean"):
    _, labels, weights, mask = _data(num_tasks, use_mask)
    labelled = torch.ones_like(labels) if mask is None else mask.double()
    pos_weight = torch.tensor(POS_WEIGHTS[:num_tasks], dtype=torch.float64)
    task_weight = torch.tensor([1.0, 0.5, 2.0, 1.0, 3.0][:num_tasks], dtype=torch.float64)

    def per_task_and_total(z):
        elements = F.binary_cross_entropy_with_logits(
            z, labels, weight=weights, pos_weight=pos_weight, reduction="none"
        )
        task = (elements * labelled).sum(0)
        if task_loss_reduction == "mean":
            task = task / labelled.sum(0).clamp(min=1)
        weighted = task * task_weight
        total = {"mean": weighted.mean, "sum": weighted.sum, "max": weighted.max}[global_reduction]()
        return torch.cat([task, total.unsqueeze(0)])

    return per_task_and_total


CASES = [(1, False), (1, True), (2, False), (5, True)]


@pytest.mark.parametrize(("num_tasks", "use_mask"), CASES)
@pytest.mark.parametrize("reductions", [("mean", "mean"), ("sum", "max")])
def test_grad(num_tasks, use_mask, reductions):
    x = _data(num_tasks, use_mask)[0]
    ours_fn, ref_fn = _ours(num_tasks, use_mask, *reductions), _reference(num_tasks, use_mask, *reductions)
    ours = grad(lambda z: ours_fn(z)[-1])(x)
    ref = grad(lambda z: ref_fn(z)[-1])(x)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize(("num_tasks", "use_mask"), CASES)
def test_vmap_over_a_stack_of_logits(num_tasks, use_mask):
    xs = torch.randn(4, 6, num_tasks, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = vmap(_ours(num_tasks, use_mask))(xs)
    torch.testing.assert_close(ours, torch.stack([_reference(num_tasks, use_mask)(x) for x in xs]))


@pytest.mark.parametrize(("num_tasks", "use_mask"), CASES)
def test_jacrev_of_every_output(num_tasks, use_mask):
    x = _data(num_tasks, use_mask)[0]
    ours = jacrev(_ours(num_tasks, use_mask))(x)
    assert ours.shape == (num_tasks + 1, 6, num_tasks)
    torch.testing.assert_close(ours, jacrev(_reference(num_tasks, use_mask))(x))


@pytest.mark.parametrize(("num_tasks", "use_mask"), CASES)
def test_jvp(num_tasks, use_mask):
    x = _data(num_tasks, use_mask)[0]
    tangent = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ours_value, ours_tangent = jvp(_ours(num_tasks, use_mask), (x,), (tangent,))
    ref_value, ref_tangent = jvp(_reference(num_tasks, use_mask), (x,), (tangent,))
    torch.testing.assert_close(ours_value, ref_value)
    torch.testing.assert_close(ours_tangent, ref_tangent)


def test_hessian_of_a_masked_multi_task_loss():
    x = _data(3, True)[0]
    ours_fn, ref_fn = _ours(3, True), _reference(3, True)
    ours = torch.func.hessian(lambda z: ours_fn(z)[-1])(x)
    ref = torch.func.hessian(lambda z: ref_fn(z)[-1])(x)
    torch.testing.assert_close(ours, ref)


def test_unlabelled_entries_holding_nan_stay_out_of_the_gradient_under_grad():
    x, labels, weights, mask = _data(5, True)
    loss = MultiTaskLoss([f"t{i}" for i in range(5)]).double()
    garbage = labels.masked_fill(~mask, float("nan"))
    nan_x = x.masked_fill(~mask, float("nan"))
    ours = grad(lambda z: loss(z, garbage, weights.masked_fill(~mask, float("nan")), mask)["loss"])(nan_x)
    ref = grad(lambda z: loss(z, labels, weights, mask)["loss"])(x)
    torch.testing.assert_close(ours, ref)


def test_cross_entropy_tasks():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, 4, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, 4, (6, 2), generator=gen)
    loss = MultiTaskLoss(["a", "b"], loss_type="cross_entropy").double()
    ours = grad(lambda z: loss(z, labels)["loss"])(x)
    ref = grad(lambda z: (F.cross_entropy(z[:, 0], labels[:, 0]) + F.cross_entropy(z[:, 1], labels[:, 1])) / 2)(x)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize(
    ("tasks", "buffer", "name"),
    [
        (["a"], "pos_weight", "pos_weight"),  # one plain task: torch's own BCE call
        (["a", "b", "c"], "pos_weight", "pos_weight"),  # the fused node
        (["a", "b", "c"], "task_weight", "task_weight"),
        (
            [Task("a", focal_gamma=2.0), Task("b", label_smoothing=0.1), Task("c", kind="regression")],
            "kinds.0.focal_gamma",
            "focal_gamma",
        ),
        ([Task("a", label_smoothing=0.1), "b"], "kinds.0.label_smoothing", "label_smoothing"),
    ],
)
def test_functional_call_with_a_buffer_that_requires_grad_is_refused(tasks, buffer, name, use_mask):
    # The fused gradient covers the logits only: a learnable replacement for a buffer would
    # silently get no gradient (issue 19), so it is refused like a learnable label.
    loss = MultiTaskLoss(tasks)
    columns = len(tasks)
    x, y = torch.randn(8, columns), (torch.rand(8, columns) < 0.5).float()
    mask = torch.rand(8, columns) < 0.8 if use_mask else None
    replacement = getattr(loss.get_submodule(buffer.rpartition(".")[0]), name).detach().clone().requires_grad_()
    with pytest.raises(ValueError, match=rf"Expected `{name}` not to require grad: it is a constant of the loss"):
        torch.func.functional_call(loss, {buffer: replacement}, (x, y), {"mask": mask})
    out = torch.func.functional_call(loss, {buffer: replacement.detach()}, (x, y), {"mask": mask})
    torch.testing.assert_close(out["loss"], loss(x, y, mask=mask)["loss"])


def test_functional_call_with_a_ranking_weight_that_requires_grad_is_refused():
    # The ranking weight is a constant like the other buffers: MultiTaskLoss differentiates the
    # logits only, whatever torch.func.functional_call hands in.
    loss = MultiTaskLoss([Task("a", ranking="pairwise_logistic", ranking_weight=0.5), "b"])
    x, y = torch.randn(8, 2), (torch.rand(8, 2) < 0.5).float()
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    replacement = loss.ranking.ranking_weight.detach().clone().requires_grad_()
    refused = r"Expected `ranking_weight` not to require grad: it is a constant of the loss"
    with pytest.raises(ValueError, match=refused):
        torch.func.functional_call(loss, {"ranking.ranking_weight": replacement}, (x, y), {"groups": groups})
    out = torch.func.functional_call(loss, {"ranking.ranking_weight": replacement.detach()}, (x, y), {"groups": groups})
    torch.testing.assert_close(out["loss"], loss(x, y, groups=groups)["loss"])
