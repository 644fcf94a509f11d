"""torchmetrics metrics that log the detached loss of the whole global batch."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional, SupportsFloat, Union

import torch
from torch import nn

from losses import _validation as v
from losses._dict_metric import DictSumMetric
from losses._metric_sync import SumMetric, sync_sum_metrics, values_on

MetricReduction = Literal["mean", "sum"]
#: A real number (Python or NumPy scalar, not bool) or a one-element real tensor.
Weight = Union[float, SupportsFloat, torch.Tensor]

_INF = math.inf


def _python_weight(weight: Any) -> float:
    # numbers.Real takes Python and NumPy ints and floats (and Fractions); bool is an int to
    # Python but never a weight, and NumPy's bool_ is not a Real.
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        kind = type(weight)
        name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        raise TypeError(f"Expected `weight` to be a number or a one-element tensor, got {name}.")
    value = float(weight)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Expected `weight` to be non-negative and finite, got {weight!r}.")
    return value


def _tensor_weight(weight: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Shape and dtype checks are free; the value is checked on the device (see `_record`).
    if weight.numel() != 1:
        raise ValueError(f"Expected `weight` to be a single number, got shape {tuple(weight.shape)}.")
    if weight.dtype == torch.bool or weight.is_complex():
        raise TypeError(
            f"Expected `weight` to be a number or a one-element tensor of real numbers, got {weight.dtype}."
        )
    return values_on("weight", weight, device).reshape(())


def _record(
    sums: torch.Tensor,
    total_weight: torch.Tensor,
    invalid: torch.Tensor,
    values: torch.Tensor,
    weight: Weight,
    name: str,
) -> tuple[torch.Tensor, Union[float, torch.Tensor]]:
    """``sums += values * weight`` and ``total_weight += weight`` in place, without reading a value.

    One rule for every weight: a non-negative finite number. A Python number is checked here; a
    tensor is checked on the device, where a bad one adds nothing but one to ``invalid``, which
    ``compute()`` reports. A zero weight adds nothing, even to a NaN loss (NaN * 0 is NaN).
    Returns ``values`` in float64 on the states' device and the weight that was counted; ``name``
    is the argument ``values`` came from, for errors.
    """
    v.check_real_tensors(**{name: values})  # a complex loss would lose its imaginary part
    values = values_on(name, values, sums.device)
    if not isinstance(weight, torch.Tensor):
        w = _python_weight(weight)
        if w > 0:
            sums.add_(values, alpha=w)
            total_weight.add_(w)
        return values, w
    given = _tensor_weight(weight, sums.device)
    valid = (given >= 0) & (given < _INF)  # False for NaN, inf and negatives
    counted = torch.where(valid, given, 0.0)
    sums.addcmul_(torch.where(counted > 0, values, 0.0), counted)
    total_weight.add_(counted)
    invalid.add_(~valid)
    return values, counted


def _weighted_compute(
    weighted_sum: torch.Tensor, total_weight: torch.Tensor, invalid: torch.Tensor, reduction: MetricReduction, name: str
) -> torch.Tensor:
    if invalid.is_meta:  # shape tracing: no values to check
        return weighted_sum if reduction == "sum" else weighted_sum / total_weight
    bad = int(invalid.item())
    if bad:
        raise ValueError(
            f"Expected `weight` to be non-negative and finite, got {bad} tensor weight(s) that are not in the "
            f"updates of {name} since its last reset (on all ranks it syncs). They added nothing; find the "
            "update that passes them, then reset() the metric."
        )
    if reduction == "sum":
        return weighted_sum
    if not bool(total_weight > 0):
        warnings.warn(
            f"{name}.compute(): no loss with a positive weight was recorded on any rank; returning NaN.",
            UserWarning,
            stacklevel=3,
        )
    return weighted_sum / total_weight


class GlobalLoss(SumMetric):
    r"""Sample-weighted mean (or sum) of a detached loss over all updates on all ranks.

    Each ``update(loss, weight)`` records a loss that stands for ``weight`` samples, usually the
    batch size. ``compute()`` returns

    .. math::
        \bar L = \frac{\sum_{r} \sum_{k} w_{rk} L_{rk}}{\sum_r \sum_k w_{rk}}

    over the updates :math:`k` of every rank :math:`r`, which is the exact mean loss of the global
    batch even when ranks see different batch sizes. ``reduction="sum"`` returns the numerator.
    Both sums are float64 states, also when the model around the metric is cast to another dtype,
    so a million updates of small values lose no precision. A sync is one ``all_reduce`` of all
    states; ``state_dict()`` runs no collective, and a checkpoint resumes exactly on any number of
    ranks when it was written right after a ``compute()`` (see :doc:`/logging`).

    ``update`` never reads a tensor's value on the host, so it does not wait on the device. A
    weight of 0 adds nothing, even to a NaN loss. A negative or non-finite Python weight is a
    ``ValueError`` at once; the same tensor weight adds nothing and makes ``compute()`` raise that
    ``ValueError``, so the check costs no device sync. ``compute()`` with no weight recorded anywhere
    returns NaN with a warning (``mean``) or 0 (``sum``), as torchmetrics' aggregators do.

    As input to ``forward`` and ``update``:
        - ``loss``: a one-element tensor (any dtype, any device); it is detached.
        - ``weight``: a non-negative finite number or one-element tensor (not bool). Default: ``1.0``.

    As output of ``forward`` and ``compute``:
        - a float64 scalar tensor; ``forward`` gives the value of that batch alone (synced across
          ranks with ``dist_sync_on_step=True``). After ``update`` the batch value is also what
          Lightning logs with ``self.log(name, metric, on_step=True)``: this rank's own batch.

    Args:
        reduction: ``"mean"`` | ``"sum"``. Default: ``"mean"``.
        metric_kwargs: passed to :class:`torchmetrics.Metric` (``dist_sync_on_step``,
            ``process_group``, ``sync_on_compute``, ``dist_sync_fn``, ...).

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
    invalid_weights: torch.Tensor

    def __init__(self, reduction: MetricReduction = "mean", **metric_kwargs: Any) -> None:
        super().__init__(**metric_kwargs)
        self.reduction: MetricReduction = v.check_choice("reduction", reduction, ("mean", "sum"))  # type: ignore[assignment]
        self.add_sum_state("weighted_sum")
        self.add_sum_state("total_weight")
        self.add_sum_state("invalid_weights")

    def update(self, loss: torch.Tensor, weight: Weight = 1.0) -> None:
        v.check_tensor("loss", loss)
        if loss.numel() != 1:
            raise ValueError(f"Expected `loss` to be a single value, got shape {tuple(loss.shape)}.")
        value, counted = _record(
            self.weighted_sum, self.total_weight, self.invalid_weights, loss.reshape(()), weight, "loss"
        )
        # The batch value, for Lightning's on_step logging of a metric fed by update().
        self._forward_cache = value if self.reduction == "mean" else value * counted  # type: ignore[assignment]

    def compute(self) -> torch.Tensor:
        return _weighted_compute(
            self.weighted_sum, self.total_weight, self.invalid_weights, self.reduction, type(self).__name__
        )


