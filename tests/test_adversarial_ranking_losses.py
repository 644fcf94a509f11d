"""Adversarial cases for the ranking terms' fast paths (issue 18): group keys, empty batches, double backward.

Each case is checked against the float64 Python loop over groups and pairs of
``tests/test_ranking_losses.py`` (``loop_sums``), values and gradients, on inputs the speed work's
own tests do not reach: narrow id dtypes whose span wraps, ids at the direct-key threshold and at
the int64 limits, empty batches with several ranking columns, and second derivatives.
"""

from __future__ import annotations

import pytest
import torch

from losses import MultiTaskLoss, Task, _ragged
from losses.ranking_losses import ranking_loss, unchecked_ranking_sums
from tests.test_ranking_losses import HEAD, KINDS, _expected, _head_batch, loop_sums


def _two_columns(ids: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(ids), 2, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (len(ids), 2), generator=gen).double()
    return x, y


def _loop_columns(x, y, groups, kind):
    ones, keep = torch.ones(len(groups), dtype=torch.float64), torch.ones(len(groups), dtype=torch.bool)
    parts = [loop_sums(x[:, r], y[:, r], groups, ones, keep, kind) for r in range(x.shape[1])]
    return [float(total) for total, _ in parts], [float(count) for _, count in parts]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("dtype", "values"),
    [(torch.int16, [-30000, 0, 5535, 30000]), (torch.int8, [-100, 0, 30, 100]), (torch.uint8, [0, 7, 200, 255])],
)
def test_narrow_id_dtypes_spanning_most_of_their_range_keep_columns_apart(kind, dtype, values):
    """int16 ids -30000 .. 30000 span 60001 values: less the smallest, they wrapped in int16 (60000 -> -5536).

    Column 1's key 60001 + (5535 + 30000 wrapped to -30001) then equalled column 0's group 0 (key
    30000): one run of two columns, whose pairs and lists mixed the tasks.
    """
    base = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 1, 2])
    groups = torch.tensor(values, dtype=torch.int64)[base].to(dtype)
    x, y = _two_columns(groups)
    sums, counts = unchecked_ranking_sums(x, y, groups, None, None, kind)
    totals, pairs = _loop_columns(x, y, base, kind)
    assert counts.tolist() == pairs
    torch.testing.assert_close(sums, torch.tensor(totals, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_ids_spanning_the_direct_key_threshold_give_the_loop(offset):
    """Ids spanning just below, at and above the span read directly (keys below 2^31) agree with the loop."""
    batch = 9
    span = _ragged._KEYS // 2 - batch + offset  # two columns: 2 (span + B) against 2^31
    base = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    groups = torch.tensor([-5, -5 + span // 2, -5 + span - 1])[base]
    _ids, got_span = _ragged._group_ids(groups, 2)
    assert got_span == (span if offset <= 0 else batch)  # direct at and below the threshold, a sort above
    x, y = _two_columns(groups, seed=1)
    for kind in ("pairwise_logistic", "lambda_ndcg"):
        sums, counts = unchecked_ranking_sums(x, y, groups, None, None, kind)
        totals, pairs = _loop_columns(x, y, base, kind)
        assert counts.tolist() == pairs
        torch.testing.assert_close(sums, torch.tensor(totals, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "values", [[-(2**63), -(2**63) + 1, -(2**63) + 5], [2**63 - 1, 2**63 - 2, -(2**63)], [-7, 2**62, -3]]
)
def test_ids_at_the_int64_limits(values):
    base = torch.tensor([0, 1, 2, 0, 1, 2, 2, 1])
    groups = torch.tensor(values, dtype=torch.int64)[base]
    x, y = _two_columns(groups, seed=2)
    for kind in ("pairwise_hinge", "softmax"):
        sums, counts = unchecked_ranking_sums(x, y, groups, None, None, kind)
        totals, pairs = _loop_columns(x, y, base, kind)
        assert counts.tolist() == pairs
        torch.testing.assert_close(sums, torch.tensor(totals, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("consecutive", [True, False])
def test_an_empty_batch_with_two_ranking_tasks_gives_zero_and_a_gradient(kind, consecutive):
    """B = 0 used to fail deep in torch: ``arange`` with step 0 (the span of no ids), then sums of shape [1]."""
    tasks = [Task("a", ranking=kind), Task("b"), Task("c", ranking=kind)]
    if consecutive:
        tasks = [tasks[0], tasks[2], tasks[1]]
    loss_fn = MultiTaskLoss(tasks)
    logits = torch.zeros(0, 3, requires_grad=True)
    out = loss_fn(logits, torch.zeros(0, 3), groups=torch.zeros(0, dtype=torch.int64))
    out["loss"].backward()
    assert out["ranking/a"].item() == 0.0
    assert out["ranking/c"].item() == 0.0
    assert logits.grad is not None
    assert logits.grad.shape == (0, 3)
    sums, counts = unchecked_ranking_sums(
        torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0, dtype=torch.int32), None, None, kind
    )
    assert sums.tolist() == [0.0, 0.0]
    assert counts.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("kind", KINDS)
def test_a_second_derivative_is_refused_not_silently_zero(kind):
    """The fused Functions save each entry's gradient as a constant: differentiating it again gave 0.

    With a learnt scale on the loss the first gradient has a graph (through the scale), so a
    gradient penalty's second backward ran and silently left out the ranking term's curvature.
    """
    x, y, groups = (
        torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(8)),
        torch.tensor([2.0, 0, 1, 0, 1, 0, 2, 1]),
        torch.arange(8) % 2,
    )
    logits, scale = x.clone().requires_grad_(), torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(scale * ranking_loss(logits, y, groups, kind), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.pow(2).sum().backward()


@pytest.mark.parametrize("kind", KINDS)
def test_backward_twice_with_retain_graph_doubles_the_gradient(kind):
    x, y, groups = (
        torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(9)),
        torch.tensor([2.0, 0, 1, 0, 1, 0, 2, 1, 1, 0]),
        torch.arange(10) % 3,
    )
    logits = x.clone().requires_grad_()
    loss = ranking_loss(logits, y, groups, kind)
    loss.backward(retain_graph=True)
    once = logits.grad.clone()
    loss.backward()
    torch.testing.assert_close(logits.grad, 2 * once)
    assert once.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_torch_func_grad_equals_the_fused_gradient(kind):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=gen).double()
    groups = torch.tensor([5, -1, 5, 9, -1, 9, 5, 9, -1, 5, 9, -1], dtype=torch.int32)
    leaf = x.clone().requires_grad_()
    (fused,) = torch.autograd.grad(ranking_loss(leaf, y, groups, kind), leaf)
    plain = torch.func.grad(lambda t: ranking_loss(t, y, groups, kind))(x)
    torch.testing.assert_close(plain, fused, rtol=1e-12, atol=1e-14)
    assert fused.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_transposed_logits_view_with_int16_ids_and_shared_weights(dtype):
    """The whole HEAD (ranked tasks non-consecutive, mixed with focal, multi-class, regression): values and gradients.

    Logits come as a transposed view (non-contiguous), group ids as int16 spanning 64000 values
    (the case that wrapped), weights ``[B]``; each task's loss and the gradient of their sum are
    the loop's (``_expected``, differentiated by autograd in float64).
    """
    logits, labels, weights, mask, _ = _head_batch(batch=24, seed=4, dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    base = torch.randint(0, 5, (24,), generator=gen)
    groups = torch.tensor([-32000, -1, 0, 1000, 32000], dtype=torch.int16)[base]
    row_weights = weights[:, 0]
    view = logits.to(dtype).t().contiguous().t().requires_grad_()
    assert not view.is_contiguous()
    out = MultiTaskLoss(HEAD).to(dtype)(view, labels.to(dtype), row_weights.to(dtype), mask, groups=groups)
    reference = logits.clone().requires_grad_()
    expected, ranking = _expected(HEAD, reference, labels, row_weights.unsqueeze(1).expand(-1, 8), mask, base)
    tolerance = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    for task in HEAD:
        assert out[f"loss/{task.name}"].item() == pytest.approx(expected[task.name].item(), **_approx(tolerance))
    assert all(value.item() > 0 for value in ranking.values())
    sum(out[f"loss/{task.name}"] for task in HEAD).backward()
    sum(expected.values()).backward()
    torch.testing.assert_close(view.grad.double(), reference.grad, **tolerance)


def _approx(tolerance):
    return {"rel": tolerance["rtol"], "abs": tolerance["atol"]}


def test_bfloat16_logits_are_ranked_in_float32():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(20, generator=gen).to(torch.bfloat16)
    y = torch.randint(0, 3, (20,), generator=gen).float()
    groups = torch.randint(0, 4, (20,), generator=gen)
    ones, keep = torch.ones(20, dtype=torch.float64), torch.ones(20, dtype=torch.bool)
    for kind in KINDS:
        total, count = loop_sums(x.double(), y, groups, ones, keep, kind)
        value = ranking_loss(x, y, groups, kind)
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(float(total) / count, rel=1e-5), kind


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_to_rank_gives_zero_with_a_zero_gradient(kind):
    """One row per group, every label equal, or every row of the only mixed group masked: 0, gradient 0."""
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    cases = [
        (torch.tensor([1.0, 0, 2, 1, 0, 1]), torch.arange(6), None),  # every row its own group
        (torch.ones(6), torch.zeros(6, dtype=torch.int64), None),  # one group, equal labels
        (torch.tensor([1.0, 0, 1, 1, 1, 1]), torch.tensor([3, 3, 4, 4, 4, 4]), torch.tensor([0, 0, 1, 1, 1, 1]) > 0),
    ]
    for y, groups, mask in cases:
        x.grad = None
        value = ranking_loss(x, y, groups, kind, mask=mask)
        value.backward()
        assert value.item() == 0.0
        assert x.grad is not None
        assert x.grad.abs().sum().item() == 0.0


def test_one_row():
    x = torch.tensor([0.3], requires_grad=True)
    for kind in KINDS:
        value = ranking_loss(x, torch.tensor([1.0]), torch.tensor([7]), kind)
        value.backward()
        assert value.item() == 0.0
        assert x.grad.tolist() == [0.0]


def test_torch_func_hessian_runs_the_plain_ops_and_gives_the_curvature():
    """The refused second derivative is had with ``torch.func``: the loop's Hessian."""
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(9, generator=gen, dtype=torch.float64)
    y = torch.tensor([2.0, 0, 1, 0, 1, 0, 2, 1, 0])
    groups, ones, keep = torch.arange(9) % 2, torch.ones(9, dtype=torch.float64), torch.ones(9, dtype=torch.bool)

    def loop(t):
        total, count = loop_sums(t, y, groups, ones, keep, "pairwise_logistic")
        return total / count

    hessian = torch.func.hessian(lambda t: ranking_loss(t, y, groups))(x)
    torch.testing.assert_close(hessian, torch.func.hessian(loop)(x), rtol=1e-12, atol=1e-14)
    assert hessian.abs().sum() > 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_learnt_weights_with_nan_labels_under_the_mask(kind):
    """Weights that require grad run the plain ops: values and both gradients are the loop's.

    lambda_ndcg wrote the normalised gains into the stacked rows with ``out=``, which autograd
    refuses once the rows (holding the weights) require grad: ``RuntimeError: div(): functions
    with out=... arguments don't support automatic differentiation``.
    """
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(15, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (15,), generator=gen).double()
    w = torch.rand(15, generator=gen, dtype=torch.float64) + 0.5
    m = torch.rand(15, generator=gen) < 0.8
    groups = torch.randint(0, 3, (15,), generator=gen)
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    value = ranking_loss(x1, y.masked_fill(~m, float("nan")), groups, kind, w1, m)
    value.backward()
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    total, count = loop_sums(x2, y, groups, w2, m, kind)
    (total / count).backward()
    assert value.item() == pytest.approx((total / count).item(), rel=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-10, atol=1e-14)
    assert w1.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kinds",
    [
        ("pairwise_logistic", "pairwise_logistic", "softmax"),  # consecutive: narrow views, two kind slices
        ("lambda_ndcg", "pairwise_hinge", "lambda_ndcg"),  # in kind order 1, 0, 2: index_select
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ranked_columns_after_a_multiclass_task_from_strided_views(kinds, dtype):
    """Three ranked tasks behind a 3-class task (logit columns 3..5 of 6), logits and weights as strided views."""
    gen = torch.Generator().manual_seed(13)
    batch = 14
    tasks = [Task("kind", kind="multiclass", num_classes=3)] + [
        Task(f"r{i}", ranking=kind, pointwise_weight=0.0) for i, kind in enumerate(kinds)
    ]
    wide = torch.randn(8, batch, generator=gen, dtype=torch.float64)
    logits = wide.t()[:, 1:7]  # a slice of a transposed tensor: strides (1, 14)
    labels = torch.cat(
        [torch.randint(0, 3, (batch, 1), generator=gen), torch.randint(0, 3, (batch, 3), generator=gen)], 1
    )
    weights = (torch.rand(4, batch, generator=gen, dtype=torch.float64) + 0.5).t()
    mask = torch.rand(batch, 4, generator=gen) < 0.8
    groups = torch.randint(0, 3, (batch,), generator=gen) * -9
    view = logits.to(dtype).detach().requires_grad_() if dtype != torch.float64 else logits.detach().requires_grad_()
    out = MultiTaskLoss(tasks).to(dtype)(view, labels.to(dtype), weights.to(dtype), mask, groups=groups)
    sum(out[f"loss/r{i}"] for i in range(3)).backward()  # pointwise_weight 0: the ranking term
    reference = logits.detach().clone().requires_grad_()
    total = 0
    for i, kind in enumerate(kinds):
        sums, count = loop_sums(
            reference[:, 3 + i], labels[:, 1 + i].double(), groups, weights[:, 1 + i], mask[:, 1 + i], kind
        )
        term = sums / max(count, 1)
        assert out[f"ranking/r{i}"].item() == pytest.approx(term.item(), rel=1e-5 if dtype == torch.float32 else 1e-12)
        total = total + term
    total.backward()
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-13}
    torch.testing.assert_close(view.grad.double(), reference.grad, **tolerance)
    assert reference.grad[:, 3:].abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_tied_logits_and_graded_labels_with_ties_in_two_masked_columns(kind):
    """Logits on a grid of three values (lambda_ndcg ranks ties in row order), labels 0..2, a mask."""
    gen = torch.Generator().manual_seed(14)
    x = torch.randint(-1, 2, (16, 2), generator=gen).double()
    y = torch.randint(0, 3, (16, 2), generator=gen).double()
    w = torch.rand(16, 2, generator=gen, dtype=torch.float64) + 0.5
    m = torch.rand(16, 2, generator=gen) < 0.8
    groups = torch.randint(0, 3, (16,), generator=gen) + 2**40
    logits = x.clone().requires_grad_()
    sums, counts = unchecked_ranking_sums(logits, y, groups, w, m, kind)
    (sums / counts.clamp_min(1)).sum().backward()
    reference = x.clone().requires_grad_()
    total = 0
    for r in range(2):
        part, count = loop_sums(reference[:, r], y[:, r], groups, w[:, r], m[:, r], kind)
        assert counts[r].item() == count
        assert sums[r].item() == pytest.approx(part.item(), rel=1e-12)
        total = total + part / max(count, 1)
    total.backward()
    torch.testing.assert_close(logits.grad, reference.grad, rtol=1e-10, atol=1e-14)
