import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from losses import LossType, MultiTaskLoss, build_multi_task_loss
from tests.reference import multi_task_loop

TASKS = ("fav", "reply", "repost", "click", "share")
TASK_REDUCTIONS = ("mean", "sum")
GLOBAL_REDUCTIONS = ("mean", "sum", "min", "max", "median")


def _batch(batch=32, tasks=5, dtype=torch.float64, seed=0, classes=None):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, tasks) if classes is None else (batch, tasks, classes)
    logits = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2).to(dtype)
    if classes is None:
        labels = (torch.rand(batch, tasks, generator=gen) < torch.linspace(0.5, 0.05, tasks)).long()
    else:
        labels = torch.randint(0, classes, (batch, tasks), generator=gen)
    weights = torch.rand(batch, tasks, generator=gen, dtype=torch.float64).to(dtype)
    mask = torch.rand(batch, tasks, generator=gen) < 0.7
    return logits, labels, weights, mask


def _quiet(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return MultiTaskLoss(**kwargs)


def _assert_same(ours, ref, inputs, **tolerance):
    assert list(ours) == list(ref)
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], msg=key, **tolerance)
    grads = [torch.rand(()) for _ in ref]
    ours_grad = torch.autograd.grad([ours[k] for k in ref], inputs[0], [g.to(inputs[0].dtype) for g in grads])[0]
    ref_grad = torch.autograd.grad([ref[k] for k in ref], inputs[1], [g.to(inputs[1].dtype) for g in grads])[0]
    torch.testing.assert_close(ours_grad, ref_grad, **tolerance)


@pytest.mark.parametrize("task_loss_reduction", TASK_REDUCTIONS)
@pytest.mark.parametrize("global_reduction", GLOBAL_REDUCTIONS)
@pytest.mark.parametrize("use_pos_weights", [False, True])
@pytest.mark.parametrize("use_weights", [False, True])
def test_matches_the_ancestors_loop(task_loss_reduction, global_reduction, use_pos_weights, use_weights):
    logits, labels, weights, _ = _batch()
    weights = weights if use_weights else None
    pos_weights = [1.0, 2.0, 0.5, 10.0, 3.0] if use_pos_weights else None
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = _quiet(
        tasks=TASKS,
        pos_weights=pos_weights,
        task_loss_reduction=task_loss_reduction,
        global_reduction=global_reduction,
    ).double()
    ref = multi_task_loop(ref_in, labels, weights, TASKS, task_loss_reduction, global_reduction, pos_weights)
    _assert_same(loss(ours_in, labels, weights), ref, (ours_in, ref_in))


@pytest.mark.parametrize("task_loss_reduction", TASK_REDUCTIONS)
@pytest.mark.parametrize("global_reduction", GLOBAL_REDUCTIONS)
@pytest.mark.parametrize("weights_shape", [None, "BT", "B"])
def test_a_single_task_matches_the_loop(task_loss_reduction, global_reduction, weights_shape):
    logits, labels, weights, mask = _batch(tasks=1)
    weights = {None: None, "BT": weights, "B": weights[:, 0]}[weights_shape]
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = _quiet(
        tasks=["fav"],
        pos_weights=[3.0],
        task_weights=[0.5],
        task_loss_reduction=task_loss_reduction,
        global_reduction=global_reduction,
    ).double()
    ref = multi_task_loop(
        ref_in, labels, weights, ["fav"], task_loss_reduction, global_reduction, [3.0], task_weights=[0.5]
    )
    _assert_same(loss(ours_in, labels, weights), ref, (ours_in, ref_in))
    masked = multi_task_loop(
        ref_in, labels, weights, ["fav"], task_loss_reduction, global_reduction, [3.0], mask=mask, task_weights=[0.5]
    )
    _assert_same(loss(ours_in, labels, weights, mask), masked, (ours_in, ref_in))


@pytest.mark.parametrize("task_loss_reduction", TASK_REDUCTIONS)
@pytest.mark.parametrize("global_reduction", ["mean", "median"])
def test_mask_selects_labelled_entries(task_loss_reduction, global_reduction):
    logits, labels, weights, mask = _batch()
    pos_weights = [1.0, 2.0, 0.5, 10.0, 3.0]
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = _quiet(
        tasks=TASKS, pos_weights=pos_weights, task_loss_reduction=task_loss_reduction, global_reduction=global_reduction
    ).double()
    ref = multi_task_loop(ref_in, labels, weights, TASKS, task_loss_reduction, global_reduction, pos_weights, mask=mask)
    _assert_same(loss(ours_in, labels, weights, mask), ref, (ours_in, ref_in))


