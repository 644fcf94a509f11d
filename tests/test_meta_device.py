"""The meta device: shape inference without data, through modules whose buffers hold real values."""

import warnings

import pytest
import torch

from losses import BCEWithLogitsLoss, CrossEntropyLoss, MultiTaskLoss, Task


def meta(*shape, dtype=torch.float32):
    return torch.zeros(*shape, device="meta", dtype=dtype)


def _multi_task(num_tasks, task_loss_reduction="mean", **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return MultiTaskLoss([f"t{i}" for i in range(num_tasks)], task_loss_reduction=task_loss_reduction, **kwargs)


@pytest.mark.parametrize("moved", [False, True])
@pytest.mark.parametrize("num_tasks", [1, 3])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("task_loss_reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("check_inputs", [False, True])
def test_multi_task_bce_infers_shapes(moved, num_tasks, use_mask, task_loss_reduction, check_inputs):
    loss = _multi_task(
        num_tasks,
        task_loss_reduction,
        pos_weights=[2.0] * num_tasks,
        task_weights=[1.0] * num_tasks,
        check_inputs=check_inputs,
    )
    if moved:
        loss = loss.to("meta")
    x = meta(8, num_tasks).requires_grad_()
    mask = meta(8, num_tasks, dtype=torch.bool) if use_mask else None
    out = loss(x, meta(8, num_tasks), meta(8), mask)
    per_task = (8,) if task_loss_reduction == "none" else ()
    for key, value in out.items():
        assert value.device.type == "meta"
        assert value.shape == (() if key == "loss" else per_task)
    out["loss"].backward()
    assert x.grad.shape == (8, num_tasks)
    assert x.grad.device.type == "meta"
    # The module's own buffers are untouched: it still computes real values on the CPU.
    if not moved:
        real = loss(torch.zeros(2, num_tasks), torch.zeros(2, num_tasks))["loss"].item()
        assert real == pytest.approx(0.6931 * (2 if task_loss_reduction == "sum" else 1), abs=1e-4)


@pytest.mark.parametrize("check_inputs", [False, True])
def test_multi_task_cross_entropy(check_inputs):
    out = _multi_task(2, loss_type="cross_entropy", check_inputs=check_inputs)(
        meta(8, 2, 5), meta(8, 2, dtype=torch.int32)
    )
    assert [value.shape for value in out.values()] == [(), (), ()]
    assert out["loss"].device.type == "meta"


@pytest.mark.parametrize("check_inputs", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_single_task_modules(check_inputs, reduction):
    bce = BCEWithLogitsLoss(pos_weight=[1.0, 3.0], reduction=reduction, check_inputs=check_inputs)
    assert bce(meta(4, 2), meta(4, 2), meta(4, 2)).shape == ((4, 2) if reduction == "none" else ())
    ce = CrossEntropyLoss(weight=[1.0, 2.0, 3.0], reduction=reduction, check_inputs=check_inputs)
    assert ce(meta(4, 3), meta(4, dtype=torch.long)).shape == ((4,) if reduction == "none" else ())
    assert ce(meta(4, 3), meta(4, 3), meta(4)).device.type == "meta"


def test_built_under_a_meta_device_context():
    with torch.device("meta"):
        loss = MultiTaskLoss(["a", "b"], pos_weights=[1.0, 2.0])
        out = loss(torch.zeros(4, 2), torch.zeros(4, 2))
    assert out["loss"].device.type == "meta"


def test_meta_weights_are_accepted_unchecked():
    assert BCEWithLogitsLoss(pos_weight=meta(3)).pos_weight.device.type == "meta"


def test_a_meta_module_called_with_real_tensors_is_a_named_error():
    loss = MultiTaskLoss(["a", "b"]).to("meta")
    with pytest.raises(ValueError, match=r"`logits` on the device of the loss's `pos_weight` \(meta\), got cpu"):
        loss(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"`logits` on the device of the loss's `weight` \(meta\), got cpu"):
        CrossEntropyLoss(weight=[1.0, 2.0]).to("meta")(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("argument", ["labels", "weights", "mask"])
@pytest.mark.parametrize(
    ("tasks", "columns"),
    [
        (["a", "b", "c"], 3),  # [B, T]
        ([Task("a"), Task("c", kind="multiclass", num_classes=3), Task("r", kind="regression")], 5),  # [B, D]
        ([Task("c", kind="multiclass", num_classes=3), Task("d", kind="multiclass", num_classes=3)], (2, 3)),
    ],
)
def test_meta_logits_with_cpu_inputs_are_a_named_error(tasks, columns, argument):
    # Torch's own error ("Tensor on device cpu is not on the expected device meta!") names nothing.
    loss = MultiTaskLoss(tasks)
    shape = (4, *columns) if isinstance(columns, tuple) else (4, columns)
    inputs = {
        "labels": meta(4, len(tasks), dtype=torch.long if isinstance(columns, tuple) else torch.float32),
        "weights": meta(4, len(tasks)),
        "mask": meta(4, len(tasks), dtype=torch.bool),
    }
    inputs[argument] = torch.zeros_like(inputs[argument], device="cpu")
    with pytest.raises(ValueError, match=rf"Expected `{argument}` on the device of `logits` \(meta\), got cpu\."):
        loss(meta(*shape), **inputs)
    inputs[argument] = inputs[argument].to("meta")
    assert loss(meta(*shape), **inputs)["loss"].device.type == "meta"
