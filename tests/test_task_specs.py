"""Task specs: binary (focal, smoothing, negative sampling), multi-class and regression tasks in one MultiTaskLoss.

The yardstick is a per-task loop over the labelled rows with one ``torch.nn.functional`` call per
task (``_task_loop``), and for focal tasks the formula of Lin et al. written out directly.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from losses import MultiTaskLoss, Task, UncertaintyWeighting, build_multi_task_loss, functional
from tests.compiled import assert_compiled_matches_eager

REDUCE = {"mean": torch.mean, "sum": torch.sum, "min": torch.min, "max": torch.max, "median": torch.median}

#: A ranker's head: binary engagements (one rare and focal, one down-sampled), a multi-class task, a
#: regression task, interleaved so that every row's columns must be gathered.
MIXED = (
    Task("fav", pos_weight=2.0),
    Task("feedback", kind="multiclass", num_classes=3, label_smoothing=0.1, weight=0.5),
    Task("report", focal_gamma=2.0, focal_alpha=0.25, pos_weight=3.0),
    Task("dwell", kind="regression", weight=0.2),
    Task("rating", kind="multiclass", num_classes=5),
    Task("click", neg_sampling_rate=0.25, label_smoothing=0.05),
    Task("share", focal_gamma=0.5),
)


def _quiet(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return MultiTaskLoss(*args, **kwargs)


def _columns(tasks):
    """The logit columns of each task in a [B, D] block."""
    out, start = [], 0
    for task in tasks:
        width = task.num_classes if task.kind == "multiclass" else 1
        out.append(list(range(start, start + width)))
        start += width
    return out, start


def _batch(tasks, batch=24, seed=0, dtype=torch.float64, masked=True):
    gen = torch.Generator().manual_seed(seed)
    _, width = _columns(tasks)
    logits = (torch.randn(batch, width, generator=gen, dtype=torch.float64) * 2).to(dtype)
    labels = []
    for task in tasks:
        if task.kind == "binary":
            labels.append((torch.rand(batch, generator=gen) < 0.3).double())
        elif task.kind == "multiclass":
            labels.append(torch.randint(0, task.num_classes, (batch,), generator=gen).double())
        else:
            labels.append(torch.randn(batch, generator=gen, dtype=torch.float64) * 2)
    labels = torch.stack(labels, 1)
    weights = torch.rand(batch, len(tasks), generator=gen, dtype=torch.float64).to(dtype) + 0.5
    mask = torch.rand(batch, len(tasks), generator=gen) < 0.7 if masked else None
    return logits, labels, weights, mask


def _focal(x, y, pos_weight, gamma, alpha):
    """The binary element loss written out: Lin et al.'s focal loss, split by target for soft labels."""
    a1, a0 = (1.0, 1.0) if alpha is None else (alpha, 1.0 - alpha)
    s = torch.sigmoid(x)
    return -(a1 * pos_weight * y * (1 - s) ** gamma * F.logsigmoid(x) + a0 * (1 - y) * s**gamma * F.logsigmoid(-x))


def _element_losses(task, x, y):
    """One task's element losses on its labelled rows, from torch.nn.functional."""
    if task.kind == "multiclass":
        return F.cross_entropy(x, y.long(), reduction="none", label_smoothing=task.label_smoothing)
    if task.kind == "regression":
        return 0.5 * F.mse_loss(x[:, 0], y, reduction="none")
    x = x[:, 0]
    smoothed = y * (1 - task.label_smoothing) + task.label_smoothing / 2
    sampling = y + (1 - y) / task.neg_sampling_rate
    if task.focal_gamma or task.focal_alpha is not None:
        return _focal(x, smoothed, task.pos_weight, task.focal_gamma, task.focal_alpha) * sampling
    pos_weight = torch.tensor(task.pos_weight, dtype=x.dtype)
    return F.binary_cross_entropy_with_logits(x, smoothed, weight=sampling, pos_weight=pos_weight, reduction="none")


def _task_loop(tasks, logits, labels, weights=None, mask=None, task_loss_reduction="mean", global_reduction="mean"):
    """One loss call per task on that task's labelled rows (label -100 of a multi-class task unlabelled)."""
    columns, _ = _columns(tasks)
    batch = logits.shape[0]
    losses = {}
    for t, task in enumerate(tasks):
        rows = torch.ones(batch, dtype=torch.bool) if mask is None else mask[:, t].clone()
        if task.kind == "multiclass":
            rows &= labels[:, t] != -100
        elements = _element_losses(task, logits[rows][:, columns[t]], labels[rows, t])
        if weights is not None:
            elements = elements * (weights if weights.ndim == 1 else weights[:, t])[rows]
        if task_loss_reduction == "none":
            full = torch.zeros(batch, dtype=elements.dtype)
            full = full.masked_scatter(rows, elements)
            losses[f"loss/{task.name}"] = full
        elif task_loss_reduction == "sum":
            losses[f"loss/{task.name}"] = elements.sum()
        else:
            losses[f"loss/{task.name}"] = elements.sum() / max(int(rows.sum()), 1)
    stacked = torch.stack(list(losses.values()))
    tau = torch.tensor([task.weight for task in tasks], dtype=stacked.dtype)
    stacked = stacked * (tau.unsqueeze(1) if stacked.ndim == 2 else tau)
    losses["loss"] = REDUCE[global_reduction](stacked)
    return losses