def test_unlabelled_entries_add_nothing_whatever_their_label():
    logits, labels, weights, mask = _batch()
    garbage = labels.double().masked_fill(~mask, float("nan"))
    other = labels.double().masked_fill(~mask, 7.0)
    loss = MultiTaskLoss(TASKS, pos_weights=[2.0] * 5).double()
    grads = []
    for held in (garbage, other):
        x = logits.clone().requires_grad_()
        out = loss(x, held, weights, mask)
        assert all(torch.isfinite(value) for value in out.values())
        out["loss"].backward()
        assert torch.equal(x.grad[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))
        grads.append((out["loss"].detach(), x.grad))
    torch.testing.assert_close(grads[0], grads[1])


def test_task_without_labels_gives_zero_and_no_gradient():
    logits, labels, weights, mask = _batch()
    mask[:, 2] = False
    x = logits.clone().requires_grad_()
    out = MultiTaskLoss(TASKS).double()(x, labels, weights, mask)
    assert out["loss/repost"].item() == 0.0
    out["loss"].backward()
    assert torch.equal(x.grad[:, 2], torch.zeros(32, dtype=torch.float64))
    assert torch.isfinite(x.grad).all()


def test_mean_divides_by_labelled_count_not_weight_sum():
    logits = torch.zeros(4, 1, dtype=torch.float64)
    labels = torch.zeros(4, 1)
    weights = torch.tensor([[2.0], [2.0], [5.0], [5.0]], dtype=torch.float64)
    mask = torch.tensor([[True], [True], [False], [False]])
    out = MultiTaskLoss(["fav"]).double()(logits, labels, weights, mask)
    torch.testing.assert_close(
        out["loss/fav"], torch.tensor(2.0 * torch.log(torch.tensor(2.0)).item(), dtype=torch.float64)
    )


def test_per_sample_weights_of_shape_b_apply_to_every_task():
    logits, labels, _, mask = _batch()
    row_weights = torch.rand(32, dtype=torch.float64)
    loss = MultiTaskLoss(TASKS).double()
    ours = loss(logits, labels, row_weights, mask)
    expanded = loss(logits, labels, row_weights[:, None].expand(32, 5), mask)
    for key in ours:
        torch.testing.assert_close(ours[key], expanded[key])


def test_task_weights_scale_before_the_global_reduction():
    logits, labels, weights, mask = _batch()
    task_weights = [1.0, 0.0, 2.0, 0.5, 3.0]
    ref = multi_task_loop(logits, labels, weights, TASKS, mask=mask, task_weights=task_weights, global_reduction="max")
    out = _quiet(tasks=TASKS, task_weights=task_weights, global_reduction="max").double()(logits, labels, weights, mask)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key])


@pytest.mark.parametrize("task_loss_reduction", TASK_REDUCTIONS)
def test_cross_entropy_tasks(task_loss_reduction):
    logits, labels, weights, mask = _batch(classes=4)
    labels = labels.masked_fill(~mask, -1)
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = _quiet(tasks=TASKS, loss_type="cross_entropy", task_loss_reduction=task_loss_reduction).double()
    ref = multi_task_loop(ref_in, labels, weights, TASKS, task_loss_reduction, mask=mask, cross_entropy=True)
    _assert_same(loss(ours_in, labels, weights, mask), ref, (ours_in, ref_in))


def test_result_keys_follow_task_order():
    loss = MultiTaskLoss(["z", "a", "m"])
    out = loss(torch.zeros(2, 3), torch.zeros(2, 3))
    assert list(out) == ["loss/z", "loss/a", "loss/m", "loss"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("tasks", "use_mask"), [(TASKS, True), (TASKS[:1], False)])
def test_lower_precision_inputs(dtype, tasks, use_mask):
    logits, labels, weights, mask = _batch(tasks=len(tasks), dtype=dtype)
    mask = mask if use_mask else None
    pos_weights = [1.0, 2.0, 0.5, 10.0, 3.0][: len(tasks)]
    x = logits.clone().requires_grad_()
    out = MultiTaskLoss(tasks, pos_weights=pos_weights)(x, labels, weights, mask)
    ref = multi_task_loop(logits.float(), labels, weights.float(), tasks, pos_weights=pos_weights, mask=mask)
    for key in ref:
        assert out[key].dtype == torch.float32
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-6)
    out["loss"].backward()
    assert x.grad.dtype == dtype


def test_gradcheck_float64():
    logits, labels, weights, mask = _batch(batch=6)
    loss = MultiTaskLoss(TASKS, pos_weights=[1.0, 2.0, 0.5, 10.0, 3.0], task_weights=[1, 2, 3, 4, 5]).double()
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: loss(t, labels.double(), weights, mask)["loss"], (x,))


def test_double_backward_float64():
    logits, labels, weights, mask = _batch(batch=6)
    loss = MultiTaskLoss(TASKS, pos_weights=[1.0, 2.0, 0.5, 10.0, 3.0]).double()
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: loss(t, labels.double(), weights, mask)["loss"], (x,))
    assert torch.autograd.gradgradcheck(lambda t: loss(t, labels.double(), weights)["loss/reply"], (x,))


