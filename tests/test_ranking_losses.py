"""Pairwise and listwise ranking terms over ragged groups (issue 18), alone and inside MultiTaskLoss.

The yardstick is a float64 Python loop over the groups and the pairs of each (``loop_sums``), written
from the definitions in ``docs/ranking_losses.rst``; for large groups, a loop over groups with each
group's pairs as a dense matrix (``matrix_sums``), itself checked against the loop on small ones.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch.nn.parallel import DistributedDataParallel

from losses import MultiTaskGlobalLoss, MultiTaskLoss, Task, UncertaintyWeighting, _ragged
from losses.ranking_losses import RANKINGS, ranking_loss, unchecked_ranking_sums
from losses.task import RANKINGS as TASK_RANKINGS

KINDS = ("pairwise_logistic", "pairwise_hinge", "softmax", "lambda_ndcg")


def _pair_loss(kind, d):
    return torch.relu(1 - d) if kind == "pairwise_hinge" else F.softplus(-d)


def loop_sums(x, y, g, w, m, kind):
    """``(weighted sum, count)`` of one column, by a Python loop over groups and pairs (float64)."""
    x, y, w = x.double(), y.double(), w.double()
    total, count = x.new_zeros(()), 0
    for gid in sorted(set(g.tolist())):
        rows = [i for i in range(len(x)) if g[i] == gid and m[i]]
        if kind == "softmax":
            label_sum = sum(y[i].item() for i in rows)
            if label_sum <= 0 or len({y[i].item() for i in rows}) < 2:
                continue
            log_norm = torch.logsumexp(torch.stack([x[i] for i in rows]), 0)
            loss = -sum(y[i] / label_sum * (x[i] - log_norm) for i in rows)
            total = total + loss * sum(w[i] for i in rows) / len(rows)
            count += 1
            continue
        if kind == "lambda_ndcg":
            rank = {i: r for r, i in enumerate(sorted(rows, key=lambda i: (-x[i].item(), i)))}
            ideal = sorted((y[i].item() for i in rows), reverse=True)
            ideal_dcg = sum((2**label - 1) / math.log2(2 + r) for r, label in enumerate(ideal))
        for i in rows:
            for j in rows:
                if y[i] > y[j]:
                    weight = w[i] * w[j]
                    if kind == "lambda_ndcg":
                        gain = abs(2 ** y[i].item() - 2 ** y[j].item())
                        weight = (
                            weight * gain * abs(1 / math.log2(2 + rank[i]) - 1 / math.log2(2 + rank[j])) / ideal_dcg
                        )
                    total = total + weight * _pair_loss(kind, x[i] - x[j])
                    count += 1
    return total, count


def matrix_sums(x, y, g, w, m, kind):
    """The same sums, a loop over groups with each group's pairs as a dense ``[n, n]`` matrix."""
    x, y, w = x.double(), y.double(), w.double()
    total, count = x.new_zeros(()), 0
    for gid in torch.unique(g).tolist():
        rows = torch.nonzero((g == gid) & m).flatten()
        if rows.numel() == 0:
            continue
        xs, ys, ws = x[rows], y[rows], w[rows]
        if kind == "softmax":
            if ys.sum() > 0 and len(set(ys.tolist())) > 1:
                total = total - (ys / ys.sum() * torch.log_softmax(xs, 0)).sum() * ws.mean()
                count += 1
            continue
        valid = ys[:, None] > ys[None, :]
        weight = ws[:, None] * ws[None, :]
        if kind == "lambda_ndcg":
            order = sorted(range(len(rows)), key=lambda i: (-xs[i].item(), i))
            rank = torch.empty(len(rows), dtype=torch.float64)
            rank[order] = torch.arange(len(rows), dtype=torch.float64)
            gains = 2**ys - 1
            ideal = (gains.sort(descending=True).values / torch.log2(torch.arange(len(rows)) + 2.0)).sum()
            discount = 1 / torch.log2(rank + 2)
            weight = weight * (gains[:, None] - gains[None, :]).abs() * (discount[:, None] - discount[None, :]).abs()
            weight = weight / ideal
        total = total + (_pair_loss(kind, xs[:, None] - xs[None, :]) * weight)[valid].sum()
        count += int(valid.sum())
    return total, count


