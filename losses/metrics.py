"""torchmetrics metrics that log the detached loss of the whole global batch."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import torch
from torchmetrics import Metric

from losses import _validation as v

MetricReduction = Literal["mean", "sum"]
Weight = Union[float, int, torch.Tensor]

_STATE_DTYPE = torch.float64


def _checked_weight(weight: Weight, device: torch.device) -> Union[float, torch.Tensor]:
    """``weight`` as a float (checked) or a float64 scalar tensor on ``device`` (not read).

    A Python number stays a number: it then enters the state update as a kernel argument, where
    a tensor made from it would be a host-to-device copy on every update.
    """
    if isinstance(weight, torch.Tensor):
        if weight.numel() != 1:
            raise ValueError(f"Expected `weight` to be a single number, got shape {tuple(weight.shape)}.")
        return weight.detach().to(device=device, dtype=_STATE_DTYPE).reshape(())
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"Expected `weight` to be a number or a one-element tensor, got {type(weight).__name__}.")
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"Expected `weight` to be non-negative and finite, got {weight!r}.")
    return float(weight)


def _accumulate(sums: torch.Tensor, total_weight: torch.Tensor, values: torch.Tensor, weight: Weight) -> None:
    """``sums += values * weight`` and ``total_weight += weight``, in place, without reading a value."""
    w = _checked_weight(weight, sums.device)
    values = values.detach().to(device=sums.device, dtype=_STATE_DTYPE)
    if isinstance(w, torch.Tensor):
        sums.addcmul_(values, w)
    else:
        sums.add_(values, alpha=w)
    total_weight.add_(w)


def _weighted_compute(
    weighted_sum: torch.Tensor, total_weight: torch.Tensor, reduction: MetricReduction, name: str
) -> torch.Tensor:
    if reduction == "sum":
        return weighted_sum
    if not bool(total_weight > 0):
        warnings.warn(
            f"{name}.compute(): no loss with a positive weight was recorded on any rank; returning NaN.",
            UserWarning,
            stacklevel=3,
        )
    return weighted_sum / total_weight


class GlobalLoss(Metric):
    r"""Sample-weighted mean (or sum) of a detached loss over all updates on all ranks.

    Each ``update(loss, weight)`` records a loss that stands for ``weight`` samples, usually the
    batch size. ``compute()`` returns

    .. math::
        \bar L = \frac{\sum_{r} \sum_{k} w_{rk} L_{rk}}{\sum_r \sum_k w_{rk}}

    over the updates :math:`k` of every rank :math:`r`, which is the exact mean loss of the global
    batch even when ranks see different batch sizes. ``reduction="sum"`` returns the numerator.
    Both sums are float64 states reduced by torchmetrics with ``dist_reduce_fx="sum"``, so a
    million updates of small values lose no precision, and they are persistent: a resumed job
    that loads the ``state_dict`` continues its running numbers.

    ``update`` never reads a tensor's value on the host, so it does not wait on the device.
    ``compute()`` with no weight recorded anywhere returns NaN with a warning (``mean``) or 0
    (``sum``), as torchmetrics' aggregators do.

    As input to ``forward`` and ``update``:
        - ``loss``: a one-element tensor (any dtype, any device); it is detached.
        - ``weight``: a non-negative number or one-element tensor. Default: ``1.0``.

    As output of ``forward`` and ``compute``:
        - a float64 scalar tensor; ``forward`` gives the value of that batch alone (synced across
          ranks with ``dist_sync_on_step=True``).

    Args:
        reduction: ``"mean"`` | ``"sum"``. Default: ``"mean"``.
        metric_kwargs: passed to :class:`torchmetrics.Metric` (``dist_sync_on_step``,
            ``process_group``, ``sync_on_compute``, ...).

    Example:
        >>> metric = GlobalLoss()
        >>> metric.update(torch.tensor(0.5), weight=3)
        >>> metric.update(torch.tensor(0.1), weight=1)
        >>> metric.compute()
        tensor(0.4000, dtype=torch.float64)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    weighted_sum: torch.Tensor
    total_weight: torch.Tensor

    def __init__(self, reduction: MetricReduction = "mean", **metric_kwargs: Any) -> None:
        super().__init__(**metric_kwargs)
        self.reduction: MetricReduction = v.check_choice("reduction", reduction, ("mean", "sum"))  # type: ignore[assignment]
        zero = torch.zeros((), dtype=_STATE_DTYPE)
        self.add_state("weighted_sum", zero.clone(), dist_reduce_fx="sum", persistent=True)
        self.add_state("total_weight", zero.clone(), dist_reduce_fx="sum", persistent=True)

    def update(self, loss: torch.Tensor, weight: Weight = 1.0) -> None:
        v.check_tensor("loss", loss)
        if loss.numel() != 1:
            raise ValueError(f"Expected `loss` to be a single value, got shape {tuple(loss.shape)}.")
        _accumulate(self.weighted_sum, self.total_weight, loss.reshape(()), weight)

    def compute(self) -> torch.Tensor:
        return _weighted_compute(self.weighted_sum, self.total_weight, self.reduction, type(self).__name__)


