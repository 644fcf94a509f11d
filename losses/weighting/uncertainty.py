"""Uncertainty weighting (Kendall, Gal and Cipolla, 2018): a learned log-variance per task."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from losses import distributed
from losses.weighting._base import TaskWeighting

#: The factor :math:`c_t` of each form: :math:`c_t (e^{-s_t} L_t + s_t)`.
FORM_FACTORS = {"classification": 1.0, "regression": 0.5}


def _initial_log_variances(init: Union[float, Sequence[float]], num_tasks: int) -> torch.Tensor:
    given: Any = init  # typed float, but NumPy scalars are numbers too (as for losses.Task)
    if not isinstance(given, bool) and isinstance(given, numbers.Real):
        values = [float(given)] * num_tasks
    elif isinstance(given, Sequence) and all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in given):
        values = [float(value) for value in given]
    else:
        raise TypeError(f"Expected `init` to be a float or one float per task, got {init!r}.")
    if len(values) != num_tasks:
        raise ValueError(f"Expected `init` to have one value per task ({num_tasks}), got {len(values)}.")
    if not all(math.isfinite(value) for value in values):
        raise ValueError(f"Expected `init` to be finite, got {values}.")
    return torch.tensor(values)


class UncertaintyWeighting(TaskWeighting):
    r"""Weighs each task by a learned precision :math:`e^{-s_t}`, with :math:`s_t` its log-variance.

    .. math::
        L_{\text{weighted}} = \sum_{t=1}^{T} c_t \left( e^{-s_t} L_t + s_t \right),
        \qquad c_t = 1 \text{ (classification form)}, \quad c_t = \tfrac{1}{2} \text{ (regression form)}

    The :math:`s_t` are an ``nn.Parameter`` (``log_variance``, shape ``[T]``) trained with the
    model: put them in the optimizer. For a fixed :math:`L_t` the minimum over :math:`s_t` is at
    :math:`s_t = \log L_t`, so a task's weight :math:`c_t e^{-s_t}` tends to :math:`c_t / L_t`: a task
    with a large (noisy) loss is weighted down. The regression form is Kendall et al.'s
    :math:`\frac{1}{2\sigma_t^2} L_t + \log \sigma_t` with :math:`s_t = \log \sigma_t^2`; the
    classification form is twice it, the form most implementations use for every task. Mixing the
    two gives a regression task half the weight of a classification task with the same loss.

    The weights read no loss values, so there is no collective of its own: under DDP the
    :math:`s_t` stay equal on every rank as long as they are parameters of the module DDP wraps
    (for example as ``MultiTaskLoss(..., weighting=...)`` inside the model), because DDP averages
    their gradients like any other. The penalty :math:`\sum_t c_t s_t` is the same on every rank.

    Args:
        tasks: the task names, in the order of the task losses.
        init: the initial :math:`s_t`, one float for all tasks or one per task. Default: ``0.0``
            (weights :math:`c_t`).
        regression: the tasks that use the regression form. Default: ``()``, none.
        process_group: unused (no collective); accepted for a uniform signature. Default: ``None``.

    Shape:
        - input: a dict with a scalar ``"loss/<task>"`` per task (and optionally ``"loss"``).
        - output: ``{"loss/<task>": ..., "weight/<task>": ..., "loss": ...}``; the weights are
          :math:`c_t e^{-s_t}`, detached.

    Examples:
        >>> weighting = UncertaintyWeighting(["click", "reply"], init=[0.0, 1.0])
        >>> out = weighting({"loss/click": torch.tensor(0.5), "loss/reply": torch.tensor(2.0)})
        >>> {name: round(value.item(), 4) for name, value in out.items()}
        {'loss/click': 0.5, 'loss/reply': 2.0, 'weight/click': 1.0, 'weight/reply': 0.3679, 'loss': 2.2358}
    """

    form_factor: torch.Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        init: Union[float, Sequence[float]] = 0.0,
        *,
        regression: Sequence[str] = (),
        process_group: Optional[distributed.ProcessGroup] = None,
    ) -> None:
        super().__init__(tasks, process_group=process_group)
        self.log_variance = nn.Parameter(_initial_log_variances(init, len(self.tasks)))
        if isinstance(regression, str) or not isinstance(regression, Sequence):
            raise TypeError(f"Expected `regression` to be a sequence of task names, got {type(regression).__name__}.")
        unknown = [name for name in regression if name not in self.tasks]
        if unknown:
            raise ValueError(f"Expected `regression` to name tasks of {list(self.tasks)}, got unknown {unknown}.")
        forms = ["regression" if task in regression else "classification" for task in self.tasks]
        self.register_buffer("form_factor", torch.tensor([FORM_FACTORS[form] for form in forms]))

    def weights(self, task_losses: torch.Tensor) -> torch.Tensor:
        return self.form_factor * torch.exp(-self.log_variance)

    def penalty(self) -> torch.Tensor:
        return (self.form_factor * self.log_variance).sum()