def _assert_matches(ours, ref, x_ours, x_ref, **tolerance):
    assert list(ours) == list(ref)
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], msg=key, **tolerance)
    gen = torch.Generator().manual_seed(7)
    upstream = [torch.rand(ref[key].shape, generator=gen, dtype=torch.float64) for key in ref]
    (grad,) = torch.autograd.grad([ours[k] for k in ref], x_ours, [u.to(x_ours.dtype) for u in upstream])
    (ref_grad,) = torch.autograd.grad([ref[k] for k in ref], x_ref, [u.to(x_ref.dtype) for u in upstream])
    torch.testing.assert_close(grad, ref_grad, **tolerance)


class TestTaskSpec:
    def test_defaults_are_a_plain_binary_task(self):
        task = Task("fav")
        assert (task.kind, task.pos_weight, task.weight, task.num_classes) == ("binary", 1.0, 1.0, None)
        assert (task.focal_gamma, task.focal_alpha, task.label_smoothing, task.neg_sampling_rate) == (
            0.0,
            None,
            0.0,
            1.0,
        )

    def test_frozen_hashable_and_numbers_stored_as_floats(self):
        task = Task("fav", pos_weight=3)
        assert isinstance(task.pos_weight, float)
        assert task == Task("fav", pos_weight=3.0)
        assert len({task, Task("fav", pos_weight=3.0)}) == 1
        with pytest.raises(dataclasses.FrozenInstanceError):
            task.pos_weight = 1.0  # type: ignore[misc]

    def test_the_signature(self):
        fields = [(f.name, f.default) for f in dataclasses.fields(Task)]
        assert fields == [
            ("name", dataclasses.MISSING),
            ("kind", "binary"),
            ("pos_weight", 1.0),
            ("weight", 1.0),
            ("num_classes", None),
            ("focal_gamma", 0.0),
            ("focal_alpha", None),
            ("label_smoothing", 0.0),
            ("neg_sampling_rate", 1.0),
            ("ranking", None),
            ("ranking_weight", 1.0),
            ("pointwise_weight", 1.0),
        ]

    @pytest.mark.parametrize(
        ("kwargs", "field", "says"),
        [
            ({"kind": "multiclass"}, "num_classes", r"an int of at least 2 for a 'multiclass' task, got None"),
            ({"kind": "multiclass", "num_classes": 1}, "num_classes", "at least 2.*got 1"),
            ({"num_classes": 3}, "num_classes", r"keep its default None \(a 'binary' task takes no `num_classes`\)"),
            ({"kind": "regression", "pos_weight": 2.0}, "pos_weight", "a 'regression' task takes no `pos_weight`"),
            ({"kind": "regression", "focal_gamma": 2.0}, "focal_gamma", "a 'regression' task takes no"),
            ({"kind": "regression", "focal_alpha": 0.25}, "focal_alpha", "a 'regression' task takes no"),
            ({"kind": "regression", "label_smoothing": 0.1}, "label_smoothing", "a 'regression' task takes no"),
            ({"kind": "regression", "neg_sampling_rate": 0.5}, "neg_sampling_rate", "a 'regression' task takes no"),
            ({"kind": "multiclass", "num_classes": 3, "pos_weight": 2.0}, "pos_weight", "'multiclass' task takes no"),
            ({"kind": "multiclass", "num_classes": 3, "focal_gamma": 1.0}, "focal_gamma", "'multiclass' task"),
            ({"kind": "multiclass", "num_classes": 3, "neg_sampling_rate": 0.5}, "neg_sampling_rate", "'multiclass'"),
            ({"neg_sampling_rate": 0.0}, "neg_sampling_rate", r"finite and in \(0.0, 1.0\], got 0.0"),
            ({"neg_sampling_rate": 1.5}, "neg_sampling_rate", r"\(0.0, 1.0\], got 1.5"),
            ({"neg_sampling_rate": -0.5}, "neg_sampling_rate", r"\(0.0, 1.0\], got -0.5"),
            ({"neg_sampling_rate": float("nan")}, "neg_sampling_rate", "got nan"),
            ({"focal_gamma": -1.0}, "focal_gamma", r"finite and in \[0.0, inf\), got -1.0"),
            ({"focal_gamma": float("inf")}, "focal_gamma", "got inf"),
            ({"focal_alpha": -0.1}, "focal_alpha", r"\[0.0, 1.0\], got -0.1"),
            ({"focal_alpha": 1.5}, "focal_alpha", r"\[0.0, 1.0\], got 1.5"),
            ({"label_smoothing": 1.5}, "label_smoothing", r"\[0.0, 1.0\], got 1.5"),
            ({"pos_weight": -1.0}, "pos_weight", r"\[0.0, inf\), got -1.0"),
            ({"pos_weight": float("nan")}, "pos_weight", "got nan"),
            ({"weight": float("inf")}, "weight", "got inf"),
            ({"kind": "ranking"}, "kind", r"one of \('binary', 'multiclass', 'regression'\), got 'ranking'"),
        ],
    )
    def test_invalid_options_name_the_task_and_the_field(self, kwargs, field, says):
        with pytest.raises(ValueError, match=rf"^Task 'x': expected `{field}` .*{says}"):
            Task("x", **kwargs)

    @pytest.mark.parametrize(
        ("kwargs", "field", "says"),
        [
            ({"kind": "multiclass", "num_classes": 3.0}, "num_classes", "an int.*got 3.0"),
            ({"kind": "multiclass", "num_classes": True}, "num_classes", "an int.*got True"),
            ({"pos_weight": "2"}, "pos_weight", "a number in .* got '2'"),
            ({"weight": False}, "weight", "a number in .* got False"),
            ({"focal_alpha": [0.25]}, "focal_alpha", r"a number in .* got \[0.25\]"),
        ],
    )
    def test_values_of_the_wrong_type_are_a_type_error(self, kwargs, field, says):
        with pytest.raises(TypeError, match=rf"^Task 'x': expected `{field}` .*{says}"):
            Task("x", **kwargs)

    def test_a_bad_name(self):
        with pytest.raises(ValueError, match=r"`name` of a Task to be a non-empty str, got ''"):
            Task("")
        with pytest.raises(TypeError, match=r"`name` of a Task to be a str, got int"):
            Task(3)

    def test_numpy_scalars_become_python_numbers(self):
        np = pytest.importorskip("numpy")
        task = Task("a", pos_weight=np.float32(2.0), focal_alpha=np.float64(0.25), neg_sampling_rate=np.float16(0.5))
        assert (task.pos_weight, task.focal_alpha, task.neg_sampling_rate) == (2.0, 0.25, 0.5)
        assert type(task.pos_weight) is float
        assert type(Task("b", kind="multiclass", num_classes=np.int64(4)).num_classes) is int

    def test_focal_alpha_one_and_zero_and_smoothing_one_are_allowed(self):
        assert Task("a", focal_alpha=1.0).focal_alpha == 1.0
        assert Task("a", focal_alpha=0).focal_alpha == 0.0
        assert Task("a", label_smoothing=1.0, neg_sampling_rate=1e-6).label_smoothing == 1.0


