"""Geometric loss strategy (Chennupati et al., 2019): the geometric mean of the task losses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from losses import distributed
from losses.weighting._base import TaskWeighting


def geometric_loss_weights(task_losses: torch.Tensor) -> torch.Tensor:
    r"""The gradient of the geometric mean with respect to each task loss, shape ``[T]``.

    .. math::
        G = \Big(\prod_{t} L_t\Big)^{1/T}, \qquad w_t = \frac{\partial G}{\partial L_t} = \frac{G}{T L_t}

    over the tasks with :math:`L_t > 0`; a task with zero loss (no labelled entry in the batch) is
    left out of the product, with weight 0, instead of making :math:`G` zero and the weights NaN.
    :math:`\sum_t w_t L_t = G`. Computed in log space, so a product of many small losses does not
    underflow.

    Example:
        >>> geometric_loss_weights(torch.tensor([4.0, 1.0, 0.0]))
        tensor([0.2500, 1.0000, 0.0000])
    """
    positive = task_losses > 0
    safe = torch.where(positive, task_losses, 1)
    count = positive.sum().clamp_min(1)
    geometric_mean = torch.exp(safe.log().sum() / count)
    return torch.where(positive, geometric_mean / (count * safe), 0)


class GeometricLossStrategy(TaskWeighting):
    r"""Trains on the geometric mean of the task losses, which balances their relative, not absolute, progress.

    .. math::
        L_{\text{GLS}} = \Big(\prod_{t=1}^{T} L_t\Big)^{1/T}

    Its gradient is :math:`\sum_t \frac{L_{\text{GLS}}}{T L_t} \nabla L_t`: each task is weighted by
    the inverse of its own loss, so a rare task whose loss is ten times smaller is not drowned by
    the large ones. The weights logged as ``"weight/<task>"`` are these
    :math:`w_t = \partial L_{\text{GLS}} / \partial L_t`. A task with zero loss (no labelled entry in
    the batch) is left out of the product rather than zeroing it.

    DDP: :math:`L_{\text{GLS}}` is not linear in the task losses, so the average over ranks of each
    rank's own geometric mean is not the geometric mean of the global task losses, nor is its
    gradient. Each rank instead trains on the linearization :math:`\sum_t w_t L_t` with the weights
    :math:`w_t` computed, detached, from the global task losses (one ``all_reduce`` of :math:`T`
    numbers per call). The average over ranks of that is :math:`\sum_t w_t \bar L_t = L_{\text{GLS}}(\bar L)`,
    and its gradient is exactly the gradient of :math:`L_{\text{GLS}}(\bar L)`, the global batch's
    geometric mean: the value and gradient a single process gets on the whole batch. The weights
    depend on this step's losses, so the collective runs on every call (in eval mode too, as for
    ``MultiTaskLoss(normalize="global")``: every rank must call it).

    Args:
        tasks: the task names, in the order of the task losses.
        process_group: the ranks whose losses are averaged. Default: ``None``, the default group.

    Shape:
        - input: a dict with a scalar ``"loss/<task>"`` per task (and optionally ``"loss"``).
        - output: ``{"loss/<task>": ..., "weight/<task>": ..., "loss": ...}``.

    Examples:
        >>> gls = GeometricLossStrategy(["click", "reply"])
        >>> out = gls({"loss/click": torch.tensor(0.8), "loss/reply": torch.tensor(0.05)})
        >>> {name: round(value.item(), 4) for name, value in out.items()}
        {'loss/click': 0.8, 'loss/reply': 0.05, 'weight/click': 0.125, 'weight/reply': 2.0, 'loss': 0.2}
    """

    def __init__(self, tasks: Sequence[str], *, process_group: Optional[distributed.ProcessGroup] = None) -> None:
        super().__init__(tasks, process_group=process_group)

    def weights(self, task_losses: torch.Tensor) -> torch.Tensor:
        return geometric_loss_weights(self._mean_over_ranks(task_losses))