def _column(batch=48, groups=7, seed=0, graded=True, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 3 if graded else 2, (batch,), generator=gen).to(dtype)
    g = torch.randint(0, groups, (batch,), generator=gen) * 13 - 40  # unsorted, negative, sparse ids
    w = (torch.rand(batch, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    m = torch.rand(batch, generator=gen) < 0.8
    return x, y, g, w, m


def _mean(sums):
    total, count = sums
    return total / max(count, 1)


class TestTaskFields:
    def test_defaults_and_a_ranking_task(self):
        task = Task("click", ranking="lambda_ndcg", ranking_weight=0.5, pointwise_weight=0)
        assert (task.ranking, task.ranking_weight, task.pointwise_weight) == ("lambda_ndcg", 0.5, 0.0)
        assert isinstance(task.pointwise_weight, float)
        assert (Task("fav").ranking, Task("fav").ranking_weight, Task("fav").pointwise_weight) == (None, 1.0, 1.0)

    def test_the_table_rows_match_the_task_options(self):
        assert tuple(RANKINGS) == TASK_RANKINGS == KINDS

    @pytest.mark.parametrize(
        ("kwargs", "error", "says"),
        [
            ({"ranking": "listnet"}, ValueError, r"`ranking` to be None or one of \('pairwise_logistic'.*'listnet'"),
            ({"ranking": 3}, ValueError, "`ranking` to be None or one of"),
            ({"ranking": "softmax", "ranking_weight": -1.0}, ValueError, "`ranking_weight` to be finite"),
            ({"ranking": "softmax", "pointwise_weight": math.inf}, ValueError, "`pointwise_weight` to be finite"),
            ({"ranking": "softmax", "ranking_weight": "1"}, TypeError, "`ranking_weight` to be a number"),
            ({"ranking_weight": 2.0}, ValueError, r"`ranking_weight` to be 1.0 without a `ranking` term"),
            ({"pointwise_weight": 0.0}, ValueError, r"`pointwise_weight` to be 1.0 without a `ranking` term"),
            ({"kind": "regression", "ranking": "softmax"}, ValueError, "a 'regression' task takes no `ranking`"),
            (
                {"kind": "multiclass", "num_classes": 3, "ranking_weight": 2.0},
                ValueError,
                "a 'multiclass' task takes no `ranking_weight`",
            ),
        ],
    )
    def test_bad_values_at_construction(self, kwargs, error, says):
        with pytest.raises(error, match=says):
            Task("click", **kwargs)


class TestAgainstTheLoop:
    def test_the_matrix_reference_is_the_loop(self):
        for kind in KINDS:
            x, y, g, w, m = _column(seed=3)
            ours, count = matrix_sums(x, y, g, w, m, kind)
            ref, ref_count = loop_sums(x, y, g, w, m, kind)
            assert count == ref_count > 0
            torch.testing.assert_close(ours, ref)

    @pytest.mark.parametrize("graded", [True, False])  # 0/1 labels take the one-bit sort paths
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    @pytest.mark.parametrize("kind", KINDS)
    def test_values_and_gradients(self, kind, dtype, graded):
        x, y, g, w, m = _column(dtype=dtype, seed=1, graded=graded)
        x.requires_grad_()
        ours = ranking_loss(x, y, g, kind, weights=w, mask=m)
        assert ours.dtype == dtype
        ref_x = x.detach().double().requires_grad_()
        ref = _mean(loop_sums(ref_x, y, g, w, m, kind))
        tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(ours.double(), ref.detach(), **tol)
        ours.backward()
        ref.backward()
        torch.testing.assert_close(x.grad.double(), ref_x.grad, **tol)
        assert ref_x.grad.abs().sum() > 0

    @pytest.mark.parametrize("kind", KINDS)
    def test_gradcheck(self, kind):
        x, y, g, w, m = _column(batch=14, groups=3, seed=5)
        x.requires_grad_()
        assert torch.autograd.gradcheck(lambda z: ranking_loss(z, y, g, kind, weights=w, mask=m), (x,))

    @pytest.mark.parametrize("kind", KINDS)
    def test_ragged_sizes_from_1_to_200(self, kind):
        gen = torch.Generator().manual_seed(7)
        sizes = [1, 200, 2, 57, 1, 3, 120, 9]
        g = torch.repeat_interleave(torch.tensor([5, -3, 99, 0, 7, 42, 1000, 8]), torch.tensor(sizes))
        g = g[torch.randperm(len(g), generator=gen)]  # rows of a group scattered through the batch
        batch = len(g)
        x = torch.randn(batch, generator=gen, dtype=torch.float64, requires_grad=True)
        y = torch.randint(0, 4, (batch,), generator=gen).double()
        w = torch.rand(batch, generator=gen, dtype=torch.float64) + 0.5
        m = torch.rand(batch, generator=gen) < 0.9
        ours = ranking_loss(x, y, g, kind, weights=w, mask=m)
        ref_x = x.detach().clone().requires_grad_()
        ref = _mean(matrix_sums(ref_x, y, g, w, m, kind))
        torch.testing.assert_close(ours, ref)
        ours.backward()
        ref.backward()
        torch.testing.assert_close(x.grad, ref_x.grad)

    @pytest.mark.parametrize("kind", KINDS)
    def test_ties_in_logits_and_labels(self, kind):
        # Logits from 3 values, labels from 2: many ties of both; lambda ranks tied logits in row order.
        gen = torch.Generator().manual_seed(9)
        x = torch.randint(-1, 2, (40,), generator=gen).double().requires_grad_()
        y = torch.randint(0, 2, (40,), generator=gen).double()
        g = torch.randint(0, 4, (40,), generator=gen)
        ones, keep = torch.ones(40, dtype=torch.float64), torch.ones(40, dtype=torch.bool)
        ours = ranking_loss(x, y, g, kind)
        ref_x = x.detach().clone().requires_grad_()
        ref = _mean(loop_sums(ref_x, y, g, ones, keep, kind))
        torch.testing.assert_close(ours, ref)
        ours.backward()
        ref.backward()
        torch.testing.assert_close(x.grad, ref_x.grad)

    def test_pairs_are_the_label_different_pairs_only(self):
        # Groups of 1 to 1000 rows: exactly one entry per pair with different labels, no padding.
        gen = torch.Generator().manual_seed(2)
        sizes = torch.tensor([1, 1000, 3, 250, 1, 40])
        g = torch.repeat_interleave(torch.arange(6), sizes)
        y = torch.randint(0, 3, (len(g),), generator=gen).double()
        keys, _ = _ragged.flat_keys(g, torch.ones(len(g), 1, dtype=torch.bool))
        runs = _ragged.sort_runs(keys, y, len(g))
        higher, lower = _ragged.pairs(runs)
        expected = 0
        for group in range(6):
            counts = torch.bincount(y[g == group].long(), minlength=3)
            expected += int(counts[0] * counts[1] + counts[0] * counts[2] + counts[1] * counts[2])
        assert higher.numel() == lower.numel() == expected
        sorted_labels, sorted_groups = y[runs.order], g[runs.order]
        assert bool((sorted_labels[higher] > sorted_labels[lower]).all())
        assert bool((sorted_groups[higher] == sorted_groups[lower]).all())
        assert len(set(zip(runs.order[higher].tolist(), runs.order[lower].tolist(), strict=True))) == expected


class TestNothingToRank:
    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize(
        "case",
        ["one_row_groups", "equal_labels", "all_masked", "zero_labels", "empty"],
    )
    def test_zero_without_nan_and_zero_gradient(self, kind, case):
        x = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64)
        y = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
        g, m = torch.tensor([0, 1, 2, 3]), None
        if case == "equal_labels":
            y, g = torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
        elif case == "all_masked":
            g, m = torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.bool)
        elif case == "zero_labels":
            y, g = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
        elif case == "empty":
            x, y, g = x[:0], y[:0], g[:0]
        x.requires_grad_()
        out = ranking_loss(x, y, g, kind, mask=m)
        assert out.item() == 0.0
        out.backward()
        assert torch.equal(x.grad, torch.zeros_like(x))

    @pytest.mark.parametrize("kind", KINDS)
    def test_masked_entries_holding_nan_take_no_part(self, kind):
        x, y, g, w, m = _column(seed=4)
        bad_x, bad_y, bad_w = x.clone(), y.clone(), w.clone()
        bad_x[~m], bad_y[~m], bad_w[~m] = math.nan, math.inf, math.nan
        bad_x.requires_grad_()
        out = ranking_loss(bad_x, bad_y, g, kind, weights=bad_w, mask=m)
        rows = m.nonzero().flatten()
        kept_x = x[rows].clone().requires_grad_()
        ref = ranking_loss(kept_x, y[rows], g[rows], kind, weights=w[rows])
        torch.testing.assert_close(out, ref)
        out.backward()
        ref.backward()
        assert torch.equal(bad_x.grad[~m], torch.zeros(int((~m).sum()), dtype=torch.float64))
        torch.testing.assert_close(bad_x.grad[rows], kept_x.grad)


