"""Adversarial tests of the ranked columns' fork (losses._column_fork) and the 0/1 labels' int32 sort (losses._ragged).

The reference for every gradient is the same computation with the fork replaced by plain reads; for
every sum, count and gradient of the ranking terms, the general sort (``_ragged._binary`` returning
``None``) and the float64 loop references of ``tests/test_ranking_losses.py``. Equality is bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from losses import MultiTaskLoss, Task, UncertaintyWeighting, _ragged
from losses import _column_fork as fork_module
from losses._column_fork import ColumnFork
from losses.ranking_losses import RANKINGS, ranking_loss, unchecked_ranking_sums
from tests.test_ranking_losses import HEAD, _head_batch, loop_sums, matrix_sums

# ---- the fork -------------------------------------------------------------------------------------


def _plain(x, span, index):
    return x, (x.narrow(1, *span) if span is not None else x.index_select(1, index))


@contextlib.contextmanager
def _reads(plain: bool):
    """The module's columns through the fork (recording each fork's backward node), or plain reads."""
    nodes: list[str] = []

    def spy(x, span, index):
        every, cols = fork_module.fork_columns(x, span, index)
        nodes.append(type(cols.grad_fn).__name__)
        return every, cols

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("losses._ranking_terms.fork_columns", _plain if plain else spy)
        yield nodes


def _both(run):
    """``run()`` through the fork (checked to be taken) and through plain reads."""
    with _reads(plain=False) as nodes:
        forked = run()
    assert "ColumnForkBackward" in nodes, nodes
    with _reads(plain=True):
        plain = run()
    return forked, plain


def _assert_bitwise(forked, plain):
    assert len(forked) == len(plain)
    for a, b in zip(forked, plain, strict=True):
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        assert torch.equal(a, b), (a - b).abs().max()
        # Signed zeros too: the unranked columns' -0.0 of the pointwise gradient survives either way.
        assert torch.equal(torch.signbit(a), torch.signbit(b))


SPLIT_HEAD = (  # ranked tasks of two kinds, not consecutive: the columns are gathered (index_select)
    HEAD
)
RUN_HEAD = (  # one kind, consecutive ranked tasks and logit columns: the columns are a view (narrow)
    Task("a", focal_gamma=2.0, focal_alpha=0.25),
    Task("b", ranking="lambda_ndcg", label_smoothing=0.1),
    Task("c", ranking="lambda_ndcg", pointwise_weight=0.0),
    Task("d", kind="regression"),
)


def _batch(head, batch, dtype, seed=0):
    if head is SPLIT_HEAD:
        logits, labels, weights, mask, groups = _head_batch(batch=batch, seed=seed)
        return logits.shape[1], labels, weights.to(dtype), mask, groups
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.rand(batch, 4, generator=gen) < 0.4).double()
    labels[:, 3] = torch.randn(batch, generator=gen, dtype=torch.float64)
    mask = torch.rand(batch, 4, generator=gen) < 0.8
    return 4, labels, None, mask, torch.randint(0, 3, (batch,), generator=gen)


@pytest.mark.parametrize(
    ("dtype", "reduction"),
    [
        (torch.float64, "mean"),
        (torch.float64, "sum"),
        (torch.float32, "sum"),
        (torch.bfloat16, "mean"),
        (torch.float16, "mean"),
    ],
)
@pytest.mark.parametrize("batch", [1, 33])
@pytest.mark.parametrize("head", ["split", "run"])
@pytest.mark.filterwarnings("ignore:`task_loss_reduction='sum'`:UserWarning")  # the DDP note; no DDP here
def test_a_linear_head_with_hooks_and_two_accumulated_steps(dtype, batch, head, reduction):
    tasks = SPLIT_HEAD if head == "split" else RUN_HEAD

    def run():
        torch.manual_seed(0)
        width, labels, weights, mask, groups = _batch(tasks, batch, dtype)
        model = nn.Linear(5, width).to(dtype)
        loss = MultiTaskLoss(tasks, task_loss_reduction=reduction).to(dtype)
        seen = []
        values = []
        for _ in range(2):  # gradient accumulation: both steps add into .grad
            features = torch.randn(batch, 5, dtype=torch.float64).to(dtype)
            logits = model(features)
            logits.register_hook(lambda g: seen.append(g.clone()))
            out = loss(logits, labels, weights, mask, groups=groups)
            out["loss"].backward()
            values += [out[key].detach() for key in sorted(out)]
        return [model.weight.grad, model.bias.grad, *seen, *values]

    forked, plain = _both(run)
    assert forked[0].abs().sum() > 0
    _assert_bitwise(forked, plain)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_logits_also_read_by_a_loss_outside_the_module(dtype):
    # The logits' gradient is then three parts. Through the fork the module's two are summed first,
    # then the outside one; through plain reads autograd sums the three in its own order, which may
    # round differently in the last bit (1 ulp seen in float64). So the reference is the module's
    # gradient (plain reads) plus the outside gradient, in that order: bit for bit.
    logits, labels, weights, mask, groups = _head_batch(batch=33, seed=2)
    logits = logits.to(dtype)
    loss = MultiTaskLoss(HEAD).to(dtype)

    def outside(z):
        return 0.25 * z.float().square().mean() + z.sum()  # its gradient: a broadcast, and a product

    def run():
        x = logits.clone().requires_grad_()
        seen = []
        x.register_hook(seen.append)
        (grad,) = torch.autograd.grad(loss(x, labels, weights, mask, groups=groups)["loss"] + outside(x), x)
        assert len(seen) == 1
        assert torch.equal(seen[0], grad)
        return [grad]

    with _reads(plain=False) as nodes:
        (forked,) = run()
    assert nodes == ["ColumnForkBackward"]
    x = logits.clone().requires_grad_()
    with _reads(plain=True):
        (module,) = torch.autograd.grad(loss(x, labels, weights, mask, groups=groups)["loss"], x)
    (other,) = torch.autograd.grad(outside(x), x)
    assert torch.equal(forked, module + other)


@pytest.mark.parametrize("case", ["transposed logits", "checkpoint", "int16 groups"])
def test_strided_logits_activation_checkpointing_and_narrow_group_ids(case):
    def run():
        logits, labels, weights, mask, groups = _head_batch(batch=25, seed=1)
        loss = MultiTaskLoss(HEAD).double()
        if case == "transposed logits":  # a non-contiguous [B, C] view: the fork's view and gather read it
            leaf = logits.t().contiguous().requires_grad_()
            total = loss(leaf.t(), labels, weights, mask, groups=groups)["loss"]
        elif case == "checkpoint":  # the forward (and the fork) run again in the backward

            def step(z):
                return loss(z * 1.0, labels, weights, mask, groups=groups)["loss"]

            leaf = logits.clone().requires_grad_()
            total = torch.utils.checkpoint.checkpoint(step, leaf, use_reentrant=False)
        else:
            leaf = logits.clone().requires_grad_()
            total = loss(leaf, labels, weights, mask, groups=groups.to(torch.int16))["loss"]
        return [*torch.autograd.grad(total, leaf), total.detach()]

    forked, plain = _both(run)
    assert forked[0].abs().sum() > 0
    _assert_bitwise(forked, plain)


@pytest.mark.parametrize("normalize", ["local", "global"])
def test_weighting_and_normalize_pass_the_fork_unchanged(normalize):
    def run():
        logits, labels, weights, mask, groups = _head_batch(batch=24, seed=3)
        logits.requires_grad_()
        tasks = [dataclasses.replace(t, weight=1.0) for t in HEAD]  # the weighting alone weighs the tasks
        loss = MultiTaskLoss(tasks, normalize=normalize, weighting=UncertaintyWeighting([t.name for t in HEAD]))
        loss = loss.double()
        out = loss(logits, labels, weights, mask, groups=groups)
        params = [logits, *loss.parameters()]
        return [*torch.autograd.grad(out["loss"], params), out["loss"].detach()]

    _assert_bitwise(*_both(run))


def test_retain_graph_second_backward_and_create_graph():
    def run():
        torch.manual_seed(1)
        _, labels, weights, mask, groups = _head_batch(batch=20, seed=4)
        model = nn.Linear(3, 10).double()
        features = torch.randn(20, 3, dtype=torch.float64)
        loss = MultiTaskLoss(HEAD).double()
        total = loss(model(features), labels, weights, mask, groups=groups)["loss"]
        params = list(model.parameters())
        first = torch.autograd.grad(total, params, retain_graph=True)
        second = torch.autograd.grad(total, params, retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
        # create_graph: the fork's out-of-place branch. The pointwise kernel's out-of-place gradient
        # may round apart from its in-place one, so this is compared to the other path, not to `first`.
        recorded = torch.autograd.grad(total, params, create_graph=True)
        for a, b in zip(first, recorded, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-15)
        return [*first, *second, *(g.detach() for g in recorded)]

    forked, plain = _both(run)
    assert forked[0].abs().sum() > 0
    _assert_bitwise(forked, plain)


@pytest.mark.parametrize("kind", list(RANKINGS))
def test_a_gradient_penalty_through_a_ranking_term_is_refused_not_silently_missing_its_curvature(kind):
    # Found by this file: with create_graph=True and the ranking term entering the loss linearly, the
    # fused Functions' first derivative came back as a constant (torch's once_differentiable only
    # attaches its error when the incoming gradient requires grad, and then to a node leading to no
    # input), so autograd.grad(penalty, params) ran and left out the ranking term's curvature:
    # [0.1026, -0.1025, -0.2331] against torch.func's [0.3300, -0.3556, -0.6734] (pairwise_logistic).
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    labels = (torch.rand(20, 1, generator=gen) < 0.4).double()
    groups = torch.randint(0, 4, (20,), generator=gen)
    weight = torch.randn(1, 3, generator=gen, dtype=torch.float64)
    loss = MultiTaskLoss([Task("a", ranking=kind)]).double()

    def total(w):
        return loss(features @ w.t(), labels, groups=groups)["loss"]

    for plain in (False, True):
        with _reads(plain):
            w = weight.clone().requires_grad_()
            (grad,) = torch.autograd.grad(total(w), w, create_graph=True)
            with pytest.raises(RuntimeError, match="differentiate twice"):
                torch.autograd.grad(grad.square().sum(), w)
    # torch.func runs the plain ops, which have the curvature.
    curvature = torch.func.grad(lambda w: torch.func.grad(total)(w).square().sum())(weight)
    assert curvature.abs().sum() > 0
    # The functional form, differentiated twice to its own logits.
    logits = features[:, 0].clone().requires_grad_()
    (grad,) = torch.autograd.grad(ranking_loss(logits, labels[:, 0], groups, kind), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.grad(grad.square().sum(), logits)


@pytest.mark.parametrize("batch", [1, 5])
def test_the_callers_gradient_and_another_branch_are_not_written_to(batch):
    # One task of one logit: the first output's gradient is as narrow as it gets ([1, 1] at B = 1).
    def run():
        gen = torch.Generator().manual_seed(batch)
        logits = torch.randn(batch, 1, generator=gen, dtype=torch.float64, requires_grad=True)
        other = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
        labels = (torch.arange(batch) % 2).double().unsqueeze(1)
        loss = MultiTaskLoss([Task("a", ranking="pairwise_logistic")]).double()
        out = loss(logits, labels, groups=torch.zeros(batch, dtype=torch.long))
        upstream = torch.tensor(3.0, dtype=torch.float64)
        grads = torch.autograd.grad(out["loss"] + other.sum(), (logits, other), grad_outputs=upstream)
        assert upstream.item() == 3.0
        assert torch.equal(grads[1], torch.full((3,), 3.0, dtype=torch.float64))
        return list(grads)

    _assert_bitwise(*_both(run))


@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (4, 3)])
@pytest.mark.parametrize("columns", ["span", "index"])
def test_a_broadcast_first_gradient_is_copied_even_over_size_1_dims(shape, columns):
    # Found by this file: at B = 1 a broadcast of a scalar to [1, 1] has zero strides yet passes for
    # contiguous; the in-place add then wrote into the scalar it aliased (the caller's grad_outputs,
    # and the gradient of every other branch fed from it: ``other`` got 2 instead of 1).
    span, index = ((0, 1), torch.tensor([0])) if columns == "span" else (None, torch.tensor([shape[1] - 1]))
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    other = torch.randn(3, dtype=torch.float64, requires_grad=True)
    every, cols = ColumnFork.apply(x, span, index)
    upstream = torch.tensor(1.0, dtype=torch.float64)
    gx, gother = torch.autograd.grad(every.sum() + cols.sum() + other.sum(), (x, other), grad_outputs=upstream)
    expected = torch.ones(shape, dtype=torch.float64)
    expected[:, index] += 1
    assert torch.equal(gx, expected)
    assert torch.equal(gother, torch.ones(3, dtype=torch.float64))
    assert upstream.item() == 1.0


def test_no_grad_and_inference_mode_give_the_same_values_without_a_graph():
    logits, labels, weights, mask, groups = _head_batch(batch=16, seed=5)
    loss = MultiTaskLoss(HEAD).double()
    reference = loss(logits, labels, weights, mask, groups=groups)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            out = loss(logits.clone().requires_grad_(), labels, weights, mask, groups=groups)
        assert all(out[key].grad_fn is None for key in out)
        assert all(torch.equal(out[key], reference[key]) for key in reference)


def test_torch_func_grad_reads_plain_columns():
    logits, labels, weights, mask, groups = _head_batch(batch=16, seed=6)
    loss = MultiTaskLoss(HEAD).double()

    def total(z):
        return loss(z, labels, weights, mask, groups=groups)["loss"]

    x = logits.clone().requires_grad_()
    (plain,) = torch.autograd.grad(total(x), x)
    with _reads(plain=False) as nodes:
        functional = torch.func.grad(total)(logits)
    assert len(nodes) == 1
    assert "ColumnForkBackward" not in nodes  # no ColumnFork under a torch.func transform
    torch.testing.assert_close(functional, plain, rtol=1e-12, atol=1e-14)


def test_torch_compile_gradient_equals_the_eager_one():
    _, labels, weights, mask, groups = _batch(RUN_HEAD, 16, torch.float64, seed=7)
    logits = torch.randn(16, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    loss = MultiTaskLoss(RUN_HEAD).double()

    def total(z):
        return loss(z, labels, weights, mask, groups=groups)["loss"]

    compiled = torch.compile(total, backend="eager")
    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    (eager,) = torch.autograd.grad(total(x), x)
    (graph,) = torch.autograd.grad(compiled(y), y)
    torch.testing.assert_close(graph, eager, rtol=1e-12, atol=1e-14)
    assert eager.abs().sum() > 0


def _fork_ddp_rank(rank, world_size):
    _, labels, weights, mask, groups = _head_batch(batch=24, seed=8)
    rows = slice(0, 10) if rank == 0 else slice(10, 24)
    features = torch.randn(24, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    results = []
    for plain in (False, True):
        torch.manual_seed(0)
        model = DistributedDataParallel(nn.Linear(5, 10).double())
        loss = MultiTaskLoss(HEAD, normalize="global").double()
        with _reads(plain) as nodes:
            for _ in range(2):  # two accumulated steps, each all-reducing its gradient
                out = loss(model(features[rows]), labels[rows], weights[rows], mask[rows], groups=groups[rows])
                out["loss"].backward()
        results.append(([p.grad.clone() for p in model.parameters()], out["loss"].item(), list(nodes)))
    return results


def test_ddp_on_two_ranks_fork_equals_plain_reads(ranks):
    per_rank = ranks(_fork_ddp_rank, 2, timeout=120)
    for forked, plain in per_rank:
        assert forked[2] == ["ColumnForkBackward"] * 2
        _assert_bitwise(forked[0], plain[0])
        assert forked[1] == plain[1]
    # DDP averaged the gradients: both ranks hold the same ones.
    _assert_bitwise(per_rank[0][0][0], per_rank[1][0][0])


# ---- the int32 sort of 0/1 labels -----------------------------------------------------------------


@contextlib.contextmanager
def _sort(general: bool):
    """The ranking sums through the general sort, or through ``_binary`` (recording whether it fired)."""
    fired: list[bool] = []
    binary = _ragged._binary

    def spy(labels, keep):
        negative = binary(labels, keep)
        fired.append(negative is not None)
        return negative

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_ragged, "_binary", (lambda labels, keep: None) if general else spy)
        yield fired


def _sums_and_grad(logits, labels, groups, weights, mask, kind):
    x = logits.detach().clone().requires_grad_()
    sums, counts = unchecked_ranking_sums(x, labels, groups, weights, mask, kind)
    (grad,) = torch.autograd.grad(sums.sum(), x) if sums.requires_grad else (torch.zeros_like(x),)
    return sums.detach(), counts, grad


def _paths(logits, labels, groups, weights=None, mask=None, kind="pairwise_logistic", binary=True):
    """Both paths' sums, counts, gradients: equal bit for bit; the fast one taken iff ``binary``.

    ``binary=None``: keys too wide for int32, so the labels are not even looked at.
    """
    with _sort(general=False) as fired:
        fast = _sums_and_grad(logits, labels, groups, weights, mask, kind)
    assert fired == ([] if binary is None else [binary])
    with _sort(general=True):
        general = _sums_and_grad(logits, labels, groups, weights, mask, kind)
    for a, b in zip(fast, general, strict=True):
        assert torch.equal(a, b)
    return fast


def _loop(logits, labels, groups, weights, mask, kind, column):
    x, y = logits[:, column].double(), labels[:, column].double()
    w = torch.ones_like(x) if weights is None else weights[:, column].double()
    m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask[:, column]
    return loop_sums(x, y, groups, w, m, kind)


def _agree_with_loop(result, logits, labels, groups, weights, mask, kind, rtol=1e-9):
    sums, counts, _ = result
    for column in range(logits.shape[1]):
        total, count = _loop(logits, labels, groups, weights, mask, kind, column)
        assert counts[column].item() == count
        torch.testing.assert_close(sums[column].double(), total, rtol=rtol, atol=1e-6 if rtol > 1e-6 else 1e-12)


def _column_batch(batch, columns, seed, groups=5):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randint(-3, 4, (batch, columns), generator=gen).double() / 2  # ties
    labels = (torch.rand(batch, columns, generator=gen) < 0.4).double()
    weights = torch.rand(batch, columns, generator=gen, dtype=torch.float64) + 0.5
    mask = torch.rand(batch, columns, generator=gen) < 0.8
    ids = torch.randint(0, groups, (batch,), generator=gen) * 11 - 30
    return logits, labels, ids, weights, mask


@pytest.mark.parametrize("kind", list(RANKINGS))
def test_signed_zeros_and_nan_inf_at_left_out_entries_keep_the_int32_sort(kind):
    logits, labels, groups, weights, mask = _column_batch(60, 3, seed=10)
    labels[labels == 0] = -0.0
    left_out = (~mask).nonzero()
    labels[left_out[0::3, 0], left_out[0::3, 1]] = float("nan")
    labels[left_out[1::3, 0], left_out[1::3, 1]] = float("inf")
    labels[left_out[2::3, 0], left_out[2::3, 1]] = 0.5
    weights[left_out[:, 0], left_out[:, 1]] = float("nan")
    result = _paths(logits, labels, groups, weights, mask, kind)
    assert bool((result[1] > 0).all())
    assert torch.isfinite(result[0]).all()
    assert torch.isfinite(result[2]).all()
    clean = torch.where(mask, labels, 0.0)
    _agree_with_loop(result, logits, clean, groups, weights, mask, kind)


@pytest.mark.parametrize("value", [1 - 1e-8, 1e-300, -1e-300, float("nan"), float("inf"), 2.0])
def test_a_kept_label_just_off_0_or_1_takes_the_general_path(value):
    logits, labels, groups, weights, mask = _column_batch(40, 2, seed=11)
    mask[7, 1] = True
    labels[7, 1] = value
    _paths(logits, labels, groups, weights, mask, "pairwise_logistic", binary=False)


def test_labels_are_ordered_in_float32_so_1_minus_1e_8_ties_with_1():
    # Documented (docs/ranking_losses.rst): labels closer than float32 tells apart are a tie. A
    # float64 loop over the raw labels would count a pair between 1 and 1 - 1e-8; over the float32
    # labels it agrees.
    logits, labels, groups, weights, mask = _column_batch(40, 1, seed=12)
    labels[labels == 1] = torch.tensor([1.0, 1 - 1e-8], dtype=torch.float64).repeat(40)[: int((labels == 1).sum())]
    result = _paths(logits, labels, groups, weights, mask, "pairwise_logistic", binary=False)
    _agree_with_loop(result, logits, labels.float(), groups, weights, mask, "pairwise_logistic")
    _, binary_counts, _ = _paths(logits, labels.float().double(), groups, weights, mask, "pairwise_logistic")
    assert torch.equal(result[1], binary_counts)


def test_the_smallest_float32_label_ranks_above_0():
    logits, labels, groups, _, mask = _column_batch(30, 1, seed=13)
    logits, labels = logits.float(), labels.float()
    labels[labels == 1] = 1e-45  # the smallest subnormal: not 0, so a pair with every 0 of its group
    assert labels.max().item() > 0
    result = _paths(logits, labels, groups, None, mask, "pairwise_hinge", binary=False)
    _agree_with_loop(result, logits, labels.double(), groups, None, mask, "pairwise_hinge", rtol=1e-6)


@pytest.mark.parametrize("kind", list(RANKINGS))
@pytest.mark.parametrize("label_dtype", [torch.bool, torch.int64, torch.int8, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("logit_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_label_and_logit_dtypes_of_the_public_api(kind, label_dtype, logit_dtype):
    logits, labels, groups, weights, mask = _column_batch(50, 2, seed=14)
    labels = labels.to(label_dtype)
    result = _paths(logits.to(logit_dtype), labels, groups, weights.to(logit_dtype), mask, kind)
    assert result[0].dtype == torch.float32
    assert result[2].dtype == logit_dtype
    _agree_with_loop(result, logits, labels.double(), groups, weights.to(logit_dtype).double(), mask, kind, 1e-5)


@pytest.mark.parametrize("kind", list(RANKINGS))
def test_binary_and_graded_columns_of_one_kind_take_the_general_path_together(kind):
    logits, labels, groups, weights, mask = _column_batch(60, 3, seed=15)
    labels[:, 1] = torch.randint(0, 4, (60,), generator=torch.Generator().manual_seed(1)).double()
    together = _paths(logits, labels, groups, weights, mask, kind, binary=False)
    for column in range(3):
        part = slice(column, column + 1)
        alone = _paths(logits[:, part], labels[:, part], groups, weights[:, part], mask[:, part], kind, column != 1)
        torch.testing.assert_close(together[0][part], alone[0], rtol=1e-12, atol=1e-14)
        assert torch.equal(together[1][part], alone[1])
        torch.testing.assert_close(together[2][:, part], alone[2], rtol=1e-12, atol=1e-14)
    _agree_with_loop(together, logits, labels, groups, weights, mask, kind)


@pytest.mark.parametrize("kind", list(RANKINGS))
def test_every_entry_left_out_and_batches_of_0_and_1(kind):
    logits, labels, groups, weights, mask = _column_batch(20, 2, seed=16)
    sums, counts, grad = _paths(logits, labels, groups, weights, torch.zeros_like(mask), kind)
    assert torch.equal(counts, torch.zeros(2, dtype=counts.dtype))
    assert not sums.any()
    assert not grad.any()
    for batch in (0, 1):
        sums, counts, grad = _paths(logits[:batch], labels[:batch], groups[:batch], None, None, kind)
        assert sums.shape == counts.shape == (2,)
        assert not counts.any()
        assert grad.shape == (batch, 2)


@pytest.mark.parametrize("kind", list(RANKINGS))
def test_one_huge_group(kind):
    logits, labels, _, weights, mask = _column_batch(3000, 1, seed=17)
    groups = torch.full((3000,), 123456789, dtype=torch.long)
    sums, counts, _ = _paths(logits, labels, groups, weights, mask, kind)
    keep = mask[:, 0]
    y = labels[keep, 0]
    expected = 1 if kind == "softmax" else int((y == 1).sum()) * int((y == 0).sum())
    assert counts.item() == expected
    total, count = matrix_sums(logits[:, 0], labels[:, 0], groups, weights[:, 0], keep, kind)
    assert count == expected
    # matrix_sums forms lambda_ndcg's ideal DCG with float32 log2 (an int arange + 2.0): 1e-9 apart here.
    torch.testing.assert_close(sums[0], total, rtol=1e-8 if kind == "lambda_ndcg" else 1e-11, atol=1e-9)


def _key_bound(ids, columns):
    return _ragged.flat_keys(ids, torch.ones(ids.numel(), columns, dtype=torch.bool))[1]


@pytest.mark.parametrize("columns", [2, 3])
@pytest.mark.parametrize("side", ["at", "above"])
def test_group_ids_at_and_just_above_the_int32_bound_with_several_columns(columns, side):
    batch = 48
    # The widest span whose keys stay at or below 2^30 = columns * (span + batch).
    span = 2**30 // columns - batch + (0 if side == "at" else 1)
    logits, labels, _, weights, mask = _column_batch(batch, columns, seed=18)
    dense = torch.randint(0, 4, (batch,), generator=torch.Generator().manual_seed(2))
    dense[0], dense[1] = 0, 3
    ids = torch.tensor([5, 5 + span // 3, 5 + 2 * (span // 3), 5 + span - 1])[dense]  # exactly this span
    assert (2 * _key_bound(ids, columns) <= 2**31) == (side == "at")
    for kind in RANKINGS:
        result = _paths(logits, labels, ids, weights, mask, kind, binary=True if side == "at" else None)
        # The same groups with ids 0..3: the same sums, counts, gradients (the ids only name groups).
        same = _paths(logits, labels, dense, weights, mask, kind)
        for a, b in zip(result, same, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        _agree_with_loop(result, logits, labels, ids, weights, mask, kind)


@pytest.mark.parametrize("kind", list(RANKINGS))
def test_hash_like_int64_ids(kind):
    logits, labels, small, weights, mask = _column_batch(80, 3, seed=19, groups=6)
    salt = torch.tensor([-(2**63), 2**63 - 1, -1, 0, 2**62 + 12345, -(2**40)], dtype=torch.long)
    ids = salt[(small + 30) // 11]
    result = _paths(logits, labels, ids, weights, mask, kind)
    _agree_with_loop(result, logits, labels, ids, weights, mask, kind)


def test_the_module_with_0_1_labels_takes_the_int32_sort_and_matches_the_general_path():
    logits, labels, weights, mask, groups = _head_batch(batch=30, seed=20)
    head = [dataclasses.replace(t, ranking=None, pointwise_weight=1.0, ranking_weight=1.0) for t in HEAD]
    head[0] = HEAD[0]  # lambda_ndcg on 0/1 labels: the int32 sort
    head[6] = HEAD[6]  # softmax on graded labels: the general sort
    loss = MultiTaskLoss(head).double()

    def run():
        x = logits.clone().requires_grad_()
        out = loss(x, labels, weights, mask, groups=groups)
        return [*torch.autograd.grad(out["loss"], x), *(out[key].detach() for key in sorted(out))]

    with _sort(general=False) as fired:
        fast = run()
    assert sorted(fired) == [False, True]
    with _sort(general=True):
        general = run()
    _assert_bitwise(fast, general)
