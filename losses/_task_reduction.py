"""From element losses to task losses and one global loss: labelled counts and the reduction over tasks.

Public through :mod:`losses.functional`.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

from losses import _input_checks as checks
from losses._fused_bce import column_sums


def task_counts(
    mask: Optional[torch.Tensor], batch: int, num_tasks: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """How many entries of each task are labelled: ``mask.sum(0)``, or the batch size without a mask."""
    if mask is None:
        return torch.full((num_tasks,), float(batch), dtype=dtype, device=device)
    # Summing the mask as floats: a bool reduction over rows is many times slower on the CPU, and so
    # is converting bools, so its bytes are converted. Counts stay exact integers in float32 up to
    # 2**24 rows.
    return column_sums(mask.view(torch.uint8).to(dtype))


GlobalReduction = Literal["mean", "sum", "min", "max", "median"]


def reduce_tasks(task_losses: torch.Tensor, task_weight: torch.Tensor, reduction: GlobalReduction) -> torch.Tensor:
    """Scale the per-task losses by ``task_weight`` and reduce them to one value.

    ``task_losses`` is ``(T)``, or ``(T, B)`` for element losses, which are reduced over every
    entry as the ancestor reduced its stacked ``[B]`` task losses. ``median`` of an even count is
    the lower of the two middle values, as :func:`torch.median`. No entries (``(T, 0)``) give 0.

    Example:
        >>> reduce_tasks(torch.tensor([1.0, 2.0, 6.0]), torch.tensor([1.0, 1.0, 0.5]), "max")
        tensor(3.)
    """
    checks.check_reduce_tasks(task_losses, task_weight, reduction)
    return unchecked_reduce_tasks(task_losses, task_weight, reduction)


def unchecked_reduce_tasks(
    task_losses: torch.Tensor, task_weight: torch.Tensor, reduction: GlobalReduction
) -> torch.Tensor:
    """:func:`reduce_tasks` without its argument checks: for ``MultiTaskLoss``, which checked them once."""
    if task_losses.ndim == 2:
        task_weight = task_weight.unsqueeze(1)
    weighted = task_losses * task_weight.to(task_losses.dtype)
    if reduction == "sum" or weighted.numel() == 0:
        return weighted.sum()
    if reduction == "mean":
        return weighted.mean()
    if reduction == "min":
        return weighted.min()
    if reduction == "max":
        return weighted.max()
    return weighted.median()