class TestEachKindAgainstTorch:
    """Each kind alone, against one torch.nn.functional call per task, float64, values and gradients."""

    @pytest.mark.parametrize("task_loss_reduction", ["mean", "sum", "none"])
    @pytest.mark.parametrize("masked", [False, True])
    def test_binary_with_pos_weight_smoothing_and_sampling(self, task_loss_reduction, masked):
        tasks = (
            Task("a", pos_weight=2.0),
            Task("b", label_smoothing=0.2),
            Task("c", neg_sampling_rate=0.1, pos_weight=0.5),
            Task("d", label_smoothing=0.1, neg_sampling_rate=0.5),
        )
        logits, labels, weights, mask = _batch(tasks, masked=masked)
        x, ref_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        ours = _quiet(tasks, task_loss_reduction=task_loss_reduction).double()(x, labels, weights, mask)
        _assert_matches(ours, _task_loop(tasks, ref_x, labels, weights, mask, task_loss_reduction), x, ref_x)

    @pytest.mark.parametrize("task_loss_reduction", ["mean", "sum", "none"])
    @pytest.mark.parametrize("masked", [False, True])
    def test_multiclass_with_smoothing_and_different_class_counts(self, task_loss_reduction, masked):
        tasks = (
            Task("a", kind="multiclass", num_classes=3, label_smoothing=0.1),
            Task("b", kind="multiclass", num_classes=5),
            Task("c", kind="multiclass", num_classes=2, label_smoothing=0.3),
        )
        logits, labels, weights, mask = _batch(tasks, masked=masked)
        x, ref_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        ours = _quiet(tasks, task_loss_reduction=task_loss_reduction).double()(x, labels, weights, mask)
        _assert_matches(ours, _task_loop(tasks, ref_x, labels, weights, mask, task_loss_reduction), x, ref_x)

    @pytest.mark.parametrize("task_loss_reduction", ["mean", "sum", "none"])
    def test_regression_is_half_the_squared_error(self, task_loss_reduction):
        tasks = (Task("dwell", kind="regression"), Task("watch", kind="regression", weight=2.0))
        logits, labels, weights, mask = _batch(tasks)
        x, ref_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        ours = _quiet(tasks, task_loss_reduction=task_loss_reduction).double()(x, labels, weights, mask)
        ref = _task_loop(tasks, ref_x, labels, weights, mask, task_loss_reduction)
        _assert_matches(ours, ref, x, ref_x)
        if task_loss_reduction == "sum":
            labelled = mask[:, 0]
            direct = (0.5 * (logits[:, 0] - labels[:, 0]) ** 2 * weights[:, 0])[labelled].sum()
            torch.testing.assert_close(ours["loss/dwell"], direct)

    def test_every_kind_passes_gradcheck(self):
        logits, labels, weights, mask = _batch(MIXED, batch=6)
        loss = MultiTaskLoss(MIXED).double()
        x = logits.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda t: loss(t, labels, weights, mask)["loss"], (x,))
        assert torch.autograd.gradcheck(lambda t: torch.stack(list(loss(t, labels, weights).values())), (x,))

    def test_focal_double_backward(self):
        tasks = (Task("a", focal_gamma=2.0, focal_alpha=0.25), Task("b", focal_gamma=0.5, label_smoothing=0.1))
        logits, labels, weights, mask = _batch(tasks, batch=6)
        loss = MultiTaskLoss(tasks).double()
        x = logits.clone().requires_grad_()
        assert torch.autograd.gradgradcheck(lambda t: loss(t, labels, weights, mask)["loss"], (x,))