#: A ranker's head: every task kind, and one ranking task of each ranking kind (one graded, ranking-only).
HEAD = (
    Task("click", pos_weight=2.0, ranking="lambda_ndcg", ranking_weight=0.5),
    Task("feedback", kind="multiclass", num_classes=3, weight=0.5),
    Task("fav", ranking="pairwise_logistic"),
    Task("report", focal_gamma=2.0, focal_alpha=0.25),
    Task("dwell", kind="regression", weight=0.2),
    Task("share", ranking="pairwise_hinge", ranking_weight=2.0, pointwise_weight=0.5, label_smoothing=0.1),
    Task("relevance", ranking="softmax", pointwise_weight=0.0, weight=3.0),  # graded labels 0..3
    Task("reply"),
)


def _head_batch(batch=40, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, 10, generator=gen, dtype=torch.float64).to(dtype)
    binary = (torch.rand(batch, 8, generator=gen) < 0.4).double()
    labels = torch.cat(
        [
            binary[:, :1],
            torch.randint(0, 3, (batch, 1), generator=gen).double(),
            binary[:, 2:4],
            torch.randn(batch, 1, generator=gen, dtype=torch.float64),
            binary[:, 5:6],
            torch.randint(0, 4, (batch, 1), generator=gen).double(),
            binary[:, 7:],
        ],
        1,
    )
    weights = torch.rand(batch, 8, generator=gen, dtype=torch.float64).to(dtype) + 0.5
    mask = torch.rand(batch, 8, generator=gen) < 0.8
    groups = torch.randint(0, 6, (batch,), generator=gen) * 7 + 3
    return logits, labels, weights, mask, groups