def test_normalize_global_without_process_group_is_local():
    logits, labels, weights, mask = _batch()
    local = MultiTaskLoss(TASKS).double()(logits, labels, weights, mask)
    global_ = MultiTaskLoss(TASKS, normalize="global").double()(logits, labels, weights, mask)
    for key in local:
        torch.testing.assert_close(global_[key], local[key], rtol=0, atol=0)


class TestBuffers:
    def test_always_registered_with_ones_by_default(self):
        loss = MultiTaskLoss(TASKS)
        assert set(loss.state_dict()) == {"pos_weight", "task_weight"}
        assert torch.equal(loss.pos_weight, torch.ones(5))
        assert torch.equal(loss.task_weight, torch.ones(5))

    def test_move_with_the_model_and_save_in_its_state_dict(self):
        model = nn.Sequential(nn.Linear(3, 5))
        model.loss = MultiTaskLoss(TASKS, pos_weights=[1, 2, 3, 4, 5])
        model.double()
        assert model.loss.pos_weight.dtype == torch.float64
        state = model.state_dict()
        assert torch.equal(state["loss.pos_weight"], torch.tensor([1.0, 2, 3, 4, 5], dtype=torch.float64))
        assert "loss.task_weight" in state

    def test_state_dict_round_trip_deepcopy_and_pickle(self):
        logits, labels, weights, mask = _batch()
        loss = MultiTaskLoss(TASKS, pos_weights=[1, 2, 3, 4, 5], task_weights=[5, 4, 3, 2, 1]).double()
        expected = loss(logits, labels, weights, mask)
        buffer = io.BytesIO()
        torch.save(loss.state_dict(), buffer)
        buffer.seek(0)
        restored = MultiTaskLoss(TASKS).double()
        restored.load_state_dict(torch.load(buffer))
        for clone in (copy.deepcopy(loss), pickle.loads(pickle.dumps(loss)), restored):
            out = clone(logits, labels, weights, mask)
            for key in expected:
                torch.testing.assert_close(out[key], expected[key])


def test_a_model_holding_the_loss_trains():
    torch.manual_seed(0)
    features = torch.randn(256, 8)
    true_weights = torch.randn(8, 3)
    labels = (torch.rand(256, 3) < torch.sigmoid(features @ true_weights)).float()
    mask = torch.rand(256, 3) < 0.8

    class Ranker(nn.Module):
        def __init__(self):
            super().__init__()
            self.tower = nn.Linear(8, 3)
            self.loss = MultiTaskLoss(["fav", "reply", "click"], pos_weights=[1.0, 2.0, 4.0])

        def forward(self, x, y, m):
            return self.loss(self.tower(x), y, mask=m)

    model = Ranker()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    first = model(features, labels, mask)["loss"].item()
    for _ in range(30):
        optimizer.zero_grad()
        out = model(features, labels, mask)
        out["loss"].backward()
        optimizer.step()
    last = model(features, labels, mask)["loss"].item()
    assert last < 0.8 * first
    assert torch.equal(model.loss.pos_weight, torch.tensor([1.0, 2.0, 4.0]))


@pytest.mark.parametrize(
    ("tasks", "loss_type", "use_mask"),
    [(TASKS, "bce_with_logits", True), (TASKS[:1], "bce_with_logits", False), (TASKS, "cross_entropy", True)],
)
def test_torch_compile_fullgraph_matches_eager(tasks, loss_type, use_mask):
    classes = 3 if loss_type == "cross_entropy" else None
    logits, labels, weights, mask = _batch(tasks=len(tasks), dtype=torch.float32, classes=classes)
    mask = mask if use_mask else None
    kwargs = {"pos_weights": [1.0, 2.0, 0.5, 10.0, 3.0][: len(tasks)]} if classes is None else {}
    loss = MultiTaskLoss(tasks, loss_type=loss_type, task_weights=[1, 1, 2, 1, 1][: len(tasks)], **kwargs)
    compiled = torch.compile(loss, fullgraph=True)
    eager_in, compiled_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    eager = loss(eager_in, labels, weights, mask)
    out = compiled(compiled_in, labels, weights, mask)
    for key in eager:
        torch.testing.assert_close(out[key], eager[key])
    eager["loss"].backward()
    out["loss"].backward()
    torch.testing.assert_close(compiled_in.grad, eager_in.grad)