class TestFocal:
    """The focal kernel against the formula of Lin et al., -alpha_t (1 - p_t)^gamma log p_t."""

    @pytest.mark.parametrize(
        ("gamma", "alpha"), [(0.0, 0.25), (0.5, None), (2.0, None), (2.0, 0.25), (5.0, 0.9), (0.0, 0.9)]
    )
    def test_hard_labels_give_lin_et_al(self, gamma, alpha):
        gen = torch.Generator().manual_seed(1)
        logits = torch.randn(64, 1, generator=gen, dtype=torch.float64) * 4
        labels = (torch.rand(64, 1, generator=gen) < 0.3).double()
        x = logits.clone().requires_grad_()
        out = MultiTaskLoss([Task("rare", focal_gamma=gamma, focal_alpha=alpha)]).double()(x, labels)
        ref_x = logits.clone().requires_grad_()
        p = torch.sigmoid(ref_x)
        p_t = torch.where(labels == 1, p, 1 - p)
        alpha_t = 1.0 if alpha is None else torch.where(labels == 1, alpha, 1 - alpha)
        ref = (-alpha_t * (1 - p_t) ** gamma * torch.log(p_t)).mean()
        torch.testing.assert_close(out["loss/rare"], ref)
        out["loss"].backward()
        ref.backward()
        torch.testing.assert_close(x.grad, ref_x.grad)

    def test_gamma_zero_and_no_alpha_is_plain_bce_exactly(self):
        logits, labels, weights, mask = _batch((Task("a"), Task("b")), batch=64)
        spec = MultiTaskLoss([Task("a", focal_gamma=0.0, focal_alpha=None), Task("b", pos_weight=3.0)])
        named = MultiTaskLoss(["a", "b"], pos_weights=[1.0, 3.0])
        assert spec.kinds[0].focal_gamma is None  # the plain kernel, chosen at construction
        for use_mask in (None, mask):
            x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
            ours, theirs = spec.double()(x, labels, weights, use_mask), named.double()(y, labels, weights, use_mask)
            for key in theirs:
                assert torch.equal(ours[key], theirs[key]), key
            ours["loss"].backward()
            theirs["loss"].backward()
            assert torch.equal(x.grad, y.grad)

    def test_a_focal_block_with_plain_tasks_gives_their_plain_bce(self):
        # One focal task puts every binary task of the loss in the focal kernel; gamma 0 stays BCE.
        tasks = (Task("a", focal_gamma=2.0), Task("b", pos_weight=3.0))
        logits, labels, weights, mask = _batch(tasks)
        x, ref_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        ours = MultiTaskLoss(tasks).double()(x, labels, weights, mask)
        plain = F.binary_cross_entropy_with_logits(
            ref_x[:, 1],
            labels[:, 1],
            weight=weights[:, 1],
            pos_weight=torch.tensor(3.0, dtype=torch.float64),
            reduction="none",
        )
        torch.testing.assert_close(ours["loss/b"], plain[mask[:, 1]].sum() / mask[:, 1].sum())
        _assert_matches(ours, _task_loop(tasks, ref_x, labels, weights, mask), x, ref_x)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_saturated_logits_stay_finite(self, dtype):
        logits = torch.tensor([[-1e4, 1e4, -100.0, 100.0, -30.0, 30.0]], dtype=dtype).t().expand(6, 2).contiguous()
        labels = torch.tensor([[0.0, 1.0]] * 3 + [[1.0, 0.0]] * 3, dtype=dtype)
        x = logits.clone().requires_grad_()
        out = MultiTaskLoss([Task("a", focal_gamma=2.0, focal_alpha=0.25), Task("b", focal_gamma=0.0, focal_alpha=0.5)])
        values = out.to(dtype)(x, labels)
        assert all(torch.isfinite(value) for value in values.values())
        values["loss"].backward()
        assert torch.isfinite(x.grad).all()
        ref_x = logits.clone().requires_grad_()
        ref = _focal(ref_x[:, 0], labels[:, 0], 1.0, 2.0, 0.25).mean()
        torch.testing.assert_close(values["loss/a"], ref)