#: The logit column of each task of HEAD.
_COLUMN = {"click": 0, "fav": 4, "share": 7, "relevance": 8}


def _expected(tasks, logits, labels, weights, mask, groups, reduction="mean", **kwargs):
    """Each task's loss: the same module without ranking terms, plus ranking_weight times the loop."""
    plain = [dataclasses.replace(t, ranking=None, ranking_weight=1.0, pointwise_weight=1.0) for t in tasks]
    pointwise = MultiTaskLoss(plain, task_loss_reduction=reduction, **kwargs).double()(
        logits.double(), labels, None if weights is None else weights.double(), mask
    )
    expected, ranking = {}, {}
    for position, task in enumerate(tasks):
        value = pointwise[f"loss/{task.name}"]
        if task.ranking is not None:
            w = torch.ones(len(groups), dtype=torch.float64) if weights is None else weights[:, position].double()
            m = torch.ones(len(groups), dtype=torch.bool) if mask is None else mask[:, position]
            total, count = loop_sums(logits[:, _COLUMN[task.name]], labels[:, position], groups, w, m, task.ranking)
            ranking[task.name] = total / max(count, 1) if reduction == "mean" else total
            value = task.pointwise_weight * value + task.ranking_weight * ranking[task.name]
        expected[task.name] = value
    return expected, ranking