class TestWarnings:
    @pytest.mark.parametrize(
        ("kwargs", "name"),
        [
            ({"task_loss_reduction": "sum"}, "task_loss_reduction='sum'"),
            ({"global_reduction": "median"}, "global_reduction='median'"),
        ],
    )
    def test_non_mean_reduction_warns_at_construction(self, kwargs, name):
        with pytest.warns(UserWarning, match=rf"`{name}`: only 'mean' gives DDP gradients equal"):
            loss = MultiTaskLoss(TASKS, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss(torch.zeros(2, 5), torch.zeros(2, 5))

    def test_mean_is_silent(self):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            MultiTaskLoss(TASKS)


class TestErrors:
    def test_tasks(self):
        with pytest.raises(ValueError, match="`tasks` to name at least one task, got an empty sequence"):
            MultiTaskLoss([])
        with pytest.raises(
            ValueError, match=r"unique task names, got duplicates \['fav'\] in \['fav', 'reply', 'fav'\]"
        ):
            MultiTaskLoss(["fav", "reply", "fav"])
        with pytest.raises(TypeError, match="`tasks` to be a sequence of task names, got str"):
            MultiTaskLoss("fav")
        with pytest.raises(ValueError, match=r"every task name to be a non-empty str, got \[''\]"):
            MultiTaskLoss(["fav", ""])

    @pytest.mark.parametrize("name", ["pos_weights", "task_weights"])
    def test_per_task_weights(self, name):
        with pytest.raises(ValueError, match=rf"`{name}` to have one value per task \(5\), got 3"):
            MultiTaskLoss(TASKS, **{name: [1.0, 2.0, 3.0]})
        with pytest.raises(ValueError, match=rf"`{name}` to be non-negative and finite, got \[1.0, -1.0"):
            MultiTaskLoss(TASKS, **{name: [1.0, -1.0, 1.0, 1.0, 1.0]})
        with pytest.raises(ValueError, match=rf"`{name}` to be non-negative and finite, got \[nan"):
            MultiTaskLoss(TASKS, **{name: [float("nan")] * 5})

    def test_unknown_reductions_and_loss_type(self):
        with pytest.raises(
            ValueError, match=r"`task_loss_reduction` to be one of \('mean', 'sum', 'none'\), got 'max'"
        ):
            MultiTaskLoss(TASKS, task_loss_reduction="max")  # type: ignore[arg-type]
        with pytest.raises(
            ValueError, match=r"`global_reduction` to be one of \('mean', 'sum', 'min', 'max', 'median'\), got 'avg'"
        ):
            MultiTaskLoss(TASKS, global_reduction="avg")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"`normalize` to be one of \('local', 'global'\), got 'world'"):
            MultiTaskLoss(TASKS, normalize="world")  # type: ignore[arg-type]
        with pytest.raises(
            ValueError, match=r"`loss_type` to be one of \('cross_entropy', 'bce_with_logits'\), got 'hinge'"
        ):
            MultiTaskLoss(TASKS, loss_type="hinge")

    def test_pos_weights_with_cross_entropy(self):
        with pytest.raises(ValueError, match="`pos_weights` apply to BCE tasks only"):
            MultiTaskLoss(TASKS, loss_type=LossType.CROSS_ENTROPY, pos_weights=[1.0] * 5)

    def test_logits_task_dimension(self):
        with pytest.raises(ValueError, match=r"`logits` to have 5 tasks in dimension 1 .*got 4 \(shape \(8, 4\)\)"):
            MultiTaskLoss(TASKS)(torch.zeros(8, 4), torch.zeros(8, 4))
        with pytest.raises(ValueError, match=r"`logits` of shape \[B, T\], got \(8,\)"):
            MultiTaskLoss(TASKS)(torch.zeros(8), torch.zeros(8))
        with pytest.raises(ValueError, match=r"`logits` of shape \[B, T, C\], got \(8, 5\)"):
            MultiTaskLoss(TASKS, loss_type="cross_entropy")(torch.zeros(8, 5), torch.zeros(8, 5, dtype=torch.long))

    def test_labels_weights_mask_shapes(self):
        loss = MultiTaskLoss(TASKS)
        x = torch.zeros(8, 5)
        with pytest.raises(ValueError, match=r"`labels` to have the shape of `logits` \(8, 5\), got \(8, 4\)"):
            loss(x, torch.zeros(8, 4))
        with pytest.raises(ValueError, match=r"`weights` of shape \[B, T\] \(8, 5\) or \[B\] \(8,\), got \(5,\)"):
            loss(x, x, torch.ones(5))
        with pytest.raises(ValueError, match=r"`mask` to have the shape of `logits` \(8, 5\), got \(8, 1\)"):
            loss(x, x, mask=torch.ones(8, 1, dtype=torch.bool))
        with pytest.raises(TypeError, match="`mask` to be a bool tensor, got dtype torch.float32"):
            loss(x, x, mask=torch.ones(8, 5))

    def test_labels_or_weights_that_require_grad(self):
        loss = MultiTaskLoss(TASKS)
        x = torch.zeros(8, 5)
        with pytest.raises(ValueError, match=r"`labels` not to require grad: .* Pass `labels.detach\(\)`"):
            loss(x, torch.zeros(8, 5, requires_grad=True))
        with pytest.raises(ValueError, match="`weights` not to require grad"):
            loss(x, x, torch.ones(8, requires_grad=True))

    def test_cross_entropy_labels(self):
        loss = MultiTaskLoss(TASKS, loss_type="cross_entropy")
        with pytest.raises(
            TypeError, match="cross-entropy `labels` to be integer class indices, got dtype torch.float32"
        ):
            loss(torch.zeros(8, 5, 3), torch.zeros(8, 5))
        with pytest.raises(
            ValueError,
            match=r"`labels` of shape \[B, T\] \(8, 5\) \(the logits \(8, 5, 3\) without .*\), got \(8, 5, 3\)",
        ):
            loss(torch.zeros(8, 5, 3), torch.zeros(8, 5, 3, dtype=torch.long))