class TestMixedBlocks:
    @pytest.mark.parametrize("task_loss_reduction", ["mean", "sum", "none"])
    @pytest.mark.parametrize("global_reduction", ["mean", "sum", "min", "max", "median"])
    @pytest.mark.parametrize("weights_shape", [None, "BT", "B"])
    def test_match_the_per_task_loop(self, task_loss_reduction, global_reduction, weights_shape):
        logits, labels, weights, mask = _batch(MIXED, seed=3)
        weights = {None: None, "BT": weights, "B": weights[:, 0]}[weights_shape]
        x, ref_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        loss = _quiet(MIXED, task_loss_reduction=task_loss_reduction, global_reduction=global_reduction).double()
        ours = loss(x, labels, weights, mask)
        ref = _task_loop(MIXED, ref_x, labels, weights, mask, task_loss_reduction, global_reduction)
        _assert_matches(ours, ref, x, ref_x)

    @pytest.mark.parametrize("seed", range(12))
    def test_random_blocks_match_the_per_task_loop(self, seed):
        gen = torch.Generator().manual_seed(100 + seed)

        def pick(options):
            return options[int(torch.randint(len(options), (), generator=gen))]

        tasks = []
        for t in range(int(torch.randint(1, 7, (), generator=gen))):
            kind = pick(["binary", "binary", "multiclass", "regression"])
            if kind == "binary":
                tasks.append(
                    Task(
                        f"t{t}",
                        pos_weight=pick([1.0, 0.5, 4.0]),
                        focal_gamma=pick([0.0, 0.0, 1.0, 2.5]),
                        focal_alpha=pick([None, None, 0.25]),
                        label_smoothing=pick([0.0, 0.1]),
                        neg_sampling_rate=pick([1.0, 0.2]),
                        weight=pick([1.0, 0.5]),
                    )
                )
            elif kind == "multiclass":
                tasks.append(
                    Task(f"t{t}", kind="multiclass", num_classes=pick([2, 3, 4]), label_smoothing=pick([0.0, 0.2]))
                )
            else:
                tasks.append(Task(f"t{t}", kind="regression", weight=pick([1.0, 3.0])))
        reductions = pick([("mean", "mean"), ("sum", "sum"), ("none", "mean"), ("mean", "max")])
        dtype = pick([torch.float64, torch.float32])
        logits, labels, weights, mask = _batch(tasks, batch=pick([1, 5, 17]), seed=seed, dtype=dtype)
        mask = pick([None, mask])
        x, ref_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        ours = _quiet(tasks, task_loss_reduction=reductions[0], global_reduction=reductions[1]).to(dtype)(
            x, labels, weights, mask
        )
        ref = _task_loop(tasks, ref_x, labels.to(dtype), weights, mask, *reductions)
        tolerance = {} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}
        _assert_matches(ours, ref, x, ref_x, **tolerance)

    def test_unlabelled_entries_add_nothing_whatever_they_hold(self):
        logits, labels, weights, mask = _batch(MIXED, seed=4)
        loss = MultiTaskLoss(MIXED).double()
        expected = loss(logits, labels, weights, mask)
        columns, _ = _columns(MIXED)
        column_mask = torch.stack([mask[:, t] for t, cols in enumerate(columns) for _ in cols], 1)
        x = logits.masked_fill(~column_mask, float("nan")).requires_grad_()
        nan = float("nan")
        out = loss(x, labels.masked_fill(~mask, nan), weights.masked_fill(~mask, nan), mask)
        for key in expected:
            torch.testing.assert_close(out[key], expected[key])
        out["loss"].backward()
        assert torch.isfinite(x.grad).all()
        assert torch.equal(x.grad[~column_mask], torch.zeros(int((~column_mask).sum()), dtype=torch.float64))

    def test_label_minus_100_of_a_multiclass_task_is_unlabelled(self):
        tasks = (Task("fav"), Task("feedback", kind="multiclass", num_classes=3))
        logits, labels, weights, _ = _batch(tasks, batch=8)
        labels[:5, 1] = -100
        out = MultiTaskLoss(tasks).double()(logits, labels, weights)
        masked = MultiTaskLoss(tasks).double()(logits, labels, weights, mask=labels != -100)
        torch.testing.assert_close(out["loss/feedback"], masked["loss/feedback"])
        ref = (F.cross_entropy(logits[5:, 1:4], labels[5:, 1].long(), reduction="none") * weights[5:, 1]).mean()
        torch.testing.assert_close(out["loss/feedback"], ref)

    def test_a_task_without_labels_and_an_empty_batch_give_zero(self):
        logits, labels, weights, mask = _batch(MIXED)
        mask[:, 1] = False
        mask[:, 3] = False
        x = logits.clone().requires_grad_()
        out = MultiTaskLoss(MIXED).double()(x, labels, weights, mask)
        assert out["loss/feedback"].item() == out["loss/dwell"].item() == 0.0
        out["loss"].backward()
        assert torch.equal(x.grad[:, [1, 2, 3, 5]], torch.zeros(24, 4, dtype=torch.float64))
        for task_loss_reduction in ("mean", "sum"):
            empty = torch.zeros(0, 13, requires_grad=True)
            result = _quiet(MIXED, task_loss_reduction=task_loss_reduction)(empty, torch.zeros(0, 7))
            assert [value.item() for value in result.values()] == [0.0] * 8
            result["loss"].backward()
            assert empty.grad.shape == (0, 13)

    def test_task_weights_from_specs_and_the_result_keys(self):
        loss = MultiTaskLoss(MIXED)
        assert loss.tasks == tuple(task.name for task in MIXED)
        assert loss.task_weight.tolist() == pytest.approx([1.0, 0.5, 1.0, 0.2, 1.0, 1.0, 1.0])
        assert loss.pos_weight.tolist() == [2.0, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0]
        logits, labels, _, _ = _batch(MIXED)
        assert list(loss(logits.float(), labels)) == [*(f"loss/{task.name}" for task in MIXED), "loss"]

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_half_precision_is_computed_in_float32(self, dtype):
        logits, labels, weights, mask = _batch(MIXED, dtype=dtype)
        x = logits.clone().requires_grad_()
        out = MultiTaskLoss(MIXED)(x, labels, weights, mask)
        ref = MultiTaskLoss(MIXED)(logits.float(), labels, weights.float(), mask)
        for key in ref:
            assert out[key].dtype == torch.float32
            torch.testing.assert_close(out[key], ref[key])
        out["loss"].backward()
        assert x.grad.dtype == dtype

    def test_weighting_works_for_every_kind(self):
        logits, labels, weights, mask = _batch(MIXED)
        names = [task.name for task in MIXED]
        specs = [dataclasses.replace(task, weight=1.0) for task in MIXED]
        weighted = MultiTaskLoss(specs, weighting=UncertaintyWeighting(names)).double()
        out = weighted(logits, labels, weights, mask)
        plain = MultiTaskLoss(specs).double()(logits, labels, weights, mask)
        for name in names:
            torch.testing.assert_close(out[f"loss/{name}"], plain[f"loss/{name}"])
        # Log-variances start at 0: weights 1 and no penalty, so the weighted loss is the sum.
        torch.testing.assert_close(out["loss"], sum(plain[f"loss/{name}"] for name in names))
        assert f"weight/{names[3]}" in out

    def test_state_dict_deepcopy_pickle_and_to(self):
        logits, labels, weights, mask = _batch(MIXED)
        loss = MultiTaskLoss(MIXED).double()
        assert set(loss.state_dict()) == {"pos_weight", "task_weight"}
        expected = loss(logits, labels, weights, mask)
        buffer = io.BytesIO()
        torch.save(loss.state_dict(), buffer)
        buffer.seek(0)
        restored = MultiTaskLoss(MIXED).double()
        restored.load_state_dict(torch.load(buffer))
        for clone in (copy.deepcopy(loss), pickle.loads(pickle.dumps(loss)), restored):
            out = clone(logits, labels, weights, mask)
            for key in expected:
                torch.testing.assert_close(out[key], expected[key])
        # The options stay the Tasks' Python floats, in float64, under a cast (issue 19).
        assert loss.float().kinds[0].focal_gamma.dtype == torch.float64

    def test_meta_logits_give_shapes(self):
        loss = MultiTaskLoss(MIXED)
        x = torch.zeros(8, 13, device="meta", requires_grad=True)
        out = loss(x, torch.zeros(8, 7, device="meta"), mask=torch.zeros(8, 7, dtype=torch.bool, device="meta"))
        assert all(value.device.type == "meta" and value.shape == () for value in out.values())
        out["loss"].backward()
        assert x.grad.shape == (8, 13)


