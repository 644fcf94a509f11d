"""One module for many tasks: per-task losses over a ``[B, T]`` block, then one global loss."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal, Optional, Union

import torch
from torch import nn

from losses import _validation as v
from losses import distributed, functional
from losses.functional import GlobalReduction
from losses.loss_type import LossType, parse_loss_type
from losses.weighting._base import TaskWeighting, check_weighting

TaskReduction = Literal["mean", "sum", "none"]
Normalize = Literal["local", "global"]

TASK_REDUCTIONS = ("mean", "sum", "none")
GLOBAL_REDUCTIONS = ("mean", "sum", "min", "max", "median")
NORMALIZATIONS = ("local", "global")


def warn_unless_mean(name: str, reduction: str) -> None:
    """Say once, at construction, that only ``mean`` keeps DDP gradients equal to single-process ones."""
    if reduction != "mean":
        warnings.warn(
            f"`{name}={reduction!r}`: only 'mean' gives DDP gradients equal to single-process gradients "
            "for the same global batch; with other reductions they differ (for 'sum', by the world size).",
            UserWarning,
            stacklevel=3,
        )


def _per_task(name: str, value: Optional[v.TensorLike], num_tasks: int) -> torch.Tensor:
    tensor = v.weight_tensor(name, value)
    if tensor is None:
        return torch.ones(num_tasks)
    if tensor.shape != (num_tasks,):
        raise ValueError(f"Expected `{name}` to have one value per task ({num_tasks}), got {tensor.numel()}.")
    return tensor


class MultiTaskLoss(nn.Module):
    r"""Creates a criterion that computes one loss per task over a ``[B, T]`` block and reduces them.

    For task :math:`t` with labelled entries :math:`m_{bt} \in \{0, 1\}` and per-sample weights
    :math:`w_{bt}`, the task loss is

    .. math::
        L_t = \frac{1}{N_t} \sum_{b=1}^{B} m_{bt}\, w_{bt}\, \ell(x_{bt}, y_{bt}),
        \qquad N_t = \sum_b m_{bt}

    for ``task_loss_reduction="mean"`` (:math:`N_t = 1` for ``sum``; :math:`L_t = 0` with a zero
    gradient when :math:`N_t = 0`, an empty batch included, for every reduction). :math:`\ell` is
    binary cross-entropy with the task's ``pos_weight`` (see :class:`~losses.BCEWithLogitsLoss`)
    or softmax cross-entropy over a class dimension. The global loss is ``global_reduction`` over
    :math:`\tau_t L_t` with :math:`\tau` the ``task_weights``. Weights are multipliers: ``mean``
    divides by the number of labelled entries, not by the weight sum, exactly as
    :func:`torch.nn.functional.binary_cross_entropy_with_logits`.

    ``task_loss_reduction="none"`` keeps the ancestor's semantics: each task's value is the
    ``[B]`` tensor of its element losses :math:`m_{bt} w_{bt} \ell(x_{bt}, y_{bt})` (0 at unlabelled
    entries), and ``"loss"`` is ``global_reduction`` over all :math:`T \times B` values
    :math:`\tau_t m_{bt} w_{bt} \ell_{bt}` at once, unlabelled zeros included (``mean`` divides by
    :math:`T B`), exactly as the ancestor reduced its stacked task tensors. ``normalize`` does not
    apply to it.

    With ``normalize="global"`` and a process group, :math:`N_t` is summed over the ranks of
    ``process_group`` (one ``all_reduce`` of ``T`` numbers) and the local sum is multiplied by that
    group's size, so the average of the ranks' losses, which DDP's gradient averaging takes, is the
    exact mean over the global batch even when ranks hold different numbers of labelled entries.

    All tasks are computed in one pass over the block; ``forward`` has no loop over tasks and
    never waits on the device (``normalize="global"`` runs its collective).

    Args:
        tasks: the task names, in the order of the task dimension of the logits.
        loss_type: :attr:`LossType.BCE_WITH_LOGITS` (logits ``[B, T]``) or
            :attr:`LossType.CROSS_ENTROPY` (logits ``[B, T, C]``, class-index labels). Default: BCE.
        pos_weights: one positive weight per task (BCE only): a tensor, a sequence or an array
            (NumPy included) of non-negative finite numbers. Default: ``None`` (all 1).
        task_weights: one multiplier per task for the global reduction, given the same ways.
            Default: ``None`` (all 1).
        task_loss_reduction: ``"mean"`` | ``"sum"`` over the batch, or ``"none"`` for one loss
            per sample. Default: ``"mean"``.
        global_reduction: ``"mean"`` | ``"sum"`` | ``"min"`` | ``"max"`` | ``"median"`` over the
            weighted task losses. Default: ``"mean"``.
        normalize: ``"local"`` | ``"global"``, where ``mean`` counts labelled entries. Default: ``"local"``.
        check_inputs: if ``True``, ``forward`` also checks the values of labelled entries: finite
            logits, labels in [0, 1] (BCE) or ``[0, C)`` or ``-100`` (cross-entropy), non-negative
            finite weights; a bad value is a ``ValueError`` naming the argument and its index.
            This waits for the device on every call, so it is off by default; turn it on to find
            where a NaN comes from. Without it, a class index outside ``[0, C)`` other than
            ``-100`` gets torch's own error (an ``IndexError`` on the CPU, a device-side assert
            on CUDA). Meta tensors are not checked (they hold no values). Default: ``False``.
        process_group: the ranks ``normalize="global"`` counts over: the group DDP averages over
            (its ``process_group`` argument). Only the group's ranks may call the loss; another
            rank gets a ``ValueError``. Kept as an attribute, not a buffer: ``deepcopy`` shares
            it, ``state_dict`` leaves it out, and pickling cannot save it (set
            ``loss.process_group`` again after loading). Default: ``None``, every rank.
        weighting: a :mod:`losses.weighting` method that replaces ``"loss"`` with its weighted
            combination of the task losses and adds ``"weight/<task>"`` entries; a submodule, so its
            parameters and state follow the loss (see ``docs/weighting.rst``). It takes the place
            of ``task_weights`` and ``global_reduction``. Default: ``None``.

    Buffers ``pos_weight`` and ``task_weight`` (shape ``[T]``) are always registered, so they follow
    ``model.to(...)`` and sit in the model's ``state_dict``. Logits on another device than the
    buffers are a ``ValueError``, except ``meta`` logits: shape inference works without moving the
    loss (with ``check_inputs=True`` too, whose value checks skip meta tensors). Reductions other than ``mean`` warn
    once, at construction: only ``mean`` gives DDP gradients equal to single-process gradients.

    Shape:
        - logits: :math:`(B, T)` for BCE, :math:`(B, T, C)` for cross-entropy; half precision is
          computed in float32.
        - labels: :math:`(B, T)`; float, int or bool for BCE; class indices of any integer dtype
          for cross-entropy, where ``-100`` (torch's ``ignore_index``) marks an unlabelled entry.
        - weights: optional, :math:`(B, T)`, or :math:`(B)` for the same weight on every task.
        - mask: optional bool :math:`(B, T)`, true where a label exists. An entry it leaves out
          (or a cross-entropy label ``-100``) adds nothing to the loss, the count or the gradient,
          whatever its logits, label and weight hold (NaN and inf included).
        - output: a dict ``{"loss/<task>": scalar, ..., "loss": scalar}`` in task order; each task's
          value is :math:`(B)` for ``task_loss_reduction="none"``. float32 for half precision.

    Examples:
        >>> loss = MultiTaskLoss(["fav", "reply"], pos_weights=[1.0, 4.0])
        >>> logits = torch.tensor([[0.0, -2.0], [1.0, 0.5]])
        >>> labels = torch.tensor([[1, 0], [0, 1]])
        >>> mask = torch.tensor([[True, True], [True, False]])
        >>> {name: round(value.item(), 4) for name, value in loss(logits, labels, mask=mask).items()}
        {'loss/fav': 1.0032, 'loss/reply': 0.1269, 'loss': 0.5651}
    """

    pos_weight: torch.Tensor
    task_weight: torch.Tensor
    weighting: Optional[TaskWeighting]

    def __init__(
        self,
        tasks: Sequence[str],
        loss_type: Union[LossType, str] = LossType.BCE_WITH_LOGITS,
        pos_weights: Optional[v.TensorLike] = None,
        task_weights: Optional[v.TensorLike] = None,
        task_loss_reduction: TaskReduction = "mean",
        global_reduction: GlobalReduction = "mean",
        normalize: Normalize = "local",
        *,
        check_inputs: bool = False,
        process_group: Optional[distributed.ProcessGroup] = None,
        weighting: Optional[TaskWeighting] = None,
    ) -> None:
        super().__init__()
        self.tasks = v.task_names(tasks)
        self.loss_type = parse_loss_type(loss_type)
        if pos_weights is not None and self.loss_type is LossType.CROSS_ENTROPY:
            raise ValueError("`pos_weights` apply to BCE tasks only; got them with loss_type 'cross_entropy'.")
        self.task_loss_reduction: TaskReduction = v.check_choice(  # type: ignore[assignment]
            "task_loss_reduction", task_loss_reduction, TASK_REDUCTIONS
        )
        self.global_reduction: GlobalReduction = v.check_choice(  # type: ignore[assignment]
            "global_reduction", global_reduction, GLOBAL_REDUCTIONS
        )
        self.normalize: Normalize = v.check_choice("normalize", normalize, NORMALIZATIONS)  # type: ignore[assignment]
        self.check_inputs = bool(check_inputs)
        self._group = distributed.GroupHandle(distributed.check_group("process_group", process_group))
        num_tasks = len(self.tasks)
        self.register_buffer("pos_weight", _per_task("pos_weights", pos_weights, num_tasks))
        self.register_buffer("task_weight", _per_task("task_weights", task_weights, num_tasks))
        self._keys = tuple(f"loss/{task}" for task in self.tasks)
        # mean and sum over tasks are a weighted sum, which the fused BCE computes itself;
        # min, max and median are taken from the task losses.
        factors = {"mean": 1.0 / num_tasks, "sum": 1.0}
        self._global_factor: Optional[float] = factors.get(self.global_reduction)
        self.weighting = check_weighting(weighting, self.tasks)
        if weighting is not None and (
            task_weights is not None or global_reduction != "mean" or task_loss_reduction == "none"
        ):
            raise ValueError(
                "Expected `weighting` alone to combine the task losses, with one loss per task: it replaces "
                f"`task_weights` and `global_reduction`; got task_weights={task_weights!r}, "
                f"global_reduction={global_reduction!r}, task_loss_reduction={task_loss_reduction!r}."
            )
        warn_unless_mean("task_loss_reduction", self.task_loss_reduction)
        warn_unless_mean("global_reduction", self.global_reduction)

    @property
    def process_group(self) -> Optional[distributed.ProcessGroup]:
        """The group ``normalize="global"`` sums counts over (``None``: every rank)."""
        return self._group.group

    @process_group.setter
    def process_group(self, group: Optional[distributed.ProcessGroup]) -> None:
        self._group = distributed.GroupHandle(distributed.check_group("process_group", group))

    def extra_repr(self) -> str:
        return (
            f"tasks={list(self.tasks)}, loss_type={self.loss_type.value!r}, "
            f"task_loss_reduction={self.task_loss_reduction!r}, global_reduction={self.global_reduction!r}, "
            f"normalize={self.normalize!r}"
        )

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weights: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        losses = self._losses(logits, labels, weights, mask)
        return losses if self.weighting is None else self.weighting(losses)

    def _losses(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weights: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        cross_entropy = self.loss_type is LossType.CROSS_ENTROPY
        functional.check_multi_task_inputs(logits, labels, weights, mask, len(self.tasks), int(cross_entropy))
        if self.check_inputs:
            self._check_values(logits, labels, weights, mask)
        pos_weight = v.on_device_of("pos_weight", self.pos_weight, logits)
        task_weight = v.on_device_of("task_weight", self.task_weight, logits)
        if cross_entropy:
            elements, labelled = functional.multi_task_cross_entropy(logits, labels, weights, mask)
            if self.task_loss_reduction == "none":
                return self._result(elements.unbind(1), elements.t(), task_weight)
            task_losses = elements.sum(0)
            scale = self._task_scale(labelled, logits)
            if scale is not None:
                task_losses = task_losses * scale
            return self._result(task_losses.unbind(), task_losses, task_weight)
        if self.task_loss_reduction == "none":
            elements = functional.multi_task_bce_elements(logits, labels, pos_weight, weights, mask)
            return self._result(elements.unbind(1), elements.t(), task_weight)
        if len(self.tasks) == 1 and mask is None and (self.normalize == "local" or not distributed.is_distributed()):
            # One task has nothing to fuse: torch's own BCE call, which reduces in C++, is the
            # cheapest way, and it is the same math.
            if weights is not None and weights.ndim == 1:
                weights = weights.unsqueeze(1)
            task_loss = functional.binary_cross_entropy_with_logits(
                logits, labels, weights, pos_weight, reduction=self.task_loss_reduction
            )
            return {self._keys[0]: task_loss, "loss": task_loss * task_weight.squeeze(0)}
        scale = self._task_scale(mask, logits)
        task_losses, total = functional.multi_task_bce(
            logits, labels, pos_weight, weights, mask, scale, task_weight, self._global_factor
        )
        return self._result(
            task_losses.unbind(), task_losses, task_weight, None if self._global_factor is None else total
        )

    def _result(
        self,
        task_values: Sequence[torch.Tensor],
        reduced: torch.Tensor,
        task_weight: torch.Tensor,
        total: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        """The output dict: one value per task, then ``"loss"`` (``reduced`` over tasks unless given)."""
        losses = dict(zip(self._keys, task_values, strict=True))
        losses["loss"] = (
            functional.reduce_tasks(reduced, task_weight, self.global_reduction) if total is None else total
        )
        return losses

    def _task_scale(self, mask: Optional[torch.Tensor], logits: torch.Tensor) -> Union[float, torch.Tensor, None]:
        """What multiplies each task's sum: one over its labelled count for ``mean``, nothing for ``sum``."""
        if self.task_loss_reduction != "mean":
            return None
        batch = logits.shape[0]
        dtype = functional.compute_dtype(logits.dtype)
        if self.normalize == "global" and distributed.is_distributed():
            group = self._group.get()
            counts = functional.task_counts(mask, batch, len(self.tasks), dtype, logits.device)
            # An empty task's sum is 0, so dividing it by 1 instead of 0 gives the 0 we want.
            return distributed.world_size(group) / distributed.all_reduce_sum(counts, group).clamp_min(1)
        if mask is None:
            return 1.0 / max(batch, 1)
        counts = functional.task_counts(mask, batch, len(self.tasks), dtype, logits.device)
        return counts.clamp_min(1).reciprocal()

    def _check_values(
        self, logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor], mask: Optional[torch.Tensor]
    ) -> None:
        # Only labelled entries are checked: the others contribute nothing, whatever they hold.
        labelled = mask
        if self.loss_type is LossType.CROSS_ENTROPY:
            v.check_values(
                "labels", labels, low=0, high=logits.shape[2] - 1, where=mask, allowed=functional.IGNORE_INDEX
            )
            labelled = labels != functional.IGNORE_INDEX if mask is None else mask & (labels != functional.IGNORE_INDEX)
            v.check_values("logits", logits, where=labelled.unsqueeze(-1).expand_as(logits))
        else:
            v.check_values("labels", labels, low=0, high=1, where=mask)
            v.check_values("logits", logits, where=mask)
        if weights is not None:
            v.check_values("weights", weights, low=0, where=labelled if weights.ndim == 2 else None)