@pytest.mark.parametrize("num_tasks", [1, 2, 5])
def test_infinite_logits_give_torchs_value_on_every_path(num_tasks):
    # +inf with label 0 is an infinite loss (not NaN) with gradient 1, as in torch.
    logits = torch.zeros(3, num_tasks)
    logits[0] = float("inf")
    labels = torch.zeros(3, num_tasks)
    labels[1] = 1.0
    x = logits.clone().requires_grad_()
    out = MultiTaskLoss([f"t{i}" for i in range(num_tasks)])(x, labels)
    ref_in = logits.clone().requires_grad_()
    ref = F.binary_cross_entropy_with_logits(ref_in, labels, reduction="none").mean(0)
    for t in range(num_tasks):
        assert out[f"loss/t{t}"].item() == float("inf")
        torch.testing.assert_close(out[f"loss/t{t}"], ref[t])
    out["loss"].backward()
    ref.mean().backward()
    torch.testing.assert_close(x.grad, ref_in.grad)


class TestEmptyBatch:
    """B = 0 gives 0 (no NaN, a zero gradient) on every path and for every reduction."""

    @pytest.mark.parametrize("task_loss_reduction", TASK_REDUCTIONS)
    @pytest.mark.parametrize("global_reduction", GLOBAL_REDUCTIONS)
    @pytest.mark.parametrize(("num_tasks", "use_mask"), [(1, False), (1, True), (3, False), (3, True)])
    def test_bce(self, task_loss_reduction, global_reduction, num_tasks, use_mask):
        loss = _quiet(
            tasks=TASKS[:num_tasks], task_loss_reduction=task_loss_reduction, global_reduction=global_reduction
        )
        x = torch.zeros(0, num_tasks, requires_grad=True)
        mask = torch.zeros(0, num_tasks, dtype=torch.bool) if use_mask else None
        out = loss(x, torch.zeros(0, num_tasks), torch.ones(0, num_tasks), mask)
        for key, value in out.items():
            assert value.shape == (), key
            assert value.item() == 0.0, key
        out["loss"].backward()
        assert x.grad.shape == (0, num_tasks)

    @pytest.mark.parametrize("global_reduction", GLOBAL_REDUCTIONS)
    @pytest.mark.parametrize("loss_type", ["bce_with_logits", "cross_entropy"])
    def test_reduction_none_gives_empty_task_losses_and_a_zero_loss(self, global_reduction, loss_type):
        loss = _quiet(
            tasks=TASKS[:2], loss_type=loss_type, task_loss_reduction="none", global_reduction=global_reduction
        )
        shape = (0, 2) if loss_type == "bce_with_logits" else (0, 2, 3)
        x = torch.zeros(shape, requires_grad=True)
        out = loss(x, torch.zeros(0, 2, dtype=torch.long))
        assert out["loss/fav"].shape == out["loss/reply"].shape == (0,)
        assert out["loss"].item() == 0.0
        out["loss"].backward()
        assert x.grad.shape == shape

    @pytest.mark.parametrize("task_loss_reduction", TASK_REDUCTIONS)
    @pytest.mark.parametrize("global_reduction", GLOBAL_REDUCTIONS)
    def test_cross_entropy(self, task_loss_reduction, global_reduction):
        loss = _quiet(
            tasks=TASKS[:2],
            loss_type="cross_entropy",
            task_loss_reduction=task_loss_reduction,
            global_reduction=global_reduction,
        )
        x = torch.zeros(0, 2, 4, requires_grad=True)
        out = loss(x, torch.zeros(0, 2, dtype=torch.long))
        assert [value.item() for value in out.values()] == [0.0, 0.0, 0.0]
        out["loss"].backward()
        assert x.grad.shape == (0, 2, 4)


