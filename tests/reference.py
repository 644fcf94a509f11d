"""Plain restatements of the semantics our builders promise to keep, for the tests to compare with.

The builders (``build_loss``, ``build_multi_task_loss``, ``get_global_loss_detached``) keep the
signatures and the values of an ancestor codebase's ``core/losses.py``. The functions here say
what those values are, written by us as directly as torch allows: one torch call per task, no
fusing, no buffers. They are the yardstick, so they favour obviousness over speed.

What the ancestor computes, in our words:

- ``build_loss(loss_type, reduction)`` gives ``loss(logits, labels)``: binary cross-entropy on
  logits with the labels converted to the logits' dtype (so int and bool labels work), reduced by
  ``reduction``. The ancestor had no cross-entropy; ours is torch's, with class-index labels.
- ``build_multi_task_loss(loss_type, tasks, task_loss_reduction, global_reduction, pos_weights)``
  gives ``loss(logits, labels, weights)`` with ``[B, T]`` inputs. Task ``t`` is the BCE of column
  ``t`` with per-element weight ``weights[:, t]``, positive weight ``pos_weights[t]`` (the
  sequence, array or tensor as given, converted by ``torch.tensor``; all ones when omitted) and
  reduction ``task_loss_reduction``, under the key ``"loss/<task>"``. Weights never renormalize:
  ``mean`` divides by ``B``, so zero weights still count. ``"loss"`` stacks the task losses and
  reduces every entry of the stack with ``global_reduction`` (mean, sum, min, max, or median,
  the lower middle value of an even count): over ``T`` numbers for ``mean``/``sum`` task
  reductions, and over all ``T * B`` element losses for ``"none"``, where each task's entry is
  its ``[B]`` vector of weighted element losses.
- ``get_global_loss_detached(local_loss, reduction)`` divides each rank's detached loss by the
  world size, then sums over ranks (``mean``), or only sums (``sum``).

Where the library departs on purpose, and these functions follow the library: an empty batch
(``B = 0``) gives 0 for every reduced loss, where the ancestor gives NaN for a mean and fails for
a min, max or median over nothing; so does a cross-entropy batch whose labels are all ignored
(``-100``), where torch gives NaN for a mean; ``weights`` may be omitted (all ones) or given as ``[B]`` (one
weight per row, every task).

``multi_task_loop`` is the older, wider loop the module tests use: it also knows masks, task
weights and cross-entropy tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F

GLOBAL_REDUCTIONS = {
    "mean": torch.mean,
    "sum": torch.sum,
    "min": torch.min,
    "max": torch.max,
    "median": torch.median,
}


def single_task_loss(
    loss_type: str, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """What ``build_loss(loss_type, reduction)(logits, labels)`` gives."""
    if loss_type == "bce_with_logits":
        loss = F.binary_cross_entropy_with_logits(logits, labels.type_as(logits), reduction=reduction)
        labelled = logits.numel()
    else:
        loss = F.cross_entropy(logits, labels, reduction=reduction)
        labelled = int((labels != -100).sum())
    # Nothing to reduce gives 0 (the departure from the ancestor), still attached to the logits
    # so that a training step on an empty batch can call backward() and get a zero gradient.
    return logits.sum() * 0 if reduction != "none" and not labelled else loss


def _as_pos_weights(pos_weights: Any, num_tasks: int) -> torch.Tensor:
    if pos_weights is None:
        return torch.ones(num_tasks)
    if isinstance(pos_weights, torch.Tensor):
        return pos_weights.detach().clone()
    return torch.tensor(pos_weights)


def multi_task_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    tasks: Sequence[str],
    task_loss_reduction: str = "mean",
    global_reduction: str = "mean",
    pos_weights: Any = None,
) -> dict[str, torch.Tensor]:
    """What ``build_multi_task_loss(BCE, tasks, task_loss_reduction, global_reduction, pos_weights)``
    gives for ``(logits, labels, weights)``: one BCE call per task, then one reduction of the stack.
    """
    batch = logits.shape[0]
    pos_weight = _as_pos_weights(pos_weights, len(tasks))
    if weights is None:
        weights = torch.ones_like(logits)
    elif weights.ndim == 1:
        weights = weights[:, None].expand(batch, len(tasks))
    losses = {}
    for index, task in enumerate(tasks):
        column = logits[:, index]
        loss = F.binary_cross_entropy_with_logits(
            column,
            labels[:, index].type_as(column),
            weight=weights[:, index],
            pos_weight=pos_weight[index],
            reduction=task_loss_reduction,
        )
        losses[f"loss/{task}"] = column.sum() * 0 if task_loss_reduction != "none" and not batch else loss
    stacked = torch.stack(list(losses.values()))
    # Only "none" can leave nothing to reduce: the task losses of an empty batch are 0 otherwise.
    losses["loss"] = GLOBAL_REDUCTIONS[global_reduction](stacked) if stacked.numel() else logits.sum() * 0
    return losses


def global_loss(rank_losses: Sequence[torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """What ``get_global_loss_detached`` gives when rank ``r`` holds ``rank_losses[r]``, in float64.

    ``mean`` divides each rank's value by the world size before summing, as the ancestor did: a
    mean of values that fit in their dtype then fits too.
    """
    values = [loss.detach().double() for loss in rank_losses]
    if reduction == "mean":
        values = [value / len(values) for value in values]
    return torch.stack(values).sum(0)


def multi_task_loop(
    logits,
    labels,
    weights,
    tasks,
    task_loss_reduction="mean",
    global_reduction="mean",
    pos_weights=None,
    mask=None,
    task_weights=None,
    cross_entropy=False,
):
    """One loss call per task on that task's labelled rows, as the ancestor's closure did."""
    losses = {}
    for index, task in enumerate(tasks):
        rows = mask[:, index] if mask is not None else torch.ones(logits.shape[0], dtype=torch.bool)
        task_weights_column = None if weights is None else (weights if weights.ndim == 1 else weights[:, index])[rows]
        if cross_entropy:
            elements = F.cross_entropy(logits[rows, index], labels[rows, index], reduction="none")
            if task_weights_column is not None:
                elements = elements * task_weights_column
            task_loss = elements.sum() if task_loss_reduction == "sum" else elements.sum() / max(int(rows.sum()), 1)
        elif int(rows.sum()) == 0:
            task_loss = logits[rows, index].sum()
        else:
            task_loss = F.binary_cross_entropy_with_logits(
                logits[rows, index],
                labels[rows, index].type_as(logits),
                reduction=task_loss_reduction,
                pos_weight=None if pos_weights is None else torch.as_tensor(pos_weights, dtype=logits.dtype)[index],
                weight=task_weights_column,
            )
        losses[f"loss/{task}"] = task_loss
    stacked = torch.stack(list(losses.values()))
    if task_weights is not None:
        stacked = stacked * torch.as_tensor(task_weights, dtype=stacked.dtype)
    losses["loss"] = GLOBAL_REDUCTIONS[global_reduction](stacked)
    return losses
