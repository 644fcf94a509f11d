"""Per-task reference loops with the ancestor's semantics, written plainly for the tests to compare with."""

import torch
import torch.nn.functional as F

GLOBAL_REDUCTIONS = {
    "mean": torch.mean,
    "sum": torch.sum,
    "min": torch.min,
    "max": torch.max,
    "median": torch.median,
}


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
