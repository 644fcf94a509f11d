"""NE, RCE, log loss, calibration and CTR per task, over all updates on all ranks, from float64 sums."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torchmetrics.utilities.exceptions import TorchMetricsUserError

from losses import _validation as v
from losses import distributed
from losses._dict_metric import DictSumMetric
from losses._metric_sync import values_on
from losses.functional import check_multi_task_inputs
from losses.ranking_functional import (
    SUM_ROWS,
    ranking_values,
    result_keys,
    unchecked_ranking_sums,
    undefined_message,
)

#: How many slots the window's ring has: the window is the current slot and the ones before it.
WINDOW_SLOTS = 10


def _check_window(window: Optional[int]) -> Optional[int]:
    if window is None:
        return None
    given: Any = window  # typed int, but a NumPy integer is one too (as for losses.Task)
    if isinstance(given, bool) or not isinstance(given, numbers.Integral) or given <= 0:
        raise ValueError(
            f"Expected argument `window` to be None or a positive int (samples over all ranks), got {window!r}."
        )
    return int(given)


def _check_rates(rates: Optional[v.TensorLike], num_tasks: int) -> Optional[tuple[float, ...]]:
    if rates is None:
        return None
    checked = v.weight_tensor("neg_sampling_rates", rates)  # type, one dimension, finite, not negative
    assert checked is not None
    if checked.numel() != num_tasks:
        raise ValueError(
            f"Expected argument `neg_sampling_rates` to have one rate per task ({num_tasks}), got {checked.numel()}."
        )
    # Python floats as given (0.2 stays 0.2, not its float32 rounding); a tensor's or array's own values.
    values = tuple(float(rate) for rate in rates) if isinstance(rates, Sequence) else tuple(checked.double().tolist())
    if not all(0.0 < rate <= 1.0 for rate in values):
        raise ValueError(f"Expected every entry of `neg_sampling_rates` to be in (0, 1], got {list(values)}.")
    return values


class MultiTaskRankingMetrics(DictSumMetric):
    r"""Normalized entropy, RCE, log loss, calibration and CTR of every task, over all ranks.

    Each ``update`` adds four weighted sums per task (see :func:`losses.ranking_functional.ranking_sums`)
    into float64 states; ``compute()`` syncs them across ranks in one ``all_reduce`` and returns,
    for every task :math:`t`, over every labelled entry of every update on every rank, with
    :math:`p = \sigma(x)`, :math:`v` the sample weight (a negative's divided by its task's
    ``neg_sampling_rates`` entry) and :math:`\operatorname{ce}` the binary cross-entropy of the logit:

    .. math::
        \text{logloss}_t = \frac{\sum v \operatorname{ce}}{\sum v}, \quad
        \text{ctr}_t = \frac{\sum v y}{\sum v}, \quad
        \text{ne}_t = \frac{\text{logloss}_t}{H(\text{ctr}_t)}, \quad
        \text{rce}_t = 100\,(1 - \text{ne}_t), \quad
        \text{calibration}_t = \frac{\sum v p}{\sum v y}

    with :math:`H(q) = -q \log q - (1 - q) \log(1 - q)`: NE is the loss relative to always
    predicting the CTR (below 1 is better than that), calibration is predicted over observed
    positives (1 is calibrated). Undefined ratios (a task without labelled weight, or whose labels
    are all one class) are NaN, with one warning naming the tasks; nothing raises, nothing is inf.

    With ``window=N`` the same metrics are also returned under ``window_<metric>/<task>`` over
    about the last ``N`` samples (rows) seen on all ranks. Each rank keeps a ring of
    ``WINDOW_SLOTS = 10`` slots of sums; a slot takes whole updates until it holds at least
    ``ceil(N / (10 W))`` rows (``W`` the world size), and the update after that starts the next slot,
    which forgets what it held before. The window is every slot of every rank: per rank the current
    slot and the 9 before it, between ``0.9 N / W`` rows and ``N / W`` rows plus one batch per slot.
    When a batch holds more rows than a slot, each slot holds one update and the window is the last
    10 updates of each rank. The ring is a sum state too, synced in the same single collective.
    Its position (slot and rows in it) is saved with the checkpoint and restored on every rank that
    loads it; see docs/ranking_metrics.rst for resumes on another world size.

    ``update`` reads no value on the host (no device sync); ``compute`` reads the sums once to warn.

    The metric is also a read-only mapping from each key to a small metric of that entry alone
    (``metrics["ne/click"]``, ``metrics.items()``), so ``self.log_dict(metrics)`` in Lightning logs
    every entry with one sync per epoch, as for :class:`~losses.MultiTaskGlobalLoss`; with
    ``on_step=True`` each entry logs the value of its batch alone.

    As input to ``forward`` and ``update`` (the BCE inputs of :class:`~losses.MultiTaskLoss`):
        - ``logits``: :math:`(B, T)`, floating point; half precision is computed in float32.
        - ``labels``: :math:`(B, T)`, float, int or bool; probabilities in [0, 1] also work.
        - ``weights``: optional, :math:`(B, T)` or :math:`(B)`; non-negative.
        - ``mask``: optional bool :math:`(B, T)`, true where a label exists; other entries add
          nothing, whatever they hold (NaN included).

    As output of ``forward`` and ``compute``:
        - a dict of float64 scalars: ``ne/<task>`` for every task, then ``rce/``, ``logloss/``,
          ``calibration/``, ``ctr/``; with a window, the same keys prefixed ``window_``.
          ``forward`` returns the values of its batch alone (the window keys too), over all ranks
          with ``dist_sync_on_step=True``.

    Args:
        tasks: the task names, in the order of the task dimension.
        window: ``None`` or the number of samples (rows, over all ranks) of the window metrics.
            Default: ``None``.
        neg_sampling_rates: one rate per task in (0, 1], the share of negatives kept when the data
            were down-sampled; each kept negative then counts ``1 / rate``, so the metrics are
            those of the full traffic. Default: ``None`` (all 1).
        metric_kwargs: passed to :class:`torchmetrics.Metric` (``process_group``,
            ``sync_on_compute``, ``dist_sync_on_step``, ``dist_sync_fn``, ...).

    Example:
        >>> metrics = MultiTaskRankingMetrics(["click", "reply"])
        >>> logits = torch.tensor([[1.0, -2.0], [-1.0, 0.0], [0.0, -1.0]])
        >>> labels = torch.tensor([[1, 0], [0, 1], [1, 0]])
        >>> metrics.update(logits, labels)
        >>> for key, value in metrics.compute().items():
        ...     print(f"{key:<18}{value.item():8.4f}")
        ne/click            0.6911
        ne/reply            0.5935
        rce/click          30.8908
        rce/reply          40.6488
        logloss/click       0.4399
        logloss/reply       0.3778
        calibration/click   0.7500
        calibration/reply   0.8881
        ctr/click           0.6667
        ctr/reply           0.3333
    """

    is_differentiable = False
    higher_is_better = None  # NE and log loss lower, RCE higher, calibration closest to 1
    full_state_update = False

    sums: torch.Tensor
    window_sums: torch.Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        window: Optional[int] = None,
        neg_sampling_rates: Optional[v.TensorLike] = None,
        **metric_kwargs: Any,
    ) -> None:
        super().__init__(**metric_kwargs)
        self.tasks = v.task_names(tasks)
        self.window = _check_window(window)
        self.neg_sampling_rates = _check_rates(neg_sampling_rates, len(self.tasks))
        shape = (len(SUM_ROWS), len(self.tasks))
        self.add_sum_state("sums", shape)
        keys = result_keys(self.tasks)
        if self.window is not None:
            self.add_sum_state("window_sums", (WINDOW_SLOTS, *shape))
            keys += result_keys(self.tasks, prefix="window_")
        self.set_result_keys(keys)
        self._slot = 0
        self._slot_rows = 0
        self._rates_on: dict[torch.device, torch.Tensor] = {}
        self._batch_sums: Optional[torch.Tensor] = None
        self._batch_values: Optional[torch.Tensor] = None  # of _batch_sums, computed when asked

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks)}, window={self.window}, neg_sampling_rates={self.neg_sampling_rates}"

    def update(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weights: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> None:
        labels = v.check_tensor("labels", labels).detach()
        weights = None if weights is None else v.check_tensor("weights", weights).detach()
        check_multi_task_inputs(v.check_tensor("logits", logits), labels, weights, mask, len(self.tasks), 0)
        sums = values_on(
            "logits",
            unchecked_ranking_sums(logits, labels, weights, mask, self._rates(logits.device)),
            self.sums.device,
        )
        self.sums.add_(sums)
        if self.window is not None:
            self._advance_window(self.window, logits.shape[0])
            self.window_sums[self._slot].add_(sums)
        self.__dict__["_batch_sums"] = sums
        self.__dict__["_batch_values"] = None

    def _rates(self, device: torch.device) -> Optional[torch.Tensor]:
        # Built once per device: a tensor made from the Python floats on every update would be a
        # host-to-device copy each time.
        if self.neg_sampling_rates is None:
            return None
        if device not in self._rates_on:
            self._rates_on[device] = torch.tensor(self.neg_sampling_rates, dtype=torch.float64, device=device)
        return self._rates_on[device]

    def _advance_window(self, window: int, rows: int) -> None:
        capacity = math.ceil(window / (WINDOW_SLOTS * distributed.world_size(self.process_group)))
        if self._slot_rows >= capacity:
            self._slot = (self._slot + 1) % WINDOW_SLOTS
            self.window_sums[self._slot].zero_()
            self._slot_rows = 0
        self._slot_rows += rows

    def compute_values(self) -> torch.Tensor:
        values = ranking_values(self.sums).reshape(-1)
        reasons = [undefined_message(self.sums, self.tasks)]
        if self.window is not None:
            window = self.window_sums.sum(0)
            values = torch.cat([values, ranking_values(window).reshape(-1)])
            in_window = undefined_message(window, self.tasks)
            reasons.append(None if in_window is None or in_window == reasons[0] else f"in the window, {in_window}")
        _warn_undefined(reasons)
        return values

    def update_step_values(self) -> Optional[torch.Tensor]:
        if self._batch_values is None and self._batch_sums is not None:
            self.__dict__["_batch_values"] = self._batch_vector(self._batch_sums)
        return self._batch_values

    def _batch_vector(self, batch: torch.Tensor) -> torch.Tensor:
        """The values of one batch's sums for every key; the window keys repeat them."""
        values = ranking_values(batch).reshape(-1)
        return values if self.window is None else torch.cat([values, values])

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weights: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        """``update``, then the metrics of this batch alone (over all ranks with ``dist_sync_on_step``)."""
        # torchmetrics' own forward resets the states to update on the batch alone and adds them
        # back afterwards, which would skip the window's eviction; one update and the batch's own
        # sums give the same batch value without that.
        if self._is_synced:
            raise TorchMetricsUserError(
                "Expected MultiTaskRankingMetrics not to be synced in forward: call `unsync()` first."
            )
        self.update(logits, labels, weights, mask)
        assert self._batch_sums is not None
        batch = self._batch_sums
        if self.dist_sync_on_step and distributed.is_distributed():
            batch = self._sync_batch(batch)
        # No warning: a rare task often has one class per batch.
        results = self.result_dict(self._batch_vector(batch))
        self.__dict__["_forward_cache"] = results  # what Lightning logs on_step
        return results

    def _sync_batch(self, batch: torch.Tensor) -> torch.Tensor:
        if self.dist_sync_fn is not None:
            gathered = self.dist_sync_fn(batch, group=self.process_group)
            return torch.stack(list(gathered)).sum(0)
        return distributed.all_reduce_sum(batch, self.process_group)

    def reset(self) -> None:
        super().reset()
        self._slot = 0
        self._slot_rows = 0
        self._batch_sums = None
        self._batch_values = None

    def get_extra_state(self) -> dict[str, int]:
        """The window's position: saved with the sums, so that a resumed ring continues where it was."""
        return {"window_slot": self._slot, "window_slot_rows": self._slot_rows}

    def set_extra_state(self, state: Union[dict[str, int], Any]) -> None:
        self._slot = int(state["window_slot"]) % WINDOW_SLOTS
        self._slot_rows = int(state["window_slot_rows"])


def _warn_undefined(reasons: Sequence[Optional[str]]) -> None:
    named = [reason for reason in reasons if reason is not None]
    if named:
        warnings.warn(
            "MultiTaskRankingMetrics: undefined metrics returned as NaN: " + "; ".join(named) + ".",
            UserWarning,
            stacklevel=3,
        )