class MultiTaskGlobalLoss(DictSumMetric):
    r""":class:`GlobalLoss` for every entry of the dict that :class:`~losses.MultiTaskLoss` returns.

    ``update(losses, weight)`` takes ``{"loss/<task>": ..., "loss": ...}``; ``compute()`` returns a
    dict with the same keys in the same order, each the sample-weighted mean (or sum) over all
    updates on all ranks:

    .. math::
        \bar L_k = \frac{\sum_{r} \sum_{i} w_{ri} L_{ri,k}}{\sum_r \sum_i w_{ri}}
        \quad \text{for each key } k.

    All tasks live in one ``[T + 1]`` state tensor, and a sync is one ``all_reduce`` for 1 task or
    500. Weights, dtypes and checkpoints behave as in :class:`GlobalLoss`.

    The ``"weight/<task>"`` entries that a task weighting adds to the dict
    (``MultiTaskLoss(..., weighting=...)``) are accepted and not recorded: they are the same on
    every rank, so log them as they are, each step (see :doc:`/logging`). The ``"ranking/<task>"``
    entries of ranking tasks are accepted and not recorded either: each is already inside its
    task's ``"loss/<task>"``; log them on their own if you want them (see :doc:`/ranking_losses`).

    The metric is also a read-only mapping from each key to a small metric of that entry alone
    (``metric["loss/fav"]``, ``metric.items()``), so ``self.log_dict(metric)`` in Lightning logs
    every entry. Those entry metrics share this metric's cached ``compute()``: logging all of them
    costs one sync, not ``T + 1``. Their ``reset()`` resets this metric.

    As input to ``forward`` and ``update``:
        - ``losses``: a mapping with the keys ``"loss/<task>"`` for each task and ``"loss"``, each a
          one-element tensor (shapes ``[]`` and ``[1]`` may mix), and optionally
          ``"weight/<task>"`` and ``"ranking/<task>"`` entries, which are ignored; a missing key, or any other key, is a
          ``ValueError`` that names them.
        - ``weight``: a non-negative finite number or one-element tensor, the samples the batch
          stands for.

    As output of ``forward`` and ``compute``:
        - a dict of float64 scalar tensors with the keys ``"loss/<task>"`` and ``"loss"``.

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
        >>> round(metric["loss/reply"].compute().item(), 4)
        0.5
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    weighted_sums: torch.Tensor
    total_weight: torch.Tensor
    invalid_weights: torch.Tensor

    def __init__(self, tasks: Sequence[str], reduction: MetricReduction = "mean", **metric_kwargs: Any) -> None:
        super().__init__(**metric_kwargs)
        self.tasks = v.task_names(tasks)
        self.reduction: MetricReduction = v.check_choice("reduction", reduction, ("mean", "sum"))  # type: ignore[assignment]
        self.set_result_keys((*(f"loss/{task}" for task in self.tasks), "loss"))
        self._key_set = frozenset(self.result_keys)
        # What a task weighting adds beside the losses; accepted, not recorded.
        self._accepted_keys = self._key_set | {
            f"{kind}/{task}" for kind in ("weight", "ranking") for task in self.tasks
        }
        self.add_sum_state("weighted_sums", len(self.result_keys))
        self.add_sum_state("total_weight")
        self.add_sum_state("invalid_weights")
        self._step_values: Optional[torch.Tensor] = None

    def update(self, losses: Mapping[str, torch.Tensor], weight: Weight = 1.0) -> None:
        if not isinstance(losses, Mapping):
            raise TypeError(f"Expected `losses` to be a dict of loss tensors, got {type(losses).__name__}.")
        keys = losses.keys()
        if keys != self._key_set and not (self._key_set <= keys <= self._accepted_keys):
            missing = [key for key in self.result_keys if key not in losses]
            extra = [key for key in losses if key not in self._accepted_keys]
            raise ValueError(
                f"Expected `losses` to have the keys {list(self.result_keys)} (and optionally the "
                f"'weight/<task>' entries of a task weighting); missing {missing}, extra {extra}."
            )
        recorded, counted = _record(
            self.weighted_sums,
            self.total_weight,
            self.invalid_weights,
            _single_values(losses, self.result_keys),
            weight,
            "losses",
        )
        # The batch values, packed, for the entries' on_step logging (forward() sets its own).
        self.__dict__["_step_values"] = recorded if self.reduction == "mean" else recorded * counted

    def compute_values(self) -> torch.Tensor:
        return _weighted_compute(
            self.weighted_sums, self.total_weight, self.invalid_weights, self.reduction, type(self).__name__
        )

    def update_step_values(self) -> Optional[torch.Tensor]:
        return self._step_values

    def reset(self) -> None:
        super().reset()
        self._step_values = None

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks)}, reduction={self.reduction!r}"


def _single_values(losses: Mapping[str, torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
    """The entries ``keys`` of ``losses`` as one vector; each must be a one-element tensor."""
    entries = [losses[key] for key in keys]
    try:
        with torch.no_grad():
            values = torch.stack(entries)  # one op when every entry has the same shape, the usual case
    except (RuntimeError, TypeError):
        values = None
    if values is not None and values.numel() == len(entries):
        return values.reshape(-1)
    if not all(isinstance(entry, torch.Tensor) and entry.numel() == 1 for entry in entries):
        shapes = {
            key: tuple(entry.shape) if isinstance(entry, torch.Tensor) else type(entry).__name__
            for key, entry in zip(keys, entries, strict=True)
        }
        raise ValueError(f"Expected every entry of `losses` to be a single-value tensor, got {shapes}.")
    try:
        with torch.no_grad():  # one-element entries of different shapes, [] and [1] say
            return torch.stack([entry.reshape(()) for entry in entries])
    except RuntimeError as err:
        raise ValueError(f"Expected the entries of `losses` to be stackable single-value tensors: {err}") from err


def sync_for_checkpoint(module: nn.Module) -> None:
    r"""Sync every metric of this library inside ``module`` across ranks, so that rank 0 alone can save them.

    Call it on every rank, right before the rank that writes the checkpoint calls ``state_dict()``.
    It runs one ``all_reduce`` for all the metrics (one per process group and device), whatever
    their number; the metrics then remember the global sums of this moment, and a checkpoint of
    any one rank holds everything recorded on every rank. Loading that file on every rank of any
    world size resumes exactly: rank 0 counts the global sums, the other ranks start from zero.
    ``compute()`` on every rank does the same for one metric; this is for saves that come without
    one, such as a save in the middle of an epoch. It does nothing without a process group.
    Metrics built with ``sync_on_compute=False`` are left out: their values are per rank.
    In Lightning, :class:`losses.lightning.SyncMetricsOnCheckpoint` calls it for you.

    Args:
        module: a model, a metric, or any module holding :class:`GlobalLoss` or
            :class:`MultiTaskGlobalLoss` metrics (at any depth).

    Example:
        >>> model = torch.nn.Module()
        >>> model.train_loss = GlobalLoss()
        >>> model.train_loss.update(torch.tensor(0.5), weight=4)
        >>> sync_for_checkpoint(model)  # on every rank; a no-op on one process
        >>> resumed = torch.nn.Module()
        >>> resumed.train_loss = GlobalLoss()
        >>> _ = resumed.load_state_dict(model.state_dict())
        >>> resumed.train_loss.compute()
        tensor(0.5000, dtype=torch.float64)
    """
    if not isinstance(module, nn.Module):
        # A list or dict of metrics would fail deep inside with an AttributeError.
        raise TypeError(
            f"Expected `module` to be a torch.nn.Module (a model or a metric), got {type(module).__name__}; "
            "put several metrics in an nn.ModuleList or nn.ModuleDict."
        )
    sync_sum_metrics(metric for metric in module.modules() if isinstance(metric, SumMetric))