class TestLayouts:
    def test_names_keep_their_meaning_and_mix_with_specs(self):
        logits, labels, weights, mask = _batch((Task("a"), Task("b"), Task("c")))
        named = MultiTaskLoss(["a", "b", "c"], pos_weights=[1.0, 2.0, 1.0]).double()
        mixed = MultiTaskLoss(["a", Task("b", pos_weight=2.0), "c"]).double()
        assert set(named.state_dict()) == {"pos_weight", "task_weight"}
        ours, theirs = mixed(logits, labels, weights, mask), named(logits, labels, weights, mask)
        for key in theirs:
            assert torch.equal(ours[key], theirs[key])

    def test_all_multiclass_tasks_take_b_t_c_or_b_d_logits(self):
        tasks = (
            Task("a", kind="multiclass", num_classes=4, label_smoothing=0.1),
            Task("b", kind="multiclass", num_classes=4),
        )
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(10, 2, 4, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, 4, (10, 2), generator=gen)
        loss = MultiTaskLoss(tasks).double()
        three = loss(logits, labels)
        two = loss(logits.reshape(10, 8), labels.double())
        for key in three:
            torch.testing.assert_close(two[key], three[key])
        ref = F.cross_entropy(logits[:, 0], labels[:, 0], label_smoothing=0.1)
        torch.testing.assert_close(three["loss/a"], ref)
        with pytest.raises(ValueError, match=r"\[B, T, C\] with C = 4 \(the tasks' `num_classes`\), got \(10, 2, 5\)"):
            loss(torch.zeros(10, 2, 5), labels)

    def test_names_under_cross_entropy_mix_with_multiclass_specs_in_b_t_c(self):
        logits = torch.randn(6, 2, 3, dtype=torch.float64)
        labels = torch.randint(0, 3, (6, 2))
        loss = MultiTaskLoss(["a", Task("b", kind="multiclass", num_classes=3)], loss_type="cross_entropy")
        named = MultiTaskLoss(["a", "b"], loss_type="cross_entropy")
        for key, value in named.double()(logits, labels).items():
            torch.testing.assert_close(loss.double()(logits, labels)[key], value)

    def test_shape_errors_of_a_b_d_block(self):
        loss = MultiTaskLoss(MIXED)
        with pytest.raises(ValueError, match=r"`logits` of shape \[B, D\] with D = 13 columns .*got \(4, 7\)"):
            loss(torch.zeros(4, 7), torch.zeros(4, 7))
        with pytest.raises(
            ValueError, match=r"`labels` of shape \[B, T\] \(4, 7\), one label per task .*got \(4, 13\)"
        ):
            loss(torch.zeros(4, 13), torch.zeros(4, 13))
        with pytest.raises(ValueError, match=r"`weights` of shape \[B, T\] \(4, 7\) or \[B\] \(4,\), got \(4, 13\)"):
            loss(torch.zeros(4, 13), torch.zeros(4, 7), torch.ones(4, 13))
        with pytest.raises(ValueError, match=r"`mask` to have the shape of `labels` \(4, 7\), got \(4, 13\)"):
            loss(torch.zeros(4, 13), torch.zeros(4, 7), mask=torch.ones(4, 13, dtype=torch.bool))
        with pytest.raises(ValueError, match="`labels` not to require grad"):
            loss(torch.zeros(4, 13), torch.zeros(4, 7, requires_grad=True))

    def test_construction_errors(self):
        with pytest.raises(TypeError, match="every task to be a name .* or a losses.Task, got int at position 1"):
            MultiTaskLoss(["a", 3])
        with pytest.raises(ValueError, match=r"unique task names, got duplicates \['a'\]"):
            MultiTaskLoss(["a", Task("a")])
        with pytest.raises(
            ValueError, match=r"`pos_weight` in one place: `pos_weights` was given, and the Tasks \['b'\]"
        ):
            MultiTaskLoss(["a", Task("b", pos_weight=2.0)], pos_weights=[1.0, 3.0])
        with pytest.raises(ValueError, match=r"`weight` in one place: `task_weights` was given, and the Tasks \['b'\]"):
            MultiTaskLoss(["a", Task("b", weight=2.0)], task_weights=[1.0, 3.0])
        with pytest.raises(ValueError, match=r"`pos_weights` to be 1 for the tasks it does not apply to, .*\['d'\]"):
            MultiTaskLoss(["a", Task("d", kind="regression")], pos_weights=[2.0, 3.0])
        with pytest.raises(ValueError, match=r"the tasks \['a'\] are names under loss_type 'cross_entropy'"):
            MultiTaskLoss(["a", Task("d", kind="regression")], loss_type="cross_entropy")
        with pytest.raises(ValueError, match=r"`weighting` alone .* Tasks with a weight \['a'\]"):
            MultiTaskLoss([Task("a", weight=2.0), "b"], weighting=UncertaintyWeighting(["a", "b"]))
        different = MultiTaskLoss(
            [Task("a", kind="multiclass", num_classes=3), Task("b", kind="multiclass", num_classes=4)]
        )
        with pytest.raises(ValueError, match=r"got \(2, 2, 4\)\. \[B, T, C\] logits need every task multiclass, all"):
            different(torch.zeros(2, 2, 4), torch.zeros(2, 2, dtype=torch.long))
        # The arguments still work beside plain Tasks: the argument's values are used.
        loss = MultiTaskLoss(["a", Task("d", kind="regression")], pos_weights=[2.0, 1.0], task_weights=[1.0, 0.5])
        assert loss.pos_weight.tolist() == [2.0, 1.0]
        assert loss.task_weight.tolist() == [1.0, 0.5]

    def test_the_builder_keeps_the_ancestors_behaviour(self):
        loss = build_multi_task_loss("bce_with_logits", ["fav", "reply"], pos_weights=[1.0, 2.0])
        assert [spec.kind for spec in loss.kinds] == ["binary"]
        out = loss(torch.zeros(2, 2), torch.tensor([[0, 1], [1, 0]]), torch.ones(2, 2))
        assert round(out["loss"].item(), 4) == 0.8664


