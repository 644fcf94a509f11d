"""The input checks of every call path, each in one function that the path calls once.

A public function of :mod:`losses.functional` and a loss module's ``forward`` each call one
function here before any math; the ``unchecked_*`` kernels and the rows of
:mod:`losses._task_groups` check nothing. Everything here compares types, shapes and devices,
which reads no tensor data and never waits on the device; the opt-in value checks
(``check_inputs=True``) are :func:`losses._validation.check_values`. The building blocks
(one argument, one rule) are in :mod:`losses._validation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch

from losses import _validation as v

#: The reductions over tasks of :func:`losses.functional.reduce_tasks`.
GLOBAL_REDUCTIONS = ("mean", "sum", "min", "max", "median")


def check_binary_cross_entropy_call(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    pos_weight: Optional[torch.Tensor],
    reduction: Any,
    label_smoothing: Any,
) -> None:
    """The checks of :func:`losses.functional.binary_cross_entropy_with_logits`."""
    v.check_loss_arguments(
        reduction, label_smoothing, logits=logits, labels=labels, weights=weights, pos_weight=pos_weight
    )
    v.check_floating("logits", logits)
    v.check_same_shape("labels", labels, logits.shape, "logits")
    if weights is not None:
        v.check_broadcasts_to("weights", weights, logits.shape, "logits")
    if pos_weight is not None:
        v.check_broadcasts_to("pos_weight", pos_weight, logits.shape, "logits")
        v.check_no_grad("pos_weight", pos_weight, "it is a constant of the loss (torch does not differentiate it).")


def _check_cross_entropy_shapes(logits: torch.Tensor, labels: torch.Tensor) -> torch.Size:
    """Check labels against logits; return the shape of one loss per sample (logits less the class dim)."""
    v.check_floating("logits", logits)
    if logits.ndim == 0:
        raise ValueError("Expected `logits` to have a class dimension, got a scalar.")
    class_dim = 0 if logits.ndim == 1 else 1
    sample_shape = logits.shape[:class_dim] + logits.shape[class_dim + 1 :]
    if labels.is_floating_point():
        if labels.shape != logits.shape:
            raise ValueError(
                "Expected probability `labels` (floating point) to have the shape of `logits` "
                f"{tuple(logits.shape)}, got {tuple(labels.shape)}."
            )
    elif labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(
            f"Expected `labels` to be integer class indices or floating point probabilities, got dtype {labels.dtype}."
        )
    elif labels.shape != sample_shape:
        raise ValueError(
            f"Expected class-index `labels` (integer) of shape {tuple(sample_shape)} for `logits` of shape "
            f"{tuple(logits.shape)} (classes in dimension {class_dim}), got {tuple(labels.shape)}."
        )
    return sample_shape


def check_cross_entropy_call(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    class_weight: Optional[torch.Tensor],
    ignore_index: Any,
    reduction: Any,
    label_smoothing: Any,
) -> int:
    """The checks of :func:`losses.functional.cross_entropy`; returns ``ignore_index`` as an ``int``."""
    v.check_loss_arguments(
        reduction, label_smoothing, logits=logits, labels=labels, weights=weights, class_weight=class_weight
    )
    checked_index = v.check_int("ignore_index", ignore_index)
    v.check_no_grad("class_weight", class_weight, "it is a constant of the loss (torch does not differentiate it).")
    sample_shape = _check_cross_entropy_shapes(logits, labels)
    num_classes = logits.shape[0 if logits.ndim == 1 else 1]
    if class_weight is not None and class_weight.shape != (num_classes,):
        raise ValueError(
            f"Expected class `weight` of length {num_classes} (the class count of `logits` "
            f"{tuple(logits.shape)}), got shape {tuple(class_weight.shape)}."
        )
    if weights is not None and weights.shape != sample_shape:
        raise ValueError(
            f"Expected `weights` to have the shape of one loss per sample {tuple(sample_shape)} "
            f"(`logits` {tuple(logits.shape)} without the class dimension), got {tuple(weights.shape)}."
        )
    return checked_index


def check_multi_task_inputs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    num_tasks: int,
    num_class_dims: int,
) -> None:
    """Check the shapes of a multi-task batch: logits ``[B, T]`` (or ``[B, T, C]``), the rest ``[B, T]``.

    Every argument must be a tensor of real numbers. Labels and weights are constants: the
    gradient of a multi-task loss covers the logits only, so one that requires grad is an error.
    """
    v.check_real_tensors(logits=logits, labels=labels, weights=weights, mask=mask)
    v.check_floating("logits", logits)
    expected_ndim = 2 + num_class_dims
    layout = "[B, T]" if num_class_dims == 0 else "[B, T, C]"
    if logits.ndim != expected_ndim:
        raise ValueError(f"Expected `logits` of shape {layout}, got {tuple(logits.shape)}.")
    if logits.shape[1] != num_tasks:
        raise ValueError(
            f"Expected `logits` to have {num_tasks} tasks in dimension 1 (one per task name), "
            f"got {logits.shape[1]} (shape {tuple(logits.shape)})."
        )
    block = logits.shape[:2]
    if num_class_dims:
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"Expected cross-entropy `labels` to be integer class indices, got dtype {labels.dtype}.")
        if labels.shape != block:
            raise ValueError(
                f"Expected `labels` of shape [B, T] {tuple(block)} (the logits {tuple(logits.shape)} without "
                f"their class dimension), got {tuple(labels.shape)}."
            )
    else:
        v.check_same_shape("labels", labels, block, "logits")
    check_weights_and_mask(logits, labels, weights, mask, block, "logits" if not num_class_dims else "labels")


def check_weights_and_mask(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    block: torch.Size,
    mask_like: str,
) -> None:
    """The checks every multi-task layout shares once its ``[B, T]`` label block is known.

    Labels and weights must not require grad, weights are ``[B, T]`` or ``[B]``, the mask is a bool
    ``[B, T]`` (shaped like the argument ``mask_like``), and everything sits on the logits' device.
    """
    # The fused BCE gradient covers the logits only; one rule for every kind: no silently missing gradient.
    for name, tensor in (("labels", labels), ("weights", weights)):
        v.check_no_grad(name, tensor, "MultiTaskLoss differentiates with respect to `logits` only.")
    # Two comparisons, not `in`: torch.compile, once it made the sizes dynamic, found equal shapes
    # unequal through `in` (a second MultiTaskLoss compiled after one with other logits).
    if weights is not None and weights.shape != block and weights.shape != block[:1]:
        raise ValueError(
            f"Expected `weights` of shape [B, T] {tuple(block)} or [B] {tuple(block[:1])}, got {tuple(weights.shape)}."
        )
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"Expected `mask` to be a bool tensor, got dtype {mask.dtype}.")
        v.check_same_shape("mask", mask, block, mask_like)
    # Free, and torch's own error for a CPU label beside CUDA logits names no argument.
    v.check_same_device(logits, labels=labels, weights=weights, mask=mask)


def check_multi_task_call(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    num_class_dims: int,
    scale: Union[float, torch.Tensor, None] = None,
    **task_vectors: Optional[torch.Tensor],
) -> None:
    """The argument checks of a public multi-task function: the batch, then its ``(T)`` vectors."""
    v.check_tensor("logits", logits)
    num_tasks = logits.shape[1] if logits.ndim >= 2 else 0
    check_multi_task_inputs(logits, labels, weights, mask, num_tasks, num_class_dims)
    if isinstance(scale, torch.Tensor) and scale.ndim:  # a 0-dim scale (as torch.jit.trace makes) is one number
        task_vectors["scale"] = scale
    for name, vector in task_vectors.items():
        v.check_task_vector(name, vector, num_tasks)


def check_block(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    num_tasks: int,
    width: Optional[int],
) -> None:
    """Shape checks (free) of a ``[B, D]`` block with multi-class tasks: ``D`` logit columns, ``T`` labels."""
    v.check_real_tensors(logits=logits, labels=labels, weights=weights, mask=mask)
    v.check_floating("logits", logits)
    if logits.ndim != 2 or logits.shape[1] != width:
        raise ValueError(
            f"Expected `logits` of shape [B, D] with D = {width} columns (one per binary or regression task and "
            f"`num_classes` per multiclass task, in task order), got {tuple(logits.shape)}"
            + (
                ". [B, T, C] logits need every task multiclass, all with one `num_classes`."
                if logits.ndim == 3
                else "."
            )
        )
    block = torch.Size((logits.shape[0], num_tasks))
    if labels.shape != block:
        raise ValueError(
            f"Expected `labels` of shape [B, T] {tuple(block)}, one label per task (a class index for a multiclass "
            f"task), got {tuple(labels.shape)}."
        )
    check_weights_and_mask(logits, labels, weights, mask, block, "labels")


def check_multi_task_loss_inputs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    num_tasks: int,
    class_layout: Union[int, bool, None],
    width: Optional[int],
    constants: Sequence[tuple[str, Optional[torch.Tensor]]] = (),
) -> None:
    """The checks of :class:`~losses.MultiTaskLoss`'s ``forward``, for each of its layouts.

    ``[B, T, C]`` when every task is multi-class (``class_layout``: their ``C``, ``None`` when the
    logits give it, ``False`` when the layout does not apply), else ``[B, D]`` with ``D = width``
    columns (``[B, T]`` without classes). ``constants`` are the loss's buffers by name: none may
    require grad (:func:`torch.func.functional_call` can hand in one that does), since their
    gradient would be silently missing.
    """
    for name, constant in constants:
        v.check_no_grad(name, constant, "it is a constant of the loss: MultiTaskLoss differentiates `logits` only.")
    if class_layout is not False and (v.check_tensor("logits", logits).ndim == 3 or width is None):
        check_multi_task_inputs(logits, labels, weights, mask, num_tasks, 1)
        if class_layout is not None and logits.shape[2] != class_layout:
            raise ValueError(
                f"Expected `logits` of shape [B, T, C] with C = {class_layout} (the tasks' `num_classes`), "
                f"got {tuple(logits.shape)}."
            )
    elif width == num_tasks:
        check_multi_task_inputs(logits, labels, weights, mask, num_tasks, 0)
    else:
        check_block(logits, labels, weights, mask, num_tasks, width)


def check_reduce_tasks(task_losses: torch.Tensor, task_weight: torch.Tensor, reduction: str) -> None:
    v.check_choice("reduction", reduction, GLOBAL_REDUCTIONS)
    v.check_floating("task_losses", v.check_tensor("task_losses", task_losses))
    if task_losses.ndim not in (1, 2):
        raise ValueError(f"Expected `task_losses` of shape (T) or (T, B), got {tuple(task_losses.shape)}.")
    v.check_task_vector("task_weight", task_weight, task_losses.shape[0])


def check_groups(groups: Optional[torch.Tensor], batch: int, logits: torch.Tensor) -> torch.Tensor:
    """``groups`` as given, after the free checks: an integer ``[B]`` tensor on the logits' device."""
    if groups is None:
        raise ValueError("Expected `groups` (an integer tensor [B] of group ids) for a task with a `ranking` term.")
    if not isinstance(groups, torch.Tensor):
        raise TypeError(f"Expected `groups` to be a torch.Tensor, got {type(groups).__name__}.")
    if groups.is_floating_point() or groups.is_complex() or groups.dtype == torch.bool:
        raise TypeError(f"Expected `groups` to be an integer tensor of group ids, got dtype {groups.dtype}.")
    if groups.shape != (batch,):
        raise ValueError(f"Expected `groups` of shape [B] ({batch},), one id per row, got {tuple(groups.shape)}.")
    if groups.device != logits.device and logits.device.type != "meta":
        raise ValueError(f"Expected `groups` on the logits' device {logits.device}, got {groups.device}.")
    return groups


def check_ranking_loss_call(
    logits: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    kind: Any,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    kinds: tuple[str, ...],
) -> None:
    """The checks of :func:`losses.ranking_losses.ranking_loss`: one column ``[B]`` of each."""
    v.check_tensor("logits", logits)
    v.check_floating("logits", logits)
    if logits.ndim != 1:
        raise ValueError(f"Expected `logits` of shape [B], one score per row, got {tuple(logits.shape)}.")
    if kind not in kinds:
        raise ValueError(f"Expected `kind` to be one of {kinds}, got {kind!r}.")
    check_groups(groups, logits.shape[0], logits)
    for name, tensor in (("labels", labels), ("weights", weights), ("mask", mask)):
        if tensor is not None:
            v.check_same_shape(name, v.check_tensor(name, tensor), logits.shape, "logits")
    v.check_same_device(logits, labels=labels, weights=weights, mask=mask)