class TestInMultiTaskLoss:
    @pytest.mark.filterwarnings("ignore:`(task_loss|global)_reduction=:UserWarning")
    @pytest.mark.parametrize("reduction", ["mean", "sum"])
    @pytest.mark.parametrize("global_reduction", ["mean", "sum", "max"])
    def test_a_mixed_head_against_the_loop(self, reduction, global_reduction):
        logits, labels, weights, mask, groups = _head_batch()
        loss = MultiTaskLoss(HEAD, task_loss_reduction=reduction, global_reduction=global_reduction).double()
        x = logits.clone().requires_grad_()
        out = loss(x, labels, weights, mask, groups=groups)
        assert list(out) == [f"loss/{t.name}" for t in HEAD] + ["loss"] + [
            f"ranking/{name}" for name in ("fav", "share", "relevance", "click")
        ]
        ref_x = logits.clone().requires_grad_()
        expected, ranking = _expected(HEAD, ref_x, labels, weights, mask, groups, reduction)
        for name, value in expected.items():
            torch.testing.assert_close(out[f"loss/{name}"], value, msg=name)
        for name, value in ranking.items():
            torch.testing.assert_close(out[f"ranking/{name}"], value.detach(), msg=name)
            assert not out[f"ranking/{name}"].requires_grad
        weighted = torch.stack([t.weight * expected[t.name] for t in HEAD])
        total = {"mean": weighted.mean(), "sum": weighted.sum(), "max": weighted.max()}[global_reduction]
        torch.testing.assert_close(out["loss"], total)
        out["loss"].backward()
        total.backward()
        torch.testing.assert_close(x.grad, ref_x.grad)

    def test_shared_weights_float32_and_no_mask(self):
        logits, labels, weights, _, groups = _head_batch(seed=2, dtype=torch.float32)
        shared = weights[:, 0]
        out = MultiTaskLoss(HEAD)(logits, labels.float(), shared, groups=groups)
        expected, _ = _expected(HEAD, logits, labels, shared[:, None].expand(-1, 8), None, groups)
        for name, value in expected.items():
            torch.testing.assert_close(out[f"loss/{name}"], value.float(), rtol=1e-5, atol=1e-6, msg=name)

    def test_half_precision_is_computed_in_float32(self):
        tasks = [Task("click", ranking="softmax"), Task("fav", ranking="pairwise_logistic")]
        logits, labels, _, _, groups = _head_batch(seed=3)
        x, y = logits[:, :2], labels[:, [0, 2]].float()
        out = MultiTaskLoss(tasks)(x.to(torch.bfloat16), y, groups=groups)
        ref = MultiTaskLoss(tasks)(x.to(torch.bfloat16).float(), y, groups=groups)
        assert out["ranking/click"].dtype == torch.float32
        for key in ref:
            torch.testing.assert_close(out[key], ref[key])

    def test_graded_labels_of_a_ranking_only_task_pass_check_inputs(self):
        tasks = [Task("relevance", ranking="lambda_ndcg", pointwise_weight=0.0), Task("click")]
        loss = MultiTaskLoss(tasks, check_inputs=True)
        x = torch.randn(6, 2)
        groups = torch.tensor([1, 1, 1, 2, 2, 2])
        labels = torch.tensor([[3.0, 1], [0, 0], [2, 1], [1, 0], [0, 1], [4, 0]])
        out = loss(x, labels, groups=groups)
        assert out["loss/relevance"].item() == pytest.approx(out["ranking/relevance"].item())
        assert out["ranking/relevance"].item() > 0
        bad = labels.clone()
        bad[2, 1] = 2.0
        with pytest.raises(ValueError, match=r"`labels`.*in \[-inf, 1\].*index \(2, 1\)"):
            loss(x, bad, groups=groups)
        bad = labels.clone()
        bad[1, 0] = -1.0
        with pytest.raises(ValueError, match=r"`labels`.*index \(1, 0\)"):
            loss(x, bad, groups=groups)

    def test_groups_are_required_and_checked(self):
        loss = MultiTaskLoss([Task("click", ranking="softmax"), Task("fav")])
        x, y = torch.randn(4, 2), torch.ones(4, 2)
        with pytest.raises(ValueError, match="Expected `groups`"):
            loss(x, y)
        with pytest.raises(TypeError, match=r"`groups` to be an integer tensor.*torch.float32"):
            loss(x, y, groups=torch.zeros(4))
        with pytest.raises(ValueError, match=r"`groups` of shape \[B\] \(4,\).*got \(3,\)"):
            loss(x, y, groups=torch.zeros(3, dtype=torch.long))
        with pytest.raises(TypeError, match="`groups` to be a torch.Tensor, got list"):
            loss(x, y, groups=[0, 0, 1, 1])
        # Without ranking tasks, groups are not needed, and ignored if given.
        plain = MultiTaskLoss(["click", "fav"])
        assert "ranking/click" not in plain(x, y, groups=torch.zeros(4, dtype=torch.long))

    def test_the_functional_checks_its_arguments(self):
        x, y, g = torch.zeros(4), torch.zeros(4), torch.zeros(4, dtype=torch.long)
        with pytest.raises(ValueError, match=r"`kind` to be one of \('pairwise_logistic'.*got 'listnet'"):
            ranking_loss(x, y, g, "listnet")
        with pytest.raises(ValueError, match=r"`logits` of shape \[B\].*got \(2, 2\)"):
            ranking_loss(x.view(2, 2), y.view(2, 2), g[:2])
        with pytest.raises(ValueError, match=r"`labels` to have the shape of `logits` \(4,\), got \(3,\)"):
            ranking_loss(x, y[:3], g)
        with pytest.raises(ValueError, match="Expected `groups`"):
            ranking_loss(x, y, None)
        with pytest.raises(TypeError, match="`logits`"):
            ranking_loss(x.long(), y, g)

    def test_no_value_per_sample(self):
        with pytest.raises(ValueError, match=r"`task_loss_reduction` to be 'mean' or 'sum' with ranking tasks"):
            MultiTaskLoss([Task("click", ranking="softmax")], task_loss_reduction="none")

    def test_one_ranking_task_alone(self):
        x, y, g, w, m = _column(seed=8, graded=False, dtype=torch.float32)
        loss = MultiTaskLoss([Task("click", ranking="pairwise_logistic")])
        out = loss(x[:, None], y[:, None], w[:, None], m[:, None], groups=g)
        pointwise = F.binary_cross_entropy_with_logits(x[m], y[m], w[m], reduction="sum") / m.sum()
        torch.testing.assert_close(out["loss"], pointwise + ranking_loss(x, y, g, weights=w, mask=m))

    def test_a_weighting_and_the_global_metric_take_the_ranking_entries(self):
        logits, labels, weights, mask, groups = _head_batch(seed=5)
        tasks = [dataclasses.replace(t, weight=1.0) for t in HEAD]  # the weighting takes the tasks' weights' place
        loss = MultiTaskLoss(tasks, weighting=UncertaintyWeighting([t.name for t in HEAD])).double()
        out = loss(logits, labels, weights, mask, groups=groups)
        assert {f"ranking/{n}" for n in _COLUMN} <= set(out)
        assert "weight/click" in out
        metric = MultiTaskGlobalLoss([t.name for t in HEAD])
        metric.update(out, weight=40)
        assert set(metric.compute()) == {f"loss/{t.name}" for t in HEAD} | {"loss"}

    def test_meta_logits_infer_shapes(self):
        loss = MultiTaskLoss(HEAD)
        logits, labels = torch.zeros(5, 10, device="meta"), torch.zeros(5, 8, device="meta")
        out = loss(logits, labels, groups=torch.zeros(5, dtype=torch.long))
        assert out["ranking/click"].device.type == "meta"
        assert out["loss"].shape == ()

    def test_state_dict_keeps_its_keys(self):
        assert set(MultiTaskLoss(HEAD).state_dict()) == {"pos_weight", "task_weight"}