class TestCheckInputs:
    def test_valid_mixed_inputs_pass_and_bad_ones_are_named(self):
        tasks = (Task("fav"), Task("feedback", kind="multiclass", num_classes=3), Task("dwell", kind="regression"))
        loss = MultiTaskLoss(tasks, check_inputs=True)
        logits = torch.zeros(3, 5)
        labels = torch.tensor([[1.0, 2.0, 0.5], [0.0, -100.0, -3.0], [1.0, 0.0, 7.0]])
        mask = torch.tensor([[True, True, True], [True, True, True], [False, False, False]])
        garbage = labels.clone()
        garbage[2] = torch.tensor([float("nan"), 9.5, float("inf")])
        assert torch.isfinite(loss(logits, garbage, mask=mask)["loss"])
        bad = labels.clone()
        bad[0, 1] = 1.5
        with pytest.raises(ValueError, match=r"`labels` of multiclass tasks to be class indices .* \(0, 1\): 1.5"):
            loss(logits, bad)
        bad[0, 1] = 3.0
        with pytest.raises(ValueError, match=r"`labels` to be finite in \[0, 2\] or -100, got 1 entries"):
            loss(logits, bad)
        bad = labels.clone()
        bad[1, 0] = 2.0
        with pytest.raises(ValueError, match=r"`labels` to be finite in \[0, 1\], got 1 entries .* \(1, 0\): 2.0"):
            loss(logits, bad)
        bad = labels.clone()
        bad[0, 2] = float("nan")
        with pytest.raises(ValueError, match=r"`labels` to be finite, got 1 entries"):
            loss(logits, bad)

    def test_each_task_against_its_own_class_count(self):
        tasks = (Task("a", kind="multiclass", num_classes=2), Task("b", kind="multiclass", num_classes=4))
        loss = MultiTaskLoss(tasks, check_inputs=True)
        assert torch.isfinite(loss(torch.zeros(2, 6), torch.tensor([[1.0, 3.0], [0.0, 2.0]]))["loss"])
        with pytest.raises(ValueError, match=r"class indices in \[0, num_classes\) .* at index \(1, 0\): 3.0"):
            loss(torch.zeros(2, 6), torch.tensor([[1.0, 3.0], [3.0, 2.0]]))


def test_torch_compile_fullgraph_of_a_mixed_block():
    logits, labels, weights, mask = _batch(MIXED, dtype=torch.float32)
    loss = MultiTaskLoss(MIXED)
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    for use_mask in (mask, None):
        assert_compiled_matches_eager(loss, compiled, logits, labels.float(), weights, use_mask)
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torch_func_grad_of_a_mixed_block():
    logits, labels, weights, mask = _batch(MIXED)
    loss = MultiTaskLoss(MIXED).double()
    ours = torch.func.grad(lambda z: loss(z, labels, weights, mask)["loss"])(logits)
    x = logits.clone().requires_grad_()
    (ref,) = torch.autograd.grad(loss(x, labels, weights, mask)["loss"], x)
    torch.testing.assert_close(ours, ref)


def test_functional_rows():
    # The math layer's rows, called directly: focal options of the binary row, the regression row.
    x = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    gamma, alpha = (
        torch.tensor([2.0, 0.0], dtype=torch.float64),
        torch.tensor([0.25, float("nan")], dtype=torch.float64),
    )
    sums, _ = functional.multi_task_bce(x, y, torch.ones(2, dtype=torch.float64), focal_gamma=gamma, focal_alpha=alpha)
    torch.testing.assert_close(sums[0], _focal(x[0, 0], y[0, 0], 1.0, 2.0, 0.25))
    torch.testing.assert_close(sums[1], F.binary_cross_entropy_with_logits(x[0, 1], y[0, 1]))
    elements = functional.multi_task_bce_elements(
        x, y, torch.ones(2, dtype=torch.float64), focal_gamma=gamma, focal_alpha=alpha
    )
    torch.testing.assert_close(elements.sum(0), sums)
    assert functional.multi_task_squared_error(x, y).tolist() == [[0.125, 0.5]]