@pytest.mark.parametrize("name", ["pos_weights", "task_weights"])
def test_per_task_weights_as_numpy_arrays(name):
    np = pytest.importorskip("numpy")
    loss = MultiTaskLoss(TASKS, **{name: np.arange(1, 6)})
    buffer = loss.pos_weight if name == "pos_weights" else loss.task_weight
    assert buffer.dtype == torch.float32
    assert buffer.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match=rf"`{name}` to have one value per task \(5\), got 2"):
        MultiTaskLoss(TASKS, **{name: np.ones(2)})
    with pytest.raises(ValueError, match=rf"`{name}` to be non-negative and finite, got \[1.0, 1.0, 1.0, 1.0, inf\]"):
        MultiTaskLoss(TASKS, **{name: np.array([1, 1, 1, 1, np.inf])})


def _ancestor_none(logits, labels, weights, pos_weights, global_reduction, task_weights=None):
    """The ancestor's closure with task_loss_reduction="none": one [B] tensor per task, reduced stacked."""
    per_task = [
        F.binary_cross_entropy_with_logits(
            logits[:, t],
            labels[:, t].type_as(logits),
            weight=weights[:, t],
            pos_weight=pos_weights[t],
            reduction="none",
        )
        for t in range(logits.shape[1])
    ]
    stacked = torch.stack(per_task)
    if task_weights is not None:
        stacked = stacked * task_weights.unsqueeze(1)
    reduce = {"mean": torch.mean, "sum": torch.sum, "min": torch.min, "max": torch.max, "median": torch.median}
    return per_task, reduce[global_reduction](stacked)