@pytest.mark.parametrize("kind", ["softmax", "lambda_ndcg"])  # the list path and the pair path
def test_torch_compile_runs_the_ranking_term_outside_the_graph(kind):
    # The pointwise terms compile; the ranking term runs eagerly (one graph break). New group counts
    # and pair counts reuse the compiled graph: only a new batch size recompiles, as without ranking.
    tasks = [Task("click", ranking=kind), Task("dwell", kind="regression"), Task("fav", focal_gamma=2.0)]
    loss = MultiTaskLoss(tasks)
    torch._dynamo.reset()
    compiled = torch.compile(loss)
    gen = torch.Generator().manual_seed(0)
    graphs = []
    for groups_count in (3, 7, 16):
        logits = torch.randn(32, 3, generator=gen)
        labels = torch.cat([(torch.rand(32, 1, generator=gen) < 0.4).float(), torch.randn(32, 1, generator=gen)], 1)
        labels = torch.cat([labels, (torch.rand(32, 1, generator=gen) < 0.4).float()], 1)
        groups = torch.randint(0, groups_count, (32,), generator=gen)
        eager_x, compiled_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        eager = loss(eager_x, labels, groups=groups)
        out = compiled(compiled_x, labels, groups=groups)
        for key in eager:
            torch.testing.assert_close(out[key], eager[key], msg=key)
        eager["loss"].backward()
        out["loss"].backward()
        torch.testing.assert_close(compiled_x.grad, eager_x.grad)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1
    assert graphs == graphs[:1] * 3  # other group and pair counts: no new graph
    torch._dynamo.reset()