# --- DDP: a mixed block on 2 gloo ranks -----------------------------------------------------------------


def _ranker(normalize):
    torch.manual_seed(0)
    model = nn.Linear(6, 13).double()
    loss = MultiTaskLoss(MIXED, normalize=normalize).double()
    return model, loss


def _ddp_data():
    _, labels, weights, mask = _batch(MIXED, batch=16, seed=11)
    features = torch.randn(16, 6, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    mask[:8] = torch.rand(8, 7, generator=torch.Generator().manual_seed(13)) < 0.95  # rank 0: dense labels
    mask[8:] = torch.rand(8, 7, generator=torch.Generator().manual_seed(14)) < 0.3  # rank 1: sparse
    return features, labels, weights, mask


def _mixed_ddp_rank(rank, world_size):
    features, labels, weights, mask = _ddp_data()
    rows = slice(rank * 8, (rank + 1) * 8)
    model, loss = _ranker("global")
    ddp = DistributedDataParallel(model)
    out = loss(ddp(features[rows]), labels[rows], weights[rows], mask[rows])
    out["loss"].backward()
    return [p.grad.clone() for p in model.parameters()], {key: value.item() for key, value in out.items()}


def test_ddp_gradient_of_a_mixed_block_equals_one_process(ranks):
    results = ranks(_mixed_ddp_rank, 2, timeout=90)
    features, labels, weights, mask = _ddp_data()
    model, loss = _ranker("local")
    out = loss(model(features), labels, weights, mask)
    out["loss"].backward()
    for grads, _ in results:
        for ours, ref in zip(grads, model.parameters(), strict=True):
            torch.testing.assert_close(ours, ref.grad, rtol=1e-10, atol=1e-12)
    # The average of the ranks' task losses is the global batch's task loss.
    for key in out:
        average = sum(values[key] for _, values in results) / 2
        assert average == pytest.approx(out[key].item(), rel=1e-10, abs=1e-12), key
    assert math.isfinite(out["loss"].item())


class TestOptionsKeepThePythonFloats:
    """Issue 19: a Task's options were float32 buffers, so a float64 loss used 0.1 to seven digits."""

    TASKS = (
        Task(
            "a",
            pos_weight=0.1,
            weight=0.7,
            label_smoothing=0.1,
            focal_gamma=0.3,
            focal_alpha=0.1,
            neg_sampling_rate=0.3,
        ),
        Task("b", pos_weight=3.3, neg_sampling_rate=0.7),
    )

    def test_a_float64_loss_uses_the_exact_values(self):
        logits, labels, weights, mask = _batch(self.TASKS, batch=64)
        loss = MultiTaskLoss(self.TASKS).double()
        out = loss(logits, labels, weights, mask)
        f64 = {"dtype": torch.float64}
        expected, _ = functional.multi_task_bce(
            logits,
            labels,
            torch.tensor([0.1, 3.3], **f64),
            weights,
            mask,
            1.0 / mask.sum(0).double(),
            focal_gamma=torch.tensor([0.3, 0.0], **f64),
            focal_alpha=torch.tensor([0.1, math.nan], **f64),
            label_smoothing=torch.tensor([0.1, 0.0], **f64),
            neg_sampling_rate=torch.tensor([0.3, 0.7], **f64),
        )
        torch.testing.assert_close(torch.stack([out["loss/a"], out["loss/b"]]), expected, rtol=1e-14, atol=0)
        torch.testing.assert_close(out["loss"], (0.7 * expected[0] + expected[1]) / 2, rtol=1e-14, atol=0)

    @pytest.mark.parametrize("cast", [torch.float32, torch.bfloat16, torch.float16])
    def test_a_dtype_cast_keeps_them(self, cast):
        loss = MultiTaskLoss(self.TASKS).to(cast)
        row = loss.kinds[0]
        assert row.label_smoothing.dtype == torch.float64
        assert row.label_smoothing.tolist() == [0.1, 0.0]
        assert row.focal_alpha.tolist()[0] == 0.1
        assert row.neg_sampling_rate.tolist() == [0.3, 0.7]
        assert loss.pos_weight.dtype == cast  # the module's own buffers follow its dtype ...
        loss = loss.double()  # ... and come back exact, not from their rounding
        assert loss.pos_weight.tolist() == [0.1, 3.3]
        assert loss.task_weight.tolist() == [0.7, 1.0]

    def test_numbers_given_as_arguments_come_back_exact_too(self):
        loss = MultiTaskLoss(["a", "b"], pos_weights=[0.1, 3.3], task_weights=(0.7, 1.0)).double()
        assert loss.pos_weight.tolist() == [0.1, 3.3]
        assert loss.task_weight.tolist() == [0.7, 1.0]

    def test_a_loaded_checkpoint_is_cast_as_it_is(self):
        loss = MultiTaskLoss(self.TASKS)
        loss.load_state_dict({"pos_weight": torch.tensor([2.0, 0.2]), "task_weight": torch.tensor([1.0, 1.0])})
        assert loss.double().pos_weight.tolist() == torch.tensor([2.0, 0.2]).double().tolist()
