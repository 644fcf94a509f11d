"""What users run instead of MultiTaskLoss: the ancestor's per-task loop, and the fused floor."""

import torch
import torch.nn.functional as F


def ancestor_loop(logits, labels, weights, tasks, pos_weights):
    """The ancestor's closure body: one BCE call per task, pos_weights rebuilt on every call."""
    torch_weights = torch.tensor(pos_weights)
    losses = {}
    for task_idx, task in enumerate(tasks):
        task_logits = logits[:, task_idx]
        label = labels[:, task_idx].type_as(task_logits)
        losses[f"loss/{task}"] = F.binary_cross_entropy_with_logits(
            task_logits, label, reduction="mean", pos_weight=torch_weights[task_idx], weight=weights[:, task_idx]
        )
    losses["loss"] = torch.mean(torch.stack(list(losses.values())))
    return losses


def fused_floor(logits, labels):
    """One unweighted BCE over the whole block: no pos_weights, weights, masks or per-task values."""
    return F.binary_cross_entropy_with_logits(logits, labels)
