import warnings

import pytest
import torch
import torch.nn.functional as F

from losses import (
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    LossType,
    MultiTaskLoss,
    build_loss,
    build_multi_task_loss,
    get_global_loss_detached,
)
from tests.reference import multi_task_loop

TASKS = ["fav", "reply", "click"]


class TestBuildLoss:
    def test_bce_is_the_ancestors_closure(self):
        loss = build_loss(LossType.BCE_WITH_LOGITS)
        assert isinstance(loss, BCEWithLogitsLoss)
        logits, labels = torch.randn(6, 3), torch.randint(0, 2, (6, 3))
        torch.testing.assert_close(
            loss(logits, labels), F.binary_cross_entropy_with_logits(logits, labels.type_as(logits))
        )

    def test_cross_entropy_works_with_class_indices(self):
        with pytest.warns(UserWarning, match="`reduction='sum'`"):
            loss = build_loss("cross_entropy", reduction="sum")
        assert isinstance(loss, CrossEntropyLoss)
        logits, labels = torch.randn(6, 4), torch.randint(0, 4, (6,))
        torch.testing.assert_close(loss(logits, labels), F.cross_entropy(logits, labels, reduction="sum"))

    def test_non_mean_reduction_warns(self):
        with pytest.warns(UserWarning, match="`reduction='none'`: only 'mean' gives DDP gradients"):
            build_loss(LossType.BCE_WITH_LOGITS, reduction="none")

    def test_unknown_loss_type_and_reduction(self):
        with pytest.raises(ValueError, match=r"`loss_type` to be one of \('cross_entropy', 'bce_with_logits'\)"):
            build_loss("focal")
        with pytest.raises(ValueError, match=r"`reduction` to be one of \('mean', 'sum', 'none'\), got 'avg'"):
            build_loss(LossType.BCE_WITH_LOGITS, reduction="avg")  # type: ignore[arg-type]


class TestBuildMultiTaskLoss:
    @pytest.mark.parametrize("task_loss_reduction", ["mean", "sum"])
    @pytest.mark.parametrize("global_reduction", ["mean", "sum", "min", "max", "median"])
    def test_same_keys_and_values_as_the_ancestor(self, task_loss_reduction, global_reduction):
        gen = torch.Generator().manual_seed(1)
        logits = torch.randn(16, 3, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, 2, (16, 3), generator=gen).float()
        weights = torch.rand(16, 3, generator=gen, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            loss = build_multi_task_loss(
                LossType.BCE_WITH_LOGITS, TASKS, task_loss_reduction, global_reduction, pos_weights=[1.0, 3.0, 0.5]
            )
        assert isinstance(loss, MultiTaskLoss)
        ours = loss.double()(logits, labels, weights)
        ref = multi_task_loop(logits, labels, weights, TASKS, task_loss_reduction, global_reduction, [1.0, 3.0, 0.5])
        assert list(ours) == list(ref) == ["loss/fav", "loss/reply", "loss/click", "loss"]
        for key in ref:
            torch.testing.assert_close(ours[key], ref[key])

    def test_pos_weights_live_on_the_module_not_rebuilt_per_call(self):
        loss = build_multi_task_loss(LossType.BCE_WITH_LOGITS, TASKS, pos_weights=[1.0, 2.0, 3.0])
        buffer = loss.pos_weight
        loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3))
        assert loss.pos_weight is buffer

    def test_warns_for_each_non_mean_reduction(self):
        with pytest.warns(UserWarning, match="only .mean. gives DDP gradients") as record:
            build_multi_task_loss(LossType.BCE_WITH_LOGITS, TASKS, "sum", "max")
        assert [str(w.message).split(":")[0] for w in record] == [
            "`task_loss_reduction='sum'`",
            "`global_reduction='max'`",
        ]


class TestGetGlobalLossDetachedSingleProcess:
    def test_returns_a_new_detached_tensor_and_leaves_the_input_alone(self):
        weight = torch.tensor(3.0, requires_grad=True)
        loss = weight * 2
        out = get_global_loss_detached(loss)
        assert not out.requires_grad
        assert out.data_ptr() != loss.data_ptr()
        assert out.item() == 6.0
        out.add_(1.0)
        assert loss.item() == 6.0
        loss.backward()
        assert weight.grad.item() == 2.0

    def test_sum_warns_and_is_the_value_on_one_process(self):
        with pytest.warns(UserWarning, match="DDP averages gradients over ranks"):
            assert get_global_loss_detached(torch.tensor(1.5), reduction="sum").item() == 1.5

    def test_other_reductions_and_types_are_rejected(self):
        with pytest.raises(ValueError, match=r"`reduction` to be one of \('mean', 'sum'\), got 'max'"):
            get_global_loss_detached(torch.tensor(1.0), reduction="max")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="`local_loss` to be a torch.Tensor, got float"):
            get_global_loss_detached(1.0)  # type: ignore[arg-type]


def test_pos_weights_as_a_numpy_array_as_the_ancestor_accepted():
    np = pytest.importorskip("numpy")
    loss = build_multi_task_loss(LossType.BCE_WITH_LOGITS, TASKS, pos_weights=np.array([1.0, 3.0, 0.5]))
    logits = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 2, (8, 3), generator=torch.Generator().manual_seed(1)).float()
    weights = torch.ones(8, 3)
    ref = multi_task_loop(logits, labels, weights, TASKS, pos_weights=[1.0, 3.0, 0.5])
    out = loss(logits, labels, weights)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key])


class TestGlobalLossDetachedDtypes:
    """One rule for integer and bool losses, both reductions: reduced and returned in float32."""

    @pytest.mark.parametrize("reduction", ["mean", "sum"])
    @pytest.mark.parametrize(
        ("loss", "value"),
        [(torch.tensor(200, dtype=torch.uint8), 200.0), (torch.tensor(True), 1.0), (torch.tensor(-3), -3.0)],
    )
    def test_integer_and_bool_losses(self, loss, value, reduction):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = get_global_loss_detached(loss, reduction=reduction)
        assert out.dtype == torch.float32
        assert out.item() == value

    def test_float64_is_kept_and_complex_refused(self):
        assert get_global_loss_detached(torch.tensor(0.5, dtype=torch.float64)).dtype == torch.float64
        with pytest.raises(TypeError, match="`local_loss` to hold real numbers, got dtype torch.complex64"):
            get_global_loss_detached(torch.tensor(0.5 + 1j))