class MultiTaskGlobalLoss(Metric):
    r""":class:`GlobalLoss` for every entry of the dict that :class:`~losses.MultiTaskLoss` returns.

    ``update(losses, weight)`` takes ``{"loss/<task>": ..., "loss": ...}``; ``compute()`` returns a
    dict with the same keys in the same order, each the sample-weighted mean (or sum) over all
    updates on all ranks:

    .. math::
        \bar L_k = \frac{\sum_{r} \sum_{i} w_{ri} L_{ri,k}}{\sum_r \sum_i w_{ri}}
        \quad \text{for each key } k.

    All tasks live in one ``[T + 1]`` state tensor, so a sync runs the same collectives for 1 task
    or 500.

    As input to ``forward`` and ``update``:
        - ``losses``: a mapping with exactly the keys ``"loss/<task>"`` for each task and ``"loss"``;
          missing or extra keys are a ``ValueError`` that names them.
        - ``weight``: a non-negative number or one-element tensor, the samples the batch stands for.

    As output of ``forward`` and ``compute``:
        - a dict of float64 scalar tensors with the keys of the input.

    Args:
        tasks: the task names, as given to :class:`~losses.MultiTaskLoss`.
        reduction: ``"mean"`` | ``"sum"``. Default: ``"mean"``.
        metric_kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = MultiTaskGlobalLoss(["fav", "reply"])
        >>> def losses(fav, reply):
        ...     return {"loss/fav": torch.tensor(fav), "loss/reply": torch.tensor(reply), "loss": torch.tensor(0.4)}
        >>> metric.update(losses(0.2, 0.6), weight=3)
        >>> metric.update(losses(0.6, 0.2), weight=1)
        >>> {name: round(value.item(), 4) for name, value in metric.compute().items()}
        {'loss/fav': 0.3, 'loss/reply': 0.5, 'loss': 0.4}
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    weighted_sums: torch.Tensor
    total_weight: torch.Tensor

    def __init__(self, tasks: Sequence[str], reduction: MetricReduction = "mean", **metric_kwargs: Any) -> None:
        super().__init__(**metric_kwargs)
        self.tasks = v.task_names(tasks)
        self.reduction: MetricReduction = v.check_choice("reduction", reduction, ("mean", "sum"))  # type: ignore[assignment]
        self.result_keys = (*(f"loss/{task}" for task in self.tasks), "loss")
        self._key_set = frozenset(self.result_keys)
        self.add_state("weighted_sums", torch.zeros(len(self.result_keys), dtype=_STATE_DTYPE), "sum", persistent=True)
        self.add_state("total_weight", torch.zeros((), dtype=_STATE_DTYPE), "sum", persistent=True)

    def update(self, losses: Mapping[str, torch.Tensor], weight: Weight = 1.0) -> None:
        if not isinstance(losses, Mapping):
            raise TypeError(f"Expected `losses` to be a dict of loss tensors, got {type(losses).__name__}.")
        if losses.keys() != self._key_set:
            missing = [key for key in self.result_keys if key not in losses]
            extra = [key for key in losses if key not in self._key_set]
            raise ValueError(
                f"Expected `losses` to have the keys {list(self.result_keys)}; missing {missing}, extra {extra}."
            )
        try:
            with torch.no_grad():
                values = torch.stack([losses[key] for key in self.result_keys])
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"Expected every entry of `losses` to be a tensor of one shape: {err}") from err
        if values.numel() != len(self.result_keys):
            shapes = {key: tuple(losses[key].shape) for key in self.result_keys}
            raise ValueError(f"Expected every entry of `losses` to be a single-value tensor, got {shapes}.")
        _accumulate(self.weighted_sums, self.total_weight, values.reshape(-1), weight)

    def compute(self) -> dict[str, torch.Tensor]:
        values = _weighted_compute(self.weighted_sums, self.total_weight, self.reduction, type(self).__name__)
        return dict(zip(self.result_keys, values.unbind(), strict=True))
