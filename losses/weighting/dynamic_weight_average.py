"""Dynamic weight average (Liu, Johns and Davison, 2019), over windows of steps instead of epochs."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from losses import distributed
from losses.weighting._base import TaskWeighting


def dynamic_weight_average_weights(last: torch.Tensor, before_last: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""DWA's weights from the mean task losses of the last two windows, shape ``[T]``.

    .. math::
        w_t = T \operatorname{softmax}_t\!\left(\frac{r_t}{\tau}\right), \qquad
        r_t = \frac{\bar L_t(k-1)}{\bar L_t(k-2)}

    A ratio with a zero mean loss (a task never labelled in a window) is taken as 1: no trend.

    Example:
        >>> dynamic_weight_average_weights(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 1.0]), 2.0)
        tensor([0.8756, 1.1244])
    """
    known = (last > 0) & (before_last > 0)
    ratio = torch.where(known, last / torch.where(known, before_last, 1), 1)
    return last.shape[0] * torch.softmax(ratio / temperature, dim=0)


class DynamicWeightAverage(TaskWeighting):
    r"""Weighs up the tasks whose loss falls slowest, from the loss trend of the last two windows.

    Training is cut into windows of ``window`` steps (the paper's epochs; a ranking model often
    trains on a stream with no epochs). In window :math:`k \ge 2` the weights are

    .. math::
        w_t = T \frac{\exp(r_t / \tau)}{\sum_{i} \exp(r_i / \tau)}, \qquad
        r_t = \frac{\bar L_t(k-1)}{\bar L_t(k-2)}

    where :math:`\bar L_t(j)` is the mean over window :math:`j`'s steps of the global task loss, and
    :math:`\tau` the ``temperature``; in windows 0 and 1 every weight is 1. The weights sum to
    :math:`T`, as in the paper. A larger temperature makes them more equal.

    Only calls in training mode (``module.train()``) are steps: they record the loss and move the
    window. In eval mode the current weights are applied and nothing is recorded.

    Cost and DDP: each rank adds its detached task losses to a running sum; at the end of a
    window one ``all_reduce`` of :math:`T` numbers gives every rank the same window means, and so the
    same weights to the last bit. Nothing else is communicated. The running sum differs by rank, so
    it is kept out of DDP's buffer broadcast (which would overwrite it with rank 0's); it is still
    saved in ``state_dict`` (each rank its own) and moved by ``.to()``. The window means and the
    weights are buffers (``window_mean``, ``[2, T]``, the last window first; ``weight``, ``[T]``);
    the step count is host state in ``state_dict``, so that the window's end is known without
    waiting on the device. Loading one rank's checkpoint on every rank mid-window is safe: the
    weights stay the same on all ranks, only that window's mean counts the saving rank's part for
    every rank.

    A step where a task has no labelled entry on any rank adds a 0 to its window; if that happens in
    a steady share of steps it scales both windows alike and cancels in the ratio.

    Args:
        tasks: the task names, in the order of the task losses.
        temperature: :math:`\tau > 0`. Default: ``2.0``, the paper's.
        window: steps per window, a positive int. Default: ``100``.
        process_group: the ranks whose losses are averaged. Default: ``None``, the default group.

    Shape:
        - input: a dict with a scalar ``"loss/<task>"`` per task (and optionally ``"loss"``).
        - output: ``{"loss/<task>": ..., "weight/<task>": ..., "loss": ...}``.

    Examples:
        >>> dwa = DynamicWeightAverage(["click", "reply"], window=1)
        >>> for click, reply in [(0.8, 0.2), (0.4, 0.2)]:  # click's loss halves, reply's stays
        ...     out = dwa({"loss/click": torch.tensor(click), "loss/reply": torch.tensor(reply)})
        >>> out = dwa({"loss/click": torch.tensor(0.4), "loss/reply": torch.tensor(0.2)})
        >>> round(out["weight/click"].item(), 4), round(out["weight/reply"].item(), 4)
        (0.8756, 1.1244)
    """

    window_mean: torch.Tensor
    weight: torch.Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        temperature: float = 2.0,
        window: int = 100,
        *,
        process_group: Optional[distributed.ProcessGroup] = None,
    ) -> None:
        super().__init__(tasks, process_group=process_group)
        # Typed float and int, but NumPy scalars are numbers too (as for losses.Task).
        given: tuple[Any, Any] = (temperature, window)
        if isinstance(given[0], bool) or not isinstance(given[0], numbers.Real):
            raise TypeError(f"Expected `temperature` to be a positive float, got {type(temperature).__name__}.")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"Expected `temperature` to be positive and finite, got {temperature!r}.")
        if isinstance(given[1], bool) or not isinstance(given[1], numbers.Integral):
            raise TypeError(f"Expected `window` to be a positive int, got {type(window).__name__}.")
        if window < 1:
            raise ValueError(f"Expected `window` to be a positive int, got {window}.")
        self.temperature = float(temperature)
        self.window = int(window)  # a NumPy integer as a plain int: it is saved and compared on the host
        num_tasks = len(self.tasks)
        self.register_buffer("window_mean", torch.zeros(2, num_tasks))
        self.register_buffer("weight", torch.ones(num_tasks))
        self.steps = 0
        # This rank's sum of the current window: not a buffer (see the class docstring).
        self._window_sum = torch.zeros(num_tasks)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}, window={self.window}"

    def weights(self, task_losses: torch.Tensor) -> torch.Tensor:
        # A copy: the buffer may be updated below while this step's graph still holds its weights.
        weights = self.weight.clone()
        if self.training:
            # The step count is host state: traced, it would be a constant of the compiled graph,
            # recompiled at every step until torch.compile gives up. It runs outside the graph.
            (_record_outside_graph if torch.compiler.is_compiling() else DynamicWeightAverage._record)(
                self, task_losses
            )
        return weights

    def _record(self, task_losses: torch.Tensor) -> None:
        self._window_sum += task_losses
        self.steps += 1
        if self.steps % self.window:
            return
        means = self._mean_over_ranks(self._window_sum) / self.window
        self.window_mean.copy_(torch.stack([means.to(self.window_mean.dtype), self.window_mean[0]]))
        self._window_sum.zero_()
        if self.steps >= 2 * self.window:
            self.weight.copy_(
                dynamic_weight_average_weights(self.window_mean[0], self.window_mean[1], self.temperature)
            )

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> DynamicWeightAverage:
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        self._window_sum = fn(self._window_sum)
        return self

    def get_extra_state(self) -> dict[str, Any]:
        return {"steps": self.steps, "window_sum": self._window_sum.detach().clone()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self._window_sum = state["window_sum"].to(self._window_sum)


#: ``_record`` for a call inside ``torch.compile``: a graph break instead of a graph per step.
_record_outside_graph = torch.compiler.disable(DynamicWeightAverage._record)  # type: ignore[no-untyped-call]
