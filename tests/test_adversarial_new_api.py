"""Defects found by the adversarial pass over Task specs, the weightings and the ranking metrics.

Each test fails on the code before its fix: a value check that names the wrong entry of a mixed
block, a silent NaN from a class index in a task's padding, a deep error from a wrong argument.
"""

from __future__ import annotations

import re

import pytest
import torch

from losses import MultiTaskLoss, MultiTaskRankingMetrics, Task, sync_for_checkpoint

#: Interleaved kinds: a multi-class task (columns 0-2), binary (3), regression (4), binary (5),
#: a two-class task (6-7). Every row's part of the block starts elsewhere than the block.
INTERLEAVED = (
    Task("feedback", kind="multiclass", num_classes=3),
    Task("fav", pos_weight=2.0),
    Task("dwell", kind="regression"),
    Task("reply", focal_gamma=2.0),
    Task("report", kind="multiclass", num_classes=2),
)


def _block() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.zeros(3, 8)
    labels = torch.tensor([[0.0, 1.0, 0.5, 1.0, 1.0], [2.0, 0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 3.0, 0.0, 1.0]])
    return logits, labels


def _bad_index(message: str) -> tuple[int, ...]:
    found = re.search(r"the first at index \(([\d, ]+)\)", message)
    assert found is not None, message
    return tuple(int(i) for i in found.group(1).split(","))


@pytest.mark.parametrize(
    ("argument", "where", "value", "shown"),
    [
        ("labels", (1, 3), 1.5, (1, 3)),  # binary task at position 3 (its row's column 1)
        ("labels", (2, 2), float("nan"), (2, 2)),  # regression task at position 2 (its row's column 0)
        ("labels", (1, 0), 7.0, (1, 0)),
        ("weights", (2, 3), -1.0, (2, 3)),
        ("logits", (1, 5), float("inf"), (1, 5)),  # task "reply", the binary row's column 1
        ("logits", (0, 4), float("nan"), (0, 4)),  # task "dwell"
        ("logits", (2, 7), float("inf"), (2, 7)),  # task "report", class 1: the multi-class row's (2, 1, 1)
    ],
)
def test_value_checks_name_the_entry_of_the_block_not_of_its_row(
    argument: str, where: tuple[int, int], value: float, shown: tuple[int, int]
) -> None:
    loss = MultiTaskLoss(INTERLEAVED, check_inputs=True)
    logits, labels = _block()
    inputs = {"logits": logits, "labels": labels, "weights": torch.ones(3, 5)}
    inputs[argument][where] = value
    with pytest.raises(ValueError, match=f"`{argument}`") as error:
        loss(inputs["logits"], inputs["labels"], inputs["weights"])
    assert _bad_index(str(error.value)) == shown


def test_value_checks_of_one_kind_keep_the_callers_index() -> None:
    loss = MultiTaskLoss([Task("a"), Task("b", focal_gamma=1.0)], check_inputs=True)
    labels = torch.tensor([[0.0, 1.0], [1.0, 2.0]])
    with pytest.raises(ValueError, match="`labels`") as error:
        loss(torch.zeros(2, 2), labels)
    assert _bad_index(str(error.value)) == (1, 1)
    all_classes = MultiTaskLoss([Task("m", kind="multiclass", num_classes=3)], check_inputs=True)
    logits = torch.zeros(2, 1, 3)
    logits[1, 0, 2] = float("inf")
    with pytest.raises(ValueError, match="`logits`") as error:
        all_classes(logits, torch.tensor([[0], [1]]))
    assert _bad_index(str(error.value)) == (1, 0, 2)


