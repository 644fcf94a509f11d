"""What every weighting method shares: reading the task losses, applying the weights, agreeing across ranks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import nn

from losses import _validation as v
from losses import distributed


class TaskWeighting(distributed.HoldsProcessGroup, nn.Module):
    r"""Base class of the task weightings: turns the task losses into one weighted training loss.

    A method maps the vector of task losses :math:`L \in \mathbb{R}^T` (detached: weights are
    constants for the model) and its own state to task weights :math:`w`, and may add a penalty
    :math:`P` that depends on its own parameters only:

    .. math::
        L_{\text{weighted}} = \sum_{t=1}^{T} w_t L_t + P

    Calling the module on the dict that :class:`~losses.MultiTaskLoss` returns gives a new dict:
    the task entries unchanged, ``"weight/<task>"`` (detached, for logging) and ``"loss"``, the
    weighted combination, which replaces the input's ``"loss"``.

    Under DDP every rank must apply the same weights, or the averaged gradient is the gradient of
    no single loss. A method whose weights read loss values reads the global ones: the average over
    ranks of the ranks' task losses, which is the global batch's task loss when every rank holds
    the same number of labelled entries per task, or with ``MultiTaskLoss(normalize="global")``.
    All ranks then run the same arithmetic on the same all-reduced numbers and get the same bits.

    A non-finite task loss (NaN or infinite: a NaN label, an overflowing logit) is skipped: for this
    call the task counts as a task without a labelled entry, a loss of 0. The method sees 0 (DWA
    adds 0 to its window, GLS leaves the task out of its product), the task adds nothing to
    ``"loss"``, its task loss gets a zero gradient, and the method's state (DWA's window, a learned
    :math:`s_t` and its gradient) stays finite. Its ``"loss/<task>"`` entry keeps the
    non-finite value, so a logger still shows it; ``MultiTaskLoss(check_inputs=True)`` finds the
    entry that caused it. Skipping costs nothing on the host: refusing would have to read the
    value, a wait on the device every step (and on one rank only, a hang of the others).

    A new method is a subclass that implements :meth:`weights` (and :meth:`penalty` if it has
    one); the rest is here.

    Args:
        tasks: the task names, in the order of the task losses.
        process_group: the ranks whose losses are averaged. Default: ``None``, the default group
            when one is initialized, else a single process.
    """

    def __init__(self, tasks: Sequence[str], *, process_group: Optional[distributed.ProcessGroup] = None) -> None:
        super().__init__()
        self.tasks = v.task_names(tasks)
        self.process_group = process_group
        self._loss_keys = tuple(f"loss/{task}" for task in self.tasks)
        self._weight_keys = tuple(f"weight/{task}" for task in self.tasks)
        self._known_keys = frozenset((*self._loss_keys, "loss"))

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks)}"

    def weights(self, task_losses: torch.Tensor) -> torch.Tensor:
        """The task weights, shape ``[T]``, for the detached task losses ``task_losses`` of this call."""
        raise NotImplementedError(f"{type(self).__name__} does not implement `weights`.")

    def penalty(self) -> Optional[torch.Tensor]:
        """A term added to the weighted sum (a learned weighting's regularizer); ``None`` for none."""
        return None

    def forward(self, losses: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # A non-finite task loss is replaced by 0 before anything reads it, not multiplied by a zero
        # weight after: 0 * NaN is NaN, in the value and in the gradient of the weights.
        task_losses = self._task_losses(losses)
        task_losses = torch.where(torch.isfinite(task_losses.detach()), task_losses, 0.0)
        weights = self.weights(task_losses.detach()).to(task_losses.dtype)
        total = (weights * task_losses).sum()
        penalty = self.penalty()
        if penalty is not None:
            total = total + penalty.to(total.dtype)
        out = {key: losses[key] for key in self._loss_keys}
        out.update(zip(self._weight_keys, weights.detach().unbind(), strict=True))
        out["loss"] = total
        return out

    def _task_losses(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The ``"loss/<task>"`` entries stacked in task order, after checking the keys and shapes (free)."""
        if not isinstance(losses, Mapping):
            raise TypeError(f"Expected `losses` to be a dict of task losses, got {type(losses).__name__}.")
        if not self._known_keys.issuperset(losses) or any(key not in losses for key in self._loss_keys):
            missing = [key for key in self._loss_keys if key not in losses]
            extra = [key for key in losses if key not in self._known_keys]
            raise ValueError(
                f"Expected `losses` to have the keys {list(self._loss_keys)} (and optionally 'loss'); "
                f"missing {missing}, extra {extra}."
            )
        values = [losses[key] for key in self._loss_keys]
        if any(not isinstance(value, torch.Tensor) or value.ndim != 0 for value in values):
            shapes = {key: tuple(getattr(value, "shape", ("not a tensor",))) for key, value in losses.items()}
            raise ValueError(f"Expected every task loss to be a scalar tensor, got {shapes}.")
        return torch.stack(values)

    def _mean_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """The average of ``tensor`` over the ranks of the group: one ``all_reduce``; a copy on one process."""
        group = self._group.get()
        return distributed.all_reduce_sum(tensor, group) / distributed.world_size(group)


def check_weighting(weighting: Optional[TaskWeighting], tasks: tuple[str, ...]) -> Optional[TaskWeighting]:
    """Return ``weighting`` if it is ``None`` or a :class:`TaskWeighting` of exactly ``tasks``, else raise."""
    if weighting is None:
        return None
    if not isinstance(weighting, TaskWeighting):
        raise TypeError(
            f"Expected `weighting` to be a TaskWeighting from losses.weighting, got {type(weighting).__name__}."
        )
    if weighting.tasks != tasks:
        raise ValueError(
            f"Expected `weighting` to weigh the tasks {list(tasks)} in this order, got {list(weighting.tasks)}."
        )
    return weighting