def test_matches_rax_on_a_segmented_batch():
    # Rax 0.4.0 (JAX, float64) on this batch, run once outside the suite (jax is too large for the
    # test extra): rax.pairwise_logistic_loss / pairwise_hinge_loss(scores, labels, segments=,
    # where=) give 0.6912952715358869 and 0.921111111111111; softmax_loss with
    # label_fn=utils.normalize_probabilities, one list at a time, averages 1.6053199460912657; and
    # pairwise_logistic_loss with lambdaweight_fn=dcg_lambdaweight(normalize=True), per list with
    # reduce_fn=jnp.sum and divided by the list's size (Rax scales that weight by the list size),
    # summed over lists and divided by the 72 pairs, gives 0.04880128102098342.
    x = torch.tensor(RAX_SCORES, dtype=torch.float64)
    y = torch.tensor(RAX_LABELS, dtype=torch.float64)
    g, m = torch.tensor(RAX_SEGMENTS), torch.tensor(RAX_WHERE)
    rax = {
        "pairwise_logistic": 0.6912952715358869,
        "pairwise_hinge": 0.921111111111111,
        "softmax": 1.6053199460912657,
        "lambda_ndcg": 0.04880128102098342,
    }
    for kind, value in rax.items():
        assert ranking_loss(x, y, g, kind, mask=m).item() == pytest.approx(value, rel=1e-12), kind


def _numbers(text: str) -> list[float]:
    return [float(word) for word in text.split()]


