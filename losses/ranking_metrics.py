"""NE, RCE, log loss, calibration and CTR per task, over all updates on all ranks, from float64 sums."""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional, Union

import torch
from torchmetrics.utilities.exceptions import TorchMetricsUserError

from losses import _validation as v
from losses import distributed
from losses._auc import AUC_RESULTS, AucBins, auc_undefined, auc_values
from losses._dict_metric import DictSumMetric
from losses._grouped import group_rows, grouped_sums, grouped_undefined, grouped_values
from losses._metric_sync import values_on
from losses.functional import check_multi_task_inputs
from losses.ranking_functional import (
    RESULTS,
    SUM_ROWS,
    elements,
    ranking_values,
    sums_of_elements,
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


def _check_auc_bins(bins: Optional[int]) -> Optional[int]:
    if bins is None:
        return None
    given: Any = bins
    if isinstance(given, bool) or not isinstance(given, numbers.Integral) or given < 2:
        raise ValueError(f"Expected argument `auc_bins` to be None or an int >= 2, got {bins!r}.")
    return int(given)


def _check_ndcg_k(ks: Sequence[int]) -> tuple[int, ...]:
    given: Any = ks
    if isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
        raise TypeError(f"Expected argument `ndcg_k` to be a sequence of positive ints, got {type(given).__name__}.")
    bad = [k for k in given if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= 0]
    if bad:
        raise ValueError(f"Expected every entry of `ndcg_k` to be a positive int, got {list(given)!r}.")
    checked = tuple(int(k) for k in given)
    if len(set(checked)) != len(checked):
        raise ValueError(f"Expected the entries of `ndcg_k` to be distinct, got {list(given)!r}.")
    return checked


class _Family(NamedTuple):
    """One kind of sum state of the metric and the metrics it gives: a row of the metric's table.

    Its window state is ``"window_" + state`` with a leading slot dimension; its keys are
    ``"<name>/<task>"`` for each name, metric-major.
    """

    state: str
    shape: tuple[int, ...]
    names: tuple[str, ...]
    values: Callable[[torch.Tensor], torch.Tensor]  # the state -> (len(names), T)
    undefined: Callable[[torch.Tensor], Optional[str]]  # why some values are NaN, reading the state


class MultiTaskRankingMetrics(DictSumMetric):
    r"""Normalized entropy, RCE, log loss, calibration and CTR of every task, over all ranks; AUC, gauc, NDCG.

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

    With ``auc_bins=N`` the metric also keeps, per task, histograms of the logits weighted by the
    positive mass :math:`w y` and the negative mass :math:`w (1 - y) / r` over ``N`` fixed bins
    :math:`16 / (N - 1)` wide centred on -12 to 4, and returns ``auc/<task>`` (ROC AUC, ties within
    a bin counting half) and ``pr_auc/<task>`` (average precision). The AUC is within half the
    weight of the positive-negative pairs that share a bin of the exact AUC (see
    docs/ranking_metrics.rst). With ``groups`` (an id per row), ``gauc/<task>`` (with ``auc_bins``)
    is the mean of the per-group AUC over the groups holding both classes, weighted by each group's
    labelled weight, and ``ndcg@k/<task>`` (for each ``k`` of ``ndcg_k``) the mean NDCG@k over the
    groups holding a positive. A group is the rows with one id inside one ``update``. These are sum
    states too: the same single collective, window ring and checkpoints.

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
        - ``groups``: optional integer :math:`(B)`, one group id per row (a user or a request),
          rows of a group in any order; needs ``auc_bins`` or ``ndcg_k``.

    As output of ``forward`` and ``compute``:
        - a dict of float64 scalars: ``ne/<task>`` for every task, then ``rce/``, ``logloss/``,
          ``calibration/``, ``ctr/``; with ``auc_bins`` then ``auc/``, ``pr_auc/``, ``gauc/``; with
          ``ndcg_k`` then ``ndcg@k/`` for each ``k``; with a window, the same keys prefixed ``window_``.
          ``forward`` returns the values of its batch alone (the window keys too), over all ranks
          with ``dist_sync_on_step=True``.

    Args:
        tasks: the task names, in the order of the task dimension.
        window: ``None`` or the number of samples (rows, over all ranks) of the window metrics.
            Default: ``None``.
        neg_sampling_rates: one rate per task in (0, 1], the share of negatives kept when the data
            were down-sampled; each kept negative then counts ``1 / rate``, so the metrics are
            those of the full traffic (in the AUC histograms too). Default: ``None`` (all 1).
        auc_bins: ``None``, or the number of bins (an int >= 2) of the AUC histograms. Default: ``None``.
        ndcg_k: the cutoffs ``k`` of the NDCG@k of groups, e.g. ``(10,)``. Default: ``()``.
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

        AUC, PR-AUC, and per-request gauc and NDCG@2 (two requests of two rows):

        >>> ranked = MultiTaskRankingMetrics(["click"], auc_bins=1024, ndcg_k=(2,))
        >>> logits, labels = torch.tensor([[2.0], [0.0], [-1.0], [1.0]]), torch.tensor([[1], [0], [1], [0]])
        >>> ranked.update(logits, labels, groups=torch.tensor([5, 5, 6, 6]))
        >>> results = ranked.compute()
        >>> for key in ("auc/click", "pr_auc/click", "gauc/click", "ndcg@2/click"):
        ...     print(f"{key:<14}{results[key].item():8.4f}")
        auc/click       0.5000
        pr_auc/click    0.7500
        gauc/click      0.5000
        ndcg@2/click    0.8155
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
        auc_bins: Optional[int] = None,
        ndcg_k: Sequence[int] = (),
        **metric_kwargs: Any,
    ) -> None:
        super().__init__(**metric_kwargs)
        self.tasks = v.task_names(tasks)
        self.window = _check_window(window)
        self.neg_sampling_rates = _check_rates(neg_sampling_rates, len(self.tasks))
        self.auc_bins = _check_auc_bins(auc_bins)
        self.ndcg_k = _check_ndcg_k(ndcg_k)
        self._bins = None if self.auc_bins is None else AucBins(self.auc_bins, len(self.tasks))
        self._families = self._build_families()
        for family in self._families:
            self.add_sum_state(family.state, family.shape)
        if self.window is not None:
            for family in self._families:
                self.add_sum_state("window_" + family.state, (WINDOW_SLOTS, *family.shape))
        prefixes = ("",) if self.window is None else ("", "window_")
        self.set_result_keys(
            [
                f"{prefix}{name}/{task}"
                for prefix in prefixes
                for family in self._families
                for name in family.names
                for task in self.tasks
            ]
        )
        self._slot = 0
        self._slot_rows = 0
        self._rates_on: dict[torch.device, torch.Tensor] = {}
        self._batch_sums: Optional[dict[str, torch.Tensor]] = None
        self._batch_values: Optional[torch.Tensor] = None  # of _batch_sums, computed when asked

    def _build_families(self) -> tuple[_Family, ...]:
        """The sum states the configuration asks for, in key order: the table the metric runs on."""
        tasks = self.tasks
        num_tasks = len(tasks)
        families = [
            _Family(
                "sums",
                (len(SUM_ROWS), num_tasks),
                tuple(RESULTS),
                ranking_values,
                functools.partial(undefined_message, tasks=tasks),
            )
        ]
        if self._bins is not None:
            families.append(
                _Family(
                    "auc_histograms",
                    self._bins.shape,
                    AUC_RESULTS,
                    auc_values,
                    functools.partial(auc_undefined, tasks=tasks),
                )
            )
        gauc = self._bins is not None
        if gauc or self.ndcg_k:
            ks = self.ndcg_k
            names = (("gauc",) if gauc else ()) + tuple(f"ndcg@{k}" for k in ks)
            first = 0 if gauc else 1  # grouped_values gives the gauc row first
            families.append(
                _Family(
                    "group_sums",
                    (len(group_rows(ks)), num_tasks),
                    names,
                    functools.partial(_grouped_rows, ks=ks, first=first),
                    functools.partial(grouped_undefined, tasks=tasks, gauc=gauc, ks=ks),
                )
            )
        return tuple(families)

    def extra_repr(self) -> str:
        text = f"tasks={list(self.tasks)}, window={self.window}, neg_sampling_rates={self.neg_sampling_rates}"
        if self.auc_bins is not None:
            text += f", auc_bins={self.auc_bins}"
        if self.ndcg_k:
            text += f", ndcg_k={self.ndcg_k}"
        return text

    def update(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weights: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        groups: Optional[torch.Tensor] = None,
    ) -> None:
        labels = v.check_tensor("labels", labels).detach()
        weights = None if weights is None else v.check_tensor("weights", weights).detach()
        check_multi_task_inputs(v.check_tensor("logits", logits), labels, weights, mask, len(self.tasks), 0)
        if groups is not None:
            self._check_groups(logits, groups)
        x = logits.detach()
        if x.dtype != torch.float64:
            x = x.to(torch.float32)
        rates = self._rates(x.device)
        e = elements(x, labels, weights, mask, rates)
        increments = {"sums": sums_of_elements(e)}
        # AUC's masses are the positive and effective weights of the sums: w y, and w y + w (1 - y) / r.
        if self._bins is not None:
            increments["auc_histograms"] = self._bins.histograms(e.logits, e.positive, e.weight)
        if groups is not None:
            increments["group_sums"] = grouped_sums(
                e.logits, e.positive, e.weight, _relevant(labels, mask), mask, groups.detach(), self.ndcg_k
            )
        device = self.sums.device
        increments = {name: values_on("logits", value, device) for name, value in increments.items()}
        states = self.__dict__
        if self.window is not None:
            self._advance_window(self.window, logits.shape[0])
        for name, value in increments.items():
            states[name].add_(value)
            if self.window is not None:
                states["window_" + name][self._slot].add_(value)
        self.__dict__["_batch_sums"] = increments
        self.__dict__["_batch_values"] = None

    def _check_groups(self, logits: torch.Tensor, groups: Any) -> None:
        if not isinstance(groups, torch.Tensor):
            raise TypeError(f"Expected `groups` to be a torch.Tensor of integer ids, got {type(groups).__name__}.")
        if groups.is_floating_point() or groups.is_complex() or groups.dtype == torch.bool:
            raise TypeError(f"Expected `groups` to hold integer ids (one per row), got dtype {groups.dtype}.")
        if groups.shape != logits.shape[:1]:
            raise ValueError(
                f"Expected `groups` of shape [B] ({logits.shape[0]},), one id per row of the logits "
                f"{tuple(logits.shape)}, got {tuple(groups.shape)}."
            )
        if groups.device != logits.device:
            raise ValueError(f"Expected `groups` on the device of the logits ({logits.device}), got {groups.device}.")
        if not any(family.state == "group_sums" for family in self._families):
            raise ValueError(
                "Expected `auc_bins` or `ndcg_k` to be set when `groups` is given: the grouped metrics are gauc "
                "(with auc_bins) and ndcg@k (with ndcg_k), and this metric was built with neither."
            )

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
            for family in self._families:
                self.__dict__["window_" + family.state][self._slot].zero_()
            self._slot_rows = 0
        self._slot_rows += rows

    def _values_of(self, states: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every family's values from ``states`` (a family missing from it gives NaN), flattened in key order."""
        parts = []
        for family in self._families:
            state = states.get(family.state)
            if state is None:
                parts.append(self.sums.new_full((len(family.names) * len(self.tasks),), math.nan))
            else:
                parts.append(family.values(state).reshape(-1))
        return torch.cat(parts)

    def compute_values(self) -> torch.Tensor:
        states = self.__dict__
        values = self._values_of({family.state: states[family.state] for family in self._families})
        reasons = [family.undefined(states[family.state]) for family in self._families]
        if self.window is not None:
            window = {family.state: states["window_" + family.state].sum(0) for family in self._families}
            values = torch.cat([values, self._values_of(window)])
            for family, lifetime in zip(self._families, list(reasons), strict=True):
                in_window = family.undefined(window[family.state])
                reasons.append(None if in_window is None or in_window == lifetime else f"in the window, {in_window}")
        _warn_undefined(reasons)
        return values

    def update_step_values(self) -> Optional[torch.Tensor]:
        if self._batch_values is None and self._batch_sums is not None:
            self.__dict__["_batch_values"] = self._batch_vector(self._batch_sums)
        return self._batch_values

    def _batch_vector(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The values of one batch's sums for every key; the window keys repeat them."""
        values = self._values_of(batch)
        return values if self.window is None else torch.cat([values, values])

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weights: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        groups: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        """``update``, then the metrics of this batch alone (over all ranks with ``dist_sync_on_step``)."""
        # torchmetrics' own forward resets the states to update on the batch alone and adds them
        # back afterwards, which would skip the window's eviction; one update and the batch's own
        # sums give the same batch value without that.
        if self._is_synced:
            raise TorchMetricsUserError(
                "Expected MultiTaskRankingMetrics not to be synced in forward: call `unsync()` first."
            )
        self.update(logits, labels, weights, mask, groups)
        assert self._batch_sums is not None
        batch = self._batch_sums
        if self.dist_sync_on_step and distributed.is_distributed():
            batch = self._sync_batch(batch)
        # No warning: a rare task often has one class per batch.
        results = self.result_dict(self._batch_vector(batch))
        self.__dict__["_forward_cache"] = results  # what Lightning logs on_step
        return results

    def _sync_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Every family's batch sums in one packed tensor: one collective, as for compute().
        # A family without this batch's sums (no groups given) is sent as zeros: another rank may have them.
        shapes = {family.state: family.shape for family in self._families}
        packed = torch.cat([batch.get(name, self.sums.new_zeros(shape)).reshape(-1) for name, shape in shapes.items()])
        if self.dist_sync_fn is not None:
            gathered = self.dist_sync_fn(packed, group=self.process_group)
            packed = torch.stack(list(gathered)).sum(0)
        else:
            packed = distributed.all_reduce_sum(packed, self.process_group)
        pieces = packed.split_with_sizes([math.prod(shape) for shape in shapes.values()])
        return {name: piece.view(shape) for (name, shape), piece in zip(shapes.items(), pieces, strict=True)}

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


def _grouped_rows(sums: torch.Tensor, ks: tuple[int, ...], first: int) -> torch.Tensor:
    return grouped_values(sums, ks)[first:]


def _relevant(labels: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """NDCG's relevance: a labelled entry with :math:`y \\ge 1/2` (probabilities rounded)."""
    relevant = labels >= 0.5
    if mask is not None:
        relevant &= mask
    return relevant


def _warn_undefined(reasons: Sequence[Optional[str]]) -> None:
    named = [reason for reason in reasons if reason is not None]
    if named:
        warnings.warn(
            "MultiTaskRankingMetrics: undefined metrics returned as NaN: " + "; ".join(named) + ".",
            UserWarning,
            stacklevel=3,
        )