class TestTaskReductionNone:
    """``task_loss_reduction="none"``: a [B] tensor of element losses per task, as the ancestor gave."""

    @pytest.mark.parametrize("global_reduction", GLOBAL_REDUCTIONS)
    @pytest.mark.parametrize("num_tasks", [1, 5])
    def test_matches_the_ancestor_values_and_gradients(self, global_reduction, num_tasks):
        logits, labels, weights, _ = _batch(tasks=num_tasks)
        pos_weights = torch.tensor([1.0, 2.0, 0.5, 10.0, 3.0][:num_tasks], dtype=torch.float64)
        loss = _quiet(
            tasks=TASKS[:num_tasks],
            pos_weights=pos_weights,
            task_loss_reduction="none",
            global_reduction=global_reduction,
        ).double()
        x, ref_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        out = loss(x, labels, weights)
        per_task, total = _ancestor_none(ref_x, labels, weights, pos_weights, global_reduction)
        assert list(out) == [*(f"loss/{t}" for t in TASKS[:num_tasks]), "loss"]
        for t, ref in enumerate(per_task):
            assert out[f"loss/{TASKS[t]}"].shape == (32,)
            torch.testing.assert_close(out[f"loss/{TASKS[t]}"], ref)
        torch.testing.assert_close(out["loss"], total)
        upstream = [torch.rand(32, dtype=torch.float64) for _ in per_task] + [torch.rand((), dtype=torch.float64)]
        (grad,) = torch.autograd.grad([*(out[k] for k in out)], x, upstream)
        (ref_grad,) = torch.autograd.grad([*per_task, total], ref_x, upstream)
        torch.testing.assert_close(grad, ref_grad)

    def test_the_builder_accepts_it(self):
        logits, labels, weights, _ = _batch(tasks=3)
        with pytest.warns(UserWarning, match="`task_loss_reduction='none'`"):
            loss = build_multi_task_loss(LossType.BCE_WITH_LOGITS, TASKS[:3], task_loss_reduction="none")
        out = loss.double()(logits, labels, weights)
        per_task, total = _ancestor_none(logits, labels, weights, torch.ones(3, dtype=torch.float64), "mean")
        torch.testing.assert_close(out["loss"], total)
        torch.testing.assert_close(out["loss/reply"], per_task[1])

    @pytest.mark.parametrize("global_reduction", ["mean", "max"])
    def test_mask_zeroes_entries_whatever_they_hold_and_task_weights_scale_the_loss(self, global_reduction):
        logits, labels, weights, mask = _batch()
        task_weights = torch.tensor([1.0, 0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
        loss = _quiet(
            tasks=TASKS, task_weights=task_weights, task_loss_reduction="none", global_reduction=global_reduction
        ).double()
        nan = float("nan")
        x = logits.masked_fill(~mask, nan).requires_grad_()
        out = loss(x, labels.double().masked_fill(~mask, nan), weights.masked_fill(~mask, nan), mask)
        clean = torch.where(mask, weights, 0.0)
        per_task, total = _ancestor_none(
            logits, labels, clean, torch.ones(5, dtype=torch.float64), global_reduction, task_weights
        )
        for t, ref in enumerate(per_task):
            torch.testing.assert_close(out[f"loss/{TASKS[t]}"], ref)
            assert torch.equal(
                out[f"loss/{TASKS[t]}"][~mask[:, t]], torch.zeros(int((~mask[:, t]).sum()), dtype=torch.float64)
            )
        torch.testing.assert_close(out["loss"], total)
        out["loss"].backward()
        assert torch.isfinite(x.grad).all()
        assert torch.equal(x.grad[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))

    def test_cross_entropy(self):
        logits, labels, weights, mask = _batch(classes=4)
        loss = _quiet(
            tasks=TASKS, loss_type="cross_entropy", task_loss_reduction="none", global_reduction="sum"
        ).double()
        out = loss(logits, labels, weights, mask)
        for t, task in enumerate(TASKS):
            ref = F.cross_entropy(logits[:, t], labels[:, t], reduction="none") * weights[:, t] * mask[:, t]
            torch.testing.assert_close(out[f"loss/{task}"], ref)
        torch.testing.assert_close(out["loss"], sum(out[f"loss/{task}"].sum() for task in TASKS))

    def test_half_precision_comes_back_in_float32(self):
        logits, labels, _, _ = _batch(tasks=2, dtype=torch.float16)
        out = _quiet(tasks=TASKS[:2], task_loss_reduction="none")(logits, labels)
        assert out["loss/fav"].dtype == out["loss"].dtype == torch.float32
        torch.testing.assert_close(
            out["loss/fav"],
            F.binary_cross_entropy_with_logits(logits[:, 0].float(), labels[:, 0].float(), reduction="none"),
        )


class TestCrossEntropyLabels:
    def test_label_minus_100_is_excluded_from_the_loss_and_the_count_as_in_torch(self):
        logits = _batch(batch=4, tasks=2, classes=5)[0].requires_grad_()
        labels = torch.tensor([[0, 1], [2, -100], [3, -100], [4, -100]])
        out = MultiTaskLoss(["a", "b"], loss_type="cross_entropy").double()(logits, labels)
        refs = [F.cross_entropy(logits[:, t], labels[:, t]) for t in range(2)]
        masked = MultiTaskLoss(["a", "b"], loss_type="cross_entropy").double()(logits, labels, mask=labels != -100)
        for t, key in enumerate(["loss/a", "loss/b"]):
            torch.testing.assert_close(out[key], refs[t])
            torch.testing.assert_close(out[key], masked[key])
        (grad,) = torch.autograd.grad(out["loss"], logits)
        (ref_grad,) = torch.autograd.grad((refs[0] + refs[1]) / 2, logits)
        torch.testing.assert_close(grad, ref_grad)

    def test_a_task_whose_labels_are_all_ignored_gives_zero(self):
        logits = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
        out = MultiTaskLoss(["a", "b"], loss_type="cross_entropy").double()(logits, torch.tensor([[1, -100]] * 3))
        assert out["loss/b"].item() == 0.0
        out["loss"].backward()
        assert torch.equal(logits.grad[:, 1], torch.zeros(3, 4, dtype=torch.float64))

    @pytest.mark.parametrize("task_loss_reduction", TASK_REDUCTIONS)
    def test_unlabelled_entries_add_nothing_whatever_they_hold(self, task_loss_reduction):
        logits, labels, weights, mask = _batch(classes=4)
        loss = _quiet(tasks=TASKS, loss_type="cross_entropy", task_loss_reduction=task_loss_reduction).double()
        expected = loss(logits, labels, weights, mask)
        x = logits.clone()
        x[~mask] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0], dtype=torch.float64)
        x.requires_grad_()
        garbage_weights = weights.masked_fill(~mask, float("nan"))
        out = loss(x, labels.masked_fill(~mask, 99), garbage_weights, mask)
        for key in expected:
            torch.testing.assert_close(out[key], expected[key])
        out["loss"].backward()
        assert torch.isfinite(x.grad).all()
        assert torch.equal(x.grad[~mask], torch.zeros(int((~mask).sum()), 4, dtype=torch.float64))

    @pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
    def test_every_integer_label_dtype(self, dtype):
        logits, labels, weights, mask = _batch(classes=4)
        loss = MultiTaskLoss(TASKS, loss_type="cross_entropy").double()
        expected = loss(logits, labels, weights, mask)
        out = loss(logits, labels.to(dtype), weights, mask)
        for key in expected:
            torch.testing.assert_close(out[key], expected[key], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("tasks", "loss_type", "use_mask"),
    [
        (TASKS, "bce_with_logits", False),
        (TASKS, "bce_with_logits", True),
        (TASKS[:1], "bce_with_logits", False),
        (TASKS[:3], "cross_entropy", True),
    ],
)
def test_torch_compile_dynamic_builds_at_most_two_graphs_for_batch_sizes_64_to_9000(tasks, loss_type, use_mask):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    loss = MultiTaskLoss(tasks, loss_type=loss_type)
    compiled = torch.compile(loss, backend=counter, dynamic=True)
    gen = torch.Generator().manual_seed(0)
    for batch in (64, 100, 255, 256, 1000, 4096, 8191, 8192, 8200, 9000):
        shape = (batch, len(tasks)) if loss_type == "bce_with_logits" else (batch, len(tasks), 3)
        x = torch.randn(shape, generator=gen).requires_grad_()
        labels = torch.randint(0, 2, (batch, len(tasks)), generator=gen)
        mask = torch.rand(batch, len(tasks), generator=gen) < 0.7 if use_mask else None
        out = compiled(x, labels, None, mask)
        torch.testing.assert_close(out["loss"], loss(x, labels, None, mask)["loss"])
        out["loss"].backward()
    assert counter.frame_count <= 2
    torch._dynamo.reset()