# The batch of test_matches_rax_on_a_segmented_batch (numpy default_rng(18): 40 rows, 6 segments).
RAX_SCORES = _numbers(
    "-0.432 -1.13 0.674 -1.108 2.014 0.924 -0.359 0.571 1.612 2.834 -0.923 1.065 0.518 -0.28 1.092 0.507 "
    "1.076 -0.526 -0.002 0.395 0.02 0.017 -0.768 0.126 0.188 -0.061 -0.015 0.696 -0.659 0.697 -0.153 0.056 "
    "-0.191 0.899 0.761 0.006 -0.439 1.856 0.539 -1.146"
)
RAX_LABELS = _numbers("1 0 2 0 2 0 2 1 1 2 0 2 1 0 1 0 0 0 2 0 2 0 0 2 1 1 1 1 2 1 0 0 2 2 0 2 0 2 1 2")
RAX_SEGMENTS = [
    int(id_) for id_ in _numbers("0 0 0 0 1 1 1 1 2 2 2 2 2 2 2 3 3 3 3 3 3 3 3 3 3 4 4 4 4 4 4 4 4 4 4 4 5 5 5 5")
]
RAX_WHERE = [
    flag == 1 for flag in _numbers("1 1 1 1 1 1 1 1 1 1 1 1 0 1 1 0 1 1 1 0 1 1 0 1 1 1 1 1 1 1 0 1 1 1 1 1 1 1 1 0")
]


def test_unchecked_sums_of_several_columns_are_each_column_alone():
    logits, labels, weights, mask, groups = _head_batch(seed=6)
    x, y, w, m = logits[:, :3], labels[:, [0, 2, 6]], weights[:, :3], mask[:, :3]
    for kind in KINDS:
        sums, counts = unchecked_ranking_sums(x, y, groups, w, m, kind)
        for c in range(3):
            total, count = loop_sums(x[:, c], y[:, c], groups, w[:, c], m[:, c], kind)
            torch.testing.assert_close(sums[c], total)
            assert counts[c].item() == count


# ---- 2 gloo ranks: uneven groups, normalize="global" equals one process on the global batch ----


def _ddp_data():
    gen = torch.Generator().manual_seed(21)
    features = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    logits, labels, weights, mask, _ = _head_batch(batch=30, seed=22)
    del logits
    # Rank 0 holds rows 0..11 (groups of 1, 4 and 7 rows), rank 1 rows 12..29 (2, 16): uneven.
    groups = torch.repeat_interleave(torch.tensor([10, 11, 12, 20, 21]), torch.tensor([1, 4, 7, 2, 16]))
    mask[12:] &= torch.rand(18, 8, generator=gen) < 0.6  # rank 1: sparser labels
    return features, labels, weights, mask, groups


def _model_and_loss(normalize):
    torch.manual_seed(0)
    return nn.Linear(5, 10).double(), MultiTaskLoss(HEAD, normalize=normalize).double()


def _ranking_ddp_rank(rank, world_size):
    features, labels, weights, mask, groups = _ddp_data()
    rows = slice(0, 12) if rank == 0 else slice(12, 30)
    model, loss = _model_and_loss("global")
    ddp = DistributedDataParallel(model)
    out = loss(ddp(features[rows]), labels[rows], weights[rows], mask[rows], groups=groups[rows])
    out["loss"].backward()
    return [p.grad.clone() for p in model.parameters()], {key: value.item() for key, value in out.items()}


def test_ddp_on_two_ranks_with_uneven_groups_equals_one_process(ranks):
    results = ranks(_ranking_ddp_rank, 2, timeout=120)
    features, labels, weights, mask, groups = _ddp_data()
    model, loss = _model_and_loss("local")
    out = loss(model(features), labels, weights, mask, groups=groups)
    out["loss"].backward()
    for grads, _ in results:
        for ours, ref in zip(grads, model.parameters(), strict=True):
            torch.testing.assert_close(ours, ref.grad, rtol=1e-10, atol=1e-12)
    for key in out:
        average = sum(values[key] for _, values in results) / 2
        assert average == pytest.approx(out[key].item(), rel=1e-10, abs=1e-12), key
