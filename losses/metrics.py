"""torchmetrics metrics that log the detached loss of the whole global batch."""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from types import FrameType
from typing import Any, Literal, Optional, Union

import torch
from torch import nn
from torchmetrics import Metric

from losses import _validation as v
from losses._metric_sync import SUM_DTYPE, SumMetric, sync_sum_metrics

MetricReduction = Literal["mean", "sum"]
Weight = Union[float, int, torch.Tensor]

_INF = math.inf


def _python_weight(weight: Union[float, int]) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"Expected `weight` to be a number or a one-element tensor, got {type(weight).__name__}.")
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"Expected `weight` to be non-negative and finite, got {weight!r}.")
    return float(weight)


def _tensor_weight(weight: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Shape and dtype checks are free; the value is checked on the device (see `_record`).
    if weight.numel() != 1:
        raise ValueError(f"Expected `weight` to be a single number, got shape {tuple(weight.shape)}.")
    if weight.dtype == torch.bool or weight.is_complex():
        raise TypeError(
            f"Expected `weight` to be a number or a one-element tensor of real numbers, got {weight.dtype}."
        )
    return weight.detach().to(device=device, dtype=SUM_DTYPE).reshape(())


def _record(
    sums: torch.Tensor, total_weight: torch.Tensor, invalid: torch.Tensor, values: torch.Tensor, weight: Weight
) -> tuple[torch.Tensor, Union[float, torch.Tensor]]:
    """``sums += values * weight`` and ``total_weight += weight`` in place, without reading a value.

    One rule for every weight: a non-negative finite number. A Python number is checked here; a
    tensor is checked on the device, where a bad one adds nothing but one to ``invalid``, which
    ``compute()`` reports. A zero weight adds nothing, even to a NaN loss (NaN * 0 is NaN).
    Returns ``values`` in float64 on the states' device and the weight that was counted.
    """
    values = values.detach().to(device=sums.device, dtype=SUM_DTYPE)
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
        value, counted = _record(self.weighted_sum, self.total_weight, self.invalid_weights, loss.reshape(()), weight)
        # The batch value, for Lightning's on_step logging of a metric fed by update().
        self._forward_cache = value if self.reduction == "mean" else value * counted  # type: ignore[assignment]

    def compute(self) -> torch.Tensor:
        return _weighted_compute(
            self.weighted_sum, self.total_weight, self.invalid_weights, self.reduction, type(self).__name__
        )


class MultiTaskGlobalLoss(SumMetric):
    r""":class:`GlobalLoss` for every entry of the dict that :class:`~losses.MultiTaskLoss` returns.

    ``update(losses, weight)`` takes ``{"loss/<task>": ..., "loss": ...}``; ``compute()`` returns a
    dict with the same keys in the same order, each the sample-weighted mean (or sum) over all
    updates on all ranks:

    .. math::
        \bar L_k = \frac{\sum_{r} \sum_{i} w_{ri} L_{ri,k}}{\sum_r \sum_i w_{ri}}
        \quad \text{for each key } k.

    All tasks live in one ``[T + 1]`` state tensor, and a sync is one ``all_reduce`` for 1 task or
    500. Weights, dtypes and checkpoints behave as in :class:`GlobalLoss`.

    The metric is also a read-only mapping from each key to a small metric of that entry alone
    (``metric["loss/fav"]``, ``metric.items()``), so ``self.log_dict(metric)`` in Lightning logs
    every entry. Those entry metrics share this metric's cached ``compute()``: logging all of them
    costs one sync, not ``T + 1``. Their ``reset()`` resets this metric.

    As input to ``forward`` and ``update``:
        - ``losses``: a mapping with exactly the keys ``"loss/<task>"`` for each task and ``"loss"``;
          missing or extra keys are a ``ValueError`` that names them.
        - ``weight``: a non-negative finite number or one-element tensor, the samples the batch
          stands for.

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
        self.result_keys = (*(f"loss/{task}" for task in self.tasks), "loss")
        self._key_set = frozenset(self.result_keys)
        self.add_sum_state("weighted_sums", len(self.result_keys))
        self.add_sum_state("total_weight")
        self.add_sum_state("invalid_weights")
        self._step_values: Optional[torch.Tensor] = None
        # Submodules, so that Lightning finds them among the module's metrics when they are logged.
        self._entries = tuple(_Entry(self, key, index) for index, key in enumerate(self.result_keys))
        self.entries = nn.ModuleList(self._entries)

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
        recorded, counted = _record(
            self.weighted_sums, self.total_weight, self.invalid_weights, values.reshape(-1), weight
        )
        # The batch values, packed, for the entries' on_step logging (forward() sets its own).
        self._step_values = recorded if self.reduction == "mean" else recorded * counted
        self._forward_cache = None

    def compute(self) -> dict[str, torch.Tensor]:
        _refuse_whole_lightning_logging(self)
        values = _weighted_compute(
            self.weighted_sums, self.total_weight, self.invalid_weights, self.reduction, type(self).__name__
        )
        return dict(zip(self.result_keys, values.unbind(), strict=True))

    def reset(self) -> None:
        super().reset()
        self._step_values = None

    # A read-only mapping of entry metrics, for `self.log_dict(metric)`.
    def keys(self) -> tuple[str, ...]:
        return self.result_keys

    def values(self) -> list[Metric]:
        return list(self._entries)

    def items(self) -> list[tuple[str, Metric]]:
        return list(zip(self.result_keys, self._entries, strict=True))

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            if key not in self._key_set:
                raise KeyError(f"Expected one of the keys {list(self.result_keys)}, got {key!r}.")
            return self._entries[self.result_keys.index(key)]
        return super().__getitem__(key)

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]
        return iter(self.result_keys)

    def __len__(self) -> int:
        return len(self.result_keys)

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks)}, reduction={self.reduction!r}"

    def __repr__(self) -> str:
        # The entry submodules would print T + 1 lines.
        return f"{type(self).__name__}({self.extra_repr()})"

    def _step_value(self, key: str, index: int) -> Optional[torch.Tensor]:
        forward_value: Any = self._forward_cache  # forward() stores the dict of the batch values
        if isinstance(forward_value, dict):
            return forward_value[key]  # type: ignore[no-any-return]
        return None if self._step_values is None else self._step_values[index]


def _refuse_whole_lightning_logging(metric: MultiTaskGlobalLoss) -> None:
    """Raise with the working pattern when Lightning's logger computes the whole metric.

    ``self.log_dict(collection)`` with a MetricCollection holding the metric logs it as one value,
    and Lightning's logger takes one tensor per logged metric: without this, its error at the end
    of the epoch would say the dict is not a tensor but not what to do. Lightning's logged-value
    wrapper is recognised by its attribute ``value`` being this metric, a few frames up.
    """
    frame: Optional[FrameType] = sys._getframe(1)
    for _ in range(6):
        frame = frame.f_back if frame is not None else None
        if frame is None:
            return
        if frame.f_code.co_name != "compute":  # cheap test first: reading f_locals copies them
            continue
        caller = frame.f_locals.get("self")
        if type(caller).__name__ == "_ResultMetric" and getattr(caller, "value", None) is metric:
            name = getattr(getattr(caller, "meta", None), "name", "?")
            raise TypeError(
                f"Expected Lightning to log the entries of {type(metric).__name__}, got the whole metric logged as "
                f"{name!r} (for example by self.log_dict(collection) with a MetricCollection holding it): "
                "Lightning logs one tensor per metric and compute() returns a dict. Log the metric itself with "
                "self.log_dict(metric), which logs each entry; or, for a MetricCollection, call "
                "self.log_dict(collection.compute()) at the end of the epoch, then collection.reset()."
            )


class _Entry(Metric):
    """One entry of a :class:`MultiTaskGlobalLoss` as a metric: Lightning's ``self.log`` takes it.

    It holds no state: ``compute()`` is the parent's cached ``compute()[key]`` (one sync for all
    entries), ``reset()`` resets the parent, and the step value is the parent's batch value.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, parent: MultiTaskGlobalLoss, key: str, index: int) -> None:
        # No sync of its own and no cache: the parent holds both.
        super().__init__(sync_on_compute=False, compute_with_cache=False)
        # Not a submodule: the parent owns the entries, not the other way round.
        self.__dict__["_parent"] = parent
        self.key = key
        self.index = index

    @property
    def parent(self) -> MultiTaskGlobalLoss:
        parent: MultiTaskGlobalLoss = self.__dict__["_parent"]
        return parent

    @property
    def update_called(self) -> bool:
        return self.parent.update_called

    @property
    def update_count(self) -> int:
        return self.parent.update_count

    @property  # type: ignore[override]
    def _forward_cache(self) -> Optional[torch.Tensor]:
        return self.parent._step_value(self.key, self.index)

    @_forward_cache.setter
    def _forward_cache(self, value: Any) -> None:
        pass  # torchmetrics sets it; the value always comes from the parent

    def update(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            f"Expected `update` to be called on the MultiTaskGlobalLoss, not on its entry {self.key!r}: "
            "metric.update(losses, weight) records every entry."
        )

    def compute(self) -> torch.Tensor:
        return self.parent.compute()[self.key]

    def reset(self) -> None:
        super().reset()
        self.parent.reset()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key!r})"


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
    sync_sum_metrics(metric for metric in module.modules() if isinstance(metric, SumMetric))