def test_complex_cross_entropy_labels_are_a_named_error():
    loss = MultiTaskLoss(TASKS[:2], loss_type="cross_entropy")
    with pytest.raises(TypeError, match="`labels` to hold real numbers, got dtype torch.complex64"):
        loss(torch.zeros(4, 2, 3), torch.zeros(4, 2, dtype=torch.complex64))


class TestWideAndTiledMaskedBlocks:
    """Issue 19: narrow blocks run as [B / R, R T] tiles and the mask zeroes through the bits."""

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    @pytest.mark.parametrize(
        ("batch", "tasks"),
        [(16384, 4), (16384, 16), (65536, 1), (16388, 16), (2048, 3)],  # tiled x3, untiled (16388 % 16), too small
    )
    @pytest.mark.parametrize("focal", [False, True])
    def test_matches_torch_with_nan_at_unlabelled_entries(self, batch, tasks, dtype, focal):
        from losses import Task

        gen = torch.Generator().manual_seed(batch + tasks)
        logits = (torch.randn(batch, tasks, generator=gen, dtype=torch.float64) * 3).to(dtype)
        labels = (torch.rand(batch, tasks, generator=gen) < 0.3).to(dtype)
        weights = (torch.rand(batch, tasks, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
        mask = torch.rand(batch, tasks, generator=gen) < 0.8
        pos_weight = torch.linspace(0.5, 3.0, tasks, dtype=torch.float64)
        gamma = (
            torch.linspace(0.0, 2.0, tasks, dtype=torch.float64) if focal else torch.zeros(tasks, dtype=torch.float64)
        )
        specs = [Task(f"t{t}", pos_weight=float(pos_weight[t]), focal_gamma=float(gamma[t])) for t in range(tasks)]
        loss = MultiTaskLoss(specs).to(dtype)
        nan_labels = torch.where(mask, labels, float("nan"))
        nan_logits = torch.where(mask, logits, float("nan")).requires_grad_()
        out = loss(nan_logits, nan_labels, weights, mask)
        out["loss"].backward()
        # The reference: float64, labelled entries only, torch's BCE or the focal formula.
        x = logits.double().requires_grad_()
        y, w, m = labels.double(), weights.double(), mask.double()
        p = torch.sigmoid(x)
        if focal:
            elements = -(pos_weight * y * (1 - p) ** gamma * torch.log(p) + (1 - y) * p**gamma * torch.log(1 - p))
        else:
            elements = F.binary_cross_entropy_with_logits(x, y, pos_weight=pos_weight, reduction="none")
        task_losses = (torch.where(mask, elements * w, 0.0)).sum(0) / m.sum(0)
        task_losses.mean().backward()
        tolerance = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 1e-6}
        torch.testing.assert_close(out["loss"].double(), task_losses.mean().detach(), **tolerance)
        for t in range(tasks):
            torch.testing.assert_close(out[f"loss/t{t}"].double(), task_losses[t].detach(), **tolerance)
        assert torch.equal(nan_logits.grad[~mask], torch.zeros_like(nan_logits.grad[~mask]))
        torch.testing.assert_close(nan_logits.grad.double(), x.grad, **tolerance)

    def test_which_blocks_are_tiled(self):
        from losses._fused_bce import _rows_per_tile

        def rows(batch, tasks, weights=None):
            block = torch.zeros(batch, tasks)
            return _rows_per_tile(block, block, weights, None)

        assert [rows(16384, 16), rows(8192, 4), rows(65536, 1), rows(65536, 3)] == [16, 64, 256, 128]
        assert [rows(512, 64), rows(512, 8), rows(4096, 16)] == [1, 1, 1]  # too few entries to pay off
        assert rows(16388, 16) == 1  # 16 rows do not divide 16388
        assert [rows(4096, 32), rows(65536, 64)] == [1, 1]  # wide enough
        assert rows(16384, 16, torch.zeros(16384, 1)) == 1  # [B] weights broadcast per row
        assert rows(16384, 16, torch.zeros(16, 16384).t()) == 1  # not contiguous