def test_class_index_in_a_tasks_padding_is_an_error_not_a_silent_nan() -> None:
    # "report" has 2 classes, padded to the widest task's 3: label 2 used to pick the padding's
    # -inf log-probability and give a NaN loss without any error.
    loss = MultiTaskLoss(INTERLEAVED)
    logits, labels = _block()
    labels[0, 4] = 2.0
    with pytest.raises(RuntimeError, match="out of bounds"):
        loss(logits, labels)
    # Still fine under a mask or as -100, and a valid label still gives a finite loss.
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 4] = False
    assert torch.isfinite(loss(logits, labels, mask=mask)["loss"])
    labels[0, 4] = -100
    assert torch.isfinite(loss(logits, labels)["loss"])


def test_sync_for_checkpoint_refuses_what_is_not_a_module() -> None:
    metrics = MultiTaskRankingMetrics(["click"])
    for wrong in ([metrics], {"m": metrics}, 3):
        with pytest.raises(TypeError, match="Expected `module` to be a torch.nn.Module"):
            sync_for_checkpoint(wrong)  # type: ignore[arg-type]
    sync_for_checkpoint(torch.nn.ModuleList([metrics]))  # the way to pass several


def test_numpy_scalars_are_numbers_for_the_weightings_and_the_window() -> None:
    # losses.Task takes NumPy scalars; these used to refuse them with a TypeError ("got int64").
    import numpy as np

    from losses.weighting import DynamicWeightAverage, RandomLossWeighting, UncertaintyWeighting

    dwa = DynamicWeightAverage(["a"], temperature=np.float32(0.5), window=np.int64(3))
    assert (dwa.temperature, dwa.window) == (0.5, 3)
    assert type(dwa.window) is int
    rlw = RandomLossWeighting(["a", "b"], seed=np.int64(2**32 - 1))
    assert type(rlw.seed) is int
    assert torch.isfinite(rlw({"loss/a": torch.tensor(1.0), "loss/b": torch.tensor(2.0)})["loss"])
    uw = UncertaintyWeighting(["a", "b"], init=[np.float64(0.5), np.float32(1.0)])
    torch.testing.assert_close(uw.log_variance.detach(), torch.tensor([0.5, 1.0]))
    assert UncertaintyWeighting(["a"], init=np.float32(2.0)).log_variance.item() == 2.0
    metrics = MultiTaskRankingMetrics(["a"], window=np.int64(100))
    assert metrics.window == 100
    assert type(metrics.window) is int
    for wrong in (True, 2.0):
        with pytest.raises(TypeError, match="`window`"):
            DynamicWeightAverage(["a"], window=wrong)  # type: ignore[arg-type]


@pytest.mark.parametrize("argument", ["labels", "weights", "mask"])
def test_a_batch_tensor_on_another_device_than_the_logits_is_named(argument: str) -> None:
    # On this CPU machine "meta" stands for the other device (CPU labels beside CUDA logits).
    def batch(width: int, tasks: int) -> dict[str, torch.Tensor]:
        inputs = {
            "logits": torch.zeros(4, width),
            "labels": torch.zeros(4, tasks),
            "weights": torch.ones(4, tasks),
            "mask": torch.ones(4, tasks, dtype=torch.bool),
        }
        inputs[argument] = inputs[argument].to("meta")
        return inputs

    for module, width, tasks in (
        (MultiTaskLoss(["a", "b"]), 2, 2),
        (MultiTaskLoss(INTERLEAVED), 8, 5),
        (MultiTaskLoss([Task("a"), Task("r", kind="regression")]), 2, 2),
        (MultiTaskRankingMetrics(["a", "b"]), 2, 2),
    ):
        inputs = batch(width, tasks)
        with pytest.raises(ValueError, match=f"Expected `{argument}` on the device of `logits` \\(cpu\\), got meta"):
            module(inputs["logits"], inputs["labels"], inputs["weights"], inputs["mask"])
    # Shape inference on meta tensors, with the loss's buffers left on the CPU, still works.
    meta = MultiTaskLoss(INTERLEAVED)(torch.zeros(4, 8, device="meta"), torch.zeros(4, 5, device="meta"))
    assert meta["loss"].is_meta
