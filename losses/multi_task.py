"""One module for many tasks: per-task losses over a ``[B, T]`` block, then one global loss."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Literal, Optional, Union

import torch
from torch import nn

from losses import _input_checks as checks
from losses import _validation as v
from losses import distributed, functional
from losses._ranking_terms import RankingTerms
from losses._task_groups import GROUPS, Inputs, RowSplit, TaskGroup
from losses._task_reduction import unchecked_reduce_tasks
from losses.functional import GlobalReduction
from losses.loss_type import LossType, parse_loss_type
from losses.task import Task
from losses.weighting._base import TaskWeighting, check_weighting

TaskReduction = Literal["mean", "sum", "none"]
Normalize = Literal["local", "global"]
Scale = Union[float, torch.Tensor, None]

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


def _per_task(name: str, value: Optional[v.TensorLike], num_tasks: int) -> Optional[torch.Tensor]:
    tensor = v.weight_tensor(name, value)
    if tensor is not None and tensor.shape != (num_tasks,):
        raise ValueError(f"Expected `{name}` to have one value per task ({num_tasks}), got {tensor.numel()}.")
    return tensor


def _task_specs(tasks: Sequence[Union[str, Task]], loss_type: LossType) -> list[Optional[Task]]:
    """Every task as a :class:`Task`; ``None`` for a name under ``loss_type='cross_entropy'``.

    A plain name is a task with every default: binary under BCE, and under cross-entropy a
    multi-class task whose class count comes from ``[B, T, C]`` logits (``None`` here).
    """
    if isinstance(tasks, (str, Task)) or not isinstance(tasks, Sequence):
        v.task_names(tasks)  # raises its TypeError: not a sequence of names
    specs: list[Optional[Task]] = []
    for position, task in enumerate(tasks):
        if isinstance(task, Task):
            specs.append(task)
        elif isinstance(task, str):
            specs.append(Task(task) if task and loss_type is LossType.BCE_WITH_LOGITS else None)
        else:
            raise TypeError(
                f"Expected every task to be a name (str) or a losses.Task, got {type(task).__name__} at position "
                f"{position}."
            )
    v.task_names([task if isinstance(task, str) else task.name for task in tasks])
    return specs


def _from_specs(
    name: str,
    argument: Optional[v.TensorLike],
    field: str,
    specs: Sequence[Optional[Task]],
    tasks: Sequence[str],
    applies: Sequence[bool],
) -> torch.Tensor:
    """A ``[T]`` buffer: the ``argument`` (one value per task) or each Task's own ``field``, never both."""
    own = [1.0 if spec is None else float(getattr(spec, field)) for spec in specs]
    tensor = _per_task(name, argument, len(tasks))
    if tensor is None:
        return torch.tensor(own)
    overridden = [task for task, value in zip(tasks, own, strict=True) if value != 1.0]
    if overridden:
        raise ValueError(
            f"Expected each task's `{field}` in one place: `{name}` was given, and the Tasks {overridden} set "
            f"their own `{field}`."
        )
    if tensor.device.type != "meta":
        wrong = [task for task, value, ok in zip(tasks, tensor.tolist(), applies, strict=True) if not ok and value != 1]
        if wrong:
            raise ValueError(
                f"Expected `{name}` to be 1 for the tasks it does not apply to, got other values for {wrong}."
            )
    return tensor


def _holds(buffer: torch.Tensor, values: tuple[float, ...]) -> bool:
    """Whether ``buffer`` holds ``values`` rounded to its dtype (a meta buffer holds nothing)."""
    if buffer.device.type == "meta" or not buffer.is_floating_point():
        return False
    return torch.equal(buffer, torch.tensor(values, dtype=buffer.dtype, device=buffer.device))


class MultiTaskLoss(distributed.HoldsProcessGroup, nn.Module):
    r"""Creates a criterion that computes one loss per task over a ``[B, T]`` block and reduces them.

    For task :math:`t` with labelled entries :math:`m_{bt} \in \{0, 1\}` and per-sample weights
    :math:`w_{bt}`, the task loss is

    .. math::
        L_t = \frac{1}{N_t} \sum_{b=1}^{B} m_{bt}\, w_{bt}\, \ell(x_{bt}, y_{bt}),
        \qquad N_t = \sum_b m_{bt}

    for ``task_loss_reduction="mean"`` (:math:`N_t = 1` for ``sum``; :math:`L_t = 0` with a zero
    gradient when :math:`N_t = 0`, an empty batch included, for every reduction). :math:`\ell` is
    binary cross-entropy with the task's ``pos_weight`` (see :class:`~losses.BCEWithLogitsLoss`)
    or softmax cross-entropy over a class dimension; with :class:`~losses.Task` specs it is each
    task's own loss (binary with focal modulation, label smoothing and negative sampling,
    multi-class, or regression), see ``docs/task_specs.rst``. The global loss is ``global_reduction`` over
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

    A binary :class:`~losses.Task` with a ``ranking`` adds a pairwise or listwise term over the
    rows of each group of ``forward``'s ``groups``: its loss is ``pointwise_weight * L_t +
    ranking_weight * R_t``, ``R_t`` the ranking term (a mean over pairs or lists, counted over the
    ranks with ``normalize="global"`` in the same ``all_reduce``), which the dict also holds,
    detached, as ``"ranking/<task>"``; see ``docs/ranking_losses.rst``.

    All tasks of a kind are computed in one pass over the block (binary tasks in one autograd
    node with an analytic gradient); ``forward`` has no loop over tasks and never waits on the
    device (``normalize="global"`` runs its collective).

    Args:
        tasks: the tasks, in the order of the task dimension of the labels: names, :class:`~losses.Task`
            specs, or a mix. A name is a task with every default, of the kind ``loss_type`` says.
        loss_type: the kind of the tasks given by name: :attr:`LossType.BCE_WITH_LOGITS` (binary) or
            :attr:`LossType.CROSS_ENTROPY` (multi-class, class count from logits ``[B, T, C]``).
            Default: BCE.
        pos_weights: one positive weight per task (binary tasks; 1 for the others): a tensor, a
            sequence or an array (NumPy included) of non-negative finite numbers. Default: ``None``
            (each Task's ``pos_weight``, 1 for a name).
        task_weights: one multiplier per task for the global reduction, given the same ways.
            Default: ``None`` (each Task's ``weight``, 1 for a name). A Task that sets its own
            ``pos_weight`` or ``weight`` cannot be combined with the argument.
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
            ``-100`` gets torch's own error (a ``RuntimeError`` on the CPU, a device-side assert
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
    ``model.to(...)`` and sit in the model's ``state_dict``. The options of Task specs (focal
    parameters, smoothing, sampling rates, column maps) are buffers of the submodule ``kinds``, one
    row per kind, not persistent, float64 holding the Tasks' Python floats under any dtype cast:
    they follow ``.to()`` and come from the specs, not the checkpoint, so a ``state_dict`` has the
    same two keys whatever the tasks. Labels, weights or a mask on another device than the logits
    are a ``ValueError`` naming them (``meta`` logits included). Logits on another device than the
    buffers are a ``ValueError``, except ``meta`` logits: shape inference works without moving the
    loss (with ``check_inputs=True`` too, whose value checks skip meta tensors). Reductions other
    than ``mean`` warn once, at construction: only ``mean`` gives DDP gradients equal to
    single-process gradients.

    Shape:
        - logits: :math:`(B, T)` for BCE, :math:`(B, T, C)` for cross-entropy; with Task specs
          :math:`(B, D)`, one column per binary or regression task and ``num_classes`` columns per
          multi-class task, in task order (or :math:`(B, T, C)` when every task is multi-class with
          ``C`` classes). Half precision is computed in float32.
        - labels: :math:`(B, T)`; float, int or bool for BCE; class indices of any integer dtype
          for cross-entropy, where ``-100`` (torch's ``ignore_index``) marks an unlabelled entry;
          in a :math:`(B, D)` block a multi-class task's label is its class index as a number.
        - weights: optional, :math:`(B, T)`, or :math:`(B)` for the same weight on every task.
        - mask: optional bool :math:`(B, T)`, true where a label exists. An entry it leaves out
          (or a cross-entropy label ``-100``) adds nothing to the loss, the count or the gradient,
          whatever its logits, label and weight hold (NaN and inf included).
        - groups: optional integer :math:`(B)`, the group id (request, query, session) of each row,
          any values in any order; required when a task has a ``ranking``.
        - output: a dict ``{"loss/<task>": scalar, ..., "loss": scalar}`` in task order; each task's
          value is :math:`(B)` for ``task_loss_reduction="none"``. float32 for half precision. Ranking
          tasks add ``"ranking/<task>"`` entries after ``"loss"``.

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
        tasks: Sequence[Union[str, Task]],
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
        self.loss_type = parse_loss_type(loss_type)
        specs = _task_specs(tasks, self.loss_type)
        self.tasks = tuple(task.name if isinstance(task, Task) else task for task in tasks)
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
        self.process_group = process_group
        num_tasks = len(self.tasks)
        kinds = ["multiclass" if spec is None else spec.kind for spec in specs]
        binary = [kind == "binary" for kind in kinds]
        self.register_buffer(
            "pos_weight", _from_specs("pos_weights", pos_weights, "pos_weight", specs, self.tasks, binary)
        )
        self.register_buffer(
            "task_weight", _from_specs("task_weights", task_weights, "weight", specs, self.tasks, [True] * num_tasks)
        )
        #: The Python floats of the buffers as given (by the Tasks, or as numbers), for :meth:`_apply`.
        self._spec_floats: dict[str, tuple[float, ...]] = {}
        for name, argument, field in (
            ("pos_weight", pos_weights, "pos_weight"),
            ("task_weight", task_weights, "weight"),
        ):
            if argument is None:
                self._spec_floats[name] = tuple(1.0 if spec is None else float(getattr(spec, field)) for spec in specs)
            elif not isinstance(argument, torch.Tensor):  # a sequence or an array of numbers, checked above
                import numpy

                self._spec_floats[name] = tuple(float(x) for x in numpy.asarray(argument, dtype=numpy.float64))
        self._build_groups(specs, kinds)
        self._keys = tuple(f"loss/{task}" for task in self.tasks)
        if self.ranking is not None and self.task_loss_reduction == "none":
            raise ValueError(
                f"Expected `task_loss_reduction` to be 'mean' or 'sum' with ranking tasks {list(self.ranking.names)}: "
                "a ranking term has no value per sample; got 'none'."
            )
        self._ranking_keys = () if self.ranking is None else tuple(f"ranking/{name}" for name in self.ranking.names)
        # mean and sum over tasks are a weighted sum, which each kind's pass computes itself;
        # min, max and median are taken from the task losses.
        factors = {"mean": 1.0 / num_tasks, "sum": 1.0}
        self._global_factor: Optional[float] = factors.get(self.global_reduction)
        self.weighting = check_weighting(weighting, self.tasks)
        weighted = [spec.name for spec in specs if spec is not None and spec.weight != 1.0]
        if weighting is not None and (
            task_weights is not None or weighted or global_reduction != "mean" or task_loss_reduction == "none"
        ):
            raise ValueError(
                "Expected `weighting` alone to combine the task losses, with one loss per task: it replaces "
                f"`task_weights` (and a Task's `weight`) and `global_reduction`; got task_weights={task_weights!r}, "
                f"Tasks with a weight {weighted}, global_reduction={global_reduction!r}, "
                f"task_loss_reduction={task_loss_reduction!r}."
            )
        warn_unless_mean("task_loss_reduction", self.task_loss_reduction)
        warn_unless_mean("global_reduction", self.global_reduction)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> MultiTaskLoss:
        # A dtype cast of a buffer that still holds the Tasks' values takes them from the Python
        # floats, not from their float32 rounding: Task(pos_weight=0.1) is 0.1 in a `.double()` loss.
        # A buffer loaded with other values (a checkpoint) is cast as it is.
        kept = {
            name: values
            for name, values in getattr(self, "_spec_floats", {}).items()
            if _holds(getattr(self, name), values)
        }
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        for name, values in kept.items():
            buffer = getattr(self, name)
            if buffer.is_floating_point():
                setattr(self, name, torch.tensor(values, dtype=buffer.dtype, device=buffer.device))
        return self

    def _build_groups(self, specs: Sequence[Optional[Task]], kinds: Sequence[str]) -> None:
        """One row per kind present (the table in ``losses._task_groups``), and the layout of the logits."""
        num_tasks = len(specs)
        widths = [None if spec is None else spec.columns for spec in specs]
        classes = {spec.num_classes for spec in specs if spec is not None and spec.kind == "multiclass"}
        #: ``C`` (or ``None``: from the logits) when logits may come as ``[B, T, C]``; ``False`` when not.
        self._class_layout: Union[int, bool, None] = (
            (next(iter(classes)) if classes else None) if set(kinds) == {"multiclass"} and len(classes) <= 1 else False
        )
        if None in widths and set(kinds) != {"multiclass"}:
            unnamed = [task for task, spec in zip(self.tasks, specs, strict=True) if spec is None]
            raise ValueError(
                f"Expected every multiclass task of a block with other kinds to be a Task with `num_classes`: the "
                f"tasks {unnamed} are names under loss_type 'cross_entropy', whose class count only [B, T, C] "
                "logits give, and a block with binary or regression tasks is [B, D]."
            )
        #: Columns of the ``[B, D]`` layout (``None``: only ``[B, T, C]`` logits, the class count unknown).
        self._width: Optional[int] = None if None in widths else sum(w for w in widths if w is not None)
        starts, column = [], 0
        for width in widths:
            starts.append(column)
            column += width or 1
        groups, positions, logit_columns = [], [], []
        for kind, group in GROUPS.items():
            members = [t for t in range(num_tasks) if kinds[t] == kind]
            if members:
                groups.append(group(members, [specs[t] for t in members]))
                positions.append(members)
                logit_columns.append([starts[t] + c for t in members for c in range(widths[t] or 1)])
        if len(groups) > 1:  # the rows' logits are parts of the block: messages show the block's columns
            for row in groups:
                row.logit_starts = tuple(starts[t] for t in row.positions)
        self.kinds = nn.ModuleList(groups)
        #: Each row's option buffers, checked in every call (see _check_shapes).
        self._option_names = tuple((group, name) for group in groups for name in group.option_names())
        # The same rows as a tuple, read in forward: indexing a ModuleList costs a microsecond a call.
        self._groups: tuple[TaskGroup, ...] = tuple(groups)
        self.split = RowSplit(positions, logit_columns)
        ranked = any(spec is not None and spec.ranking is not None for spec in specs)
        #: The tasks' ranking terms (``docs/ranking_losses.rst``), or ``None`` when no task has one.
        self.ranking: Optional[RankingTerms] = RankingTerms(specs, starts) if ranked else None
        only = groups[0] if len(groups) == 1 else None
        # One plain binary task has nothing to fuse: torch's own BCE call is the cheapest way.
        self._one_plain_task = (
            num_tasks == 1
            and not ranked
            and isinstance(only, GROUPS["binary"])
            and all(getattr(only, name) is None for name in ("focal_gamma", "label_smoothing", "neg_sampling_rate"))
        )

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
        groups: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        losses = self._losses(logits, labels, weights, mask, group_ids=groups)
        if self.weighting is None:
            return losses
        # The weighting combines the task losses; the ranking terms, logged beside them, pass by it.
        ranking = {key: losses.pop(key) for key in self._ranking_keys}
        return {**self.weighting(losses), **ranking}

    def _losses(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weights: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
        group_ids: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        pos_weight, task_weight = self.pos_weight, self.task_weight  # each a module attribute lookup: once
        self._check_shapes(logits, labels, weights, mask, pos_weight, task_weight)
        ranking = None
        if self.ranking is not None:
            logits, ranked = self.ranking.fork(logits)
            ranking = self.ranking.sums(ranked, labels, weights, mask, group_ids)
        pos_weight = v.on_device_of("pos_weight", pos_weight, logits)
        task_weight = v.on_device_of("task_weight", task_weight, logits)
        if self._one_plain_task and mask is None and (self.normalize == "local" or not distributed.is_distributed()):
            if self.check_inputs:
                self._check_values([(logits, labels, weights, mask)], weights)
            if self.task_loss_reduction != "none":
                # One task has nothing to fuse: torch's own BCE call, which reduces in C++, is the
                # cheapest way, and it is the same math.
                if weights is not None and weights.ndim == 1:
                    weights = weights.unsqueeze(1)
                task_loss = functional.binary_cross_entropy_with_logits(
                    logits, labels, weights, pos_weight, reduction=self.task_loss_reduction
                )
                return {self._keys[0]: task_loss, "loss": task_loss * task_weight.squeeze(0)}
        groups, factor = self._groups, self._global_factor
        if len(groups) == 1:
            # One kind: its row is the whole block, nothing to split or join (the common case, kept
            # free of the bookkeeping below: it shows at small batches).
            group = groups[0]
            row = (group.prepare(logits), labels, weights, group.labelled(labels, mask))
            if self.check_inputs:
                self._check_values((row,), weights)
            if self.task_loss_reduction == "none":
                elements = group.elements(row, pos_weight)
                return self._result(elements.unbind(1), elements.t(), task_weight)
            scale, ranking_scale = self._task_scale((row[3],), logits, ranking)
            task_losses, total = group.sums(row, pos_weight, scale, task_weight, factor)
            if ranking is not None:
                return self._with_ranking(task_losses, total, task_weight, ranking[0], ranking_scale)
            return self._result(task_losses.unbind(), task_losses, task_weight, None if factor is None else total)
        # Each row takes its own columns; a row may leave out more entries than the mask (label -100).
        split = self.split
        rows: list[Inputs] = [
            (group.prepare(x), y, w, group.labelled(y, m))
            for group, x, y, w, m in zip(
                groups,
                split.logits(logits),
                split.per_task(labels),
                split.per_task(weights),
                split.per_task(mask),
                strict=True,
            )
            if y is not None
        ]
        if self.check_inputs:
            self._check_values(rows, weights)
        pos_weights = split.vector(pos_weight)
        if self.task_loss_reduction == "none":
            parts = [group.elements(row, p) for group, row, p in zip(groups, rows, pos_weights, strict=True)]
            joined = split.join(parts, dim=1)
            return self._result(joined.unbind(1), joined.t(), task_weight)
        scale, ranking_scale = self._task_scale([row[3] for row in rows], logits, ranking)
        scales = split.vector(scale) if isinstance(scale, torch.Tensor) else [scale] * len(groups)
        sums = [
            group.sums(row, p, s, tau, factor)
            for group, row, p, s, tau in zip(groups, rows, pos_weights, scales, split.vector(task_weight), strict=True)
        ]
        task_losses = split.join([part for part, _ in sums], dim=0)
        # The global mean and sum are linear in the task losses: the sum of the rows' totals.
        total = sums[0][1]
        for _, row_total in sums[1:]:
            total = total + row_total
        if ranking is not None:
            return self._with_ranking(task_losses, total, task_weight, ranking[0], ranking_scale)
        if factor is None:
            return self._result(task_losses.unbind(), task_losses, task_weight)
        return self._result(task_losses.unbind(), task_losses, task_weight, total)

    def _check_shapes(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weights: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
        pos_weight: torch.Tensor,
        task_weight: torch.Tensor,
    ) -> None:
        """The layouts: ``[B, T, C]`` when every task is multi-class, else ``[B, D]`` (``[B, T]`` without classes)."""
        # The constants too: torch.func.functional_call may hand in a replacement that requires grad.
        constants: tuple[tuple[str, torch.Tensor], ...] = (("pos_weight", pos_weight), ("task_weight", task_weight))
        if self._option_names:
            constants += tuple((name, getattr(group, name)) for group, name in self._option_names)
        if self.ranking is not None:
            constants += (("ranking_weight", self.ranking.ranking_weight),)
        checks.check_multi_task_loss_inputs(
            logits, labels, weights, mask, len(self.tasks), self._class_layout, self._width, constants
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
        losses["loss"] = unchecked_reduce_tasks(reduced, task_weight, self.global_reduction) if total is None else total
        return losses

    def _with_ranking(
        self,
        task_losses: torch.Tensor,
        total: torch.Tensor,
        task_weight: torch.Tensor,
        ranking_sums: torch.Tensor,
        ranking_scale: Scale,
    ) -> dict[str, torch.Tensor]:
        """The output dict with each ranked task's ``ranking_weight * ranking`` added, and ``"ranking/<task>"``."""
        assert self.ranking is not None
        terms = ranking_sums if ranking_scale is None else ranking_sums * ranking_scale
        positions = v.on_device_of("positions", self.ranking.positions, task_losses)
        added = terms * v.on_device_of("ranking_weight", self.ranking.ranking_weight, terms).to(terms.dtype)
        task_losses = task_losses.index_add(0, positions, added.to(task_losses.dtype))
        result = self._result(
            task_losses.unbind(),
            task_losses,
            task_weight,
            None
            if self._global_factor is None
            else total + torch.dot(added, task_weight.index_select(0, positions).to(added.dtype)) * self._global_factor,
        )
        result.update(zip(self._ranking_keys, terms.detach().unbind(), strict=True))
        return result

    def _task_scale(
        self,
        masks: Sequence[Optional[torch.Tensor]],
        logits: torch.Tensor,
        ranking: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> tuple[Scale, Scale]:
        """What multiplies each task's sum: one over its labelled count for ``mean``, nothing for ``sum``.

        ``masks`` holds each row's labelled entries (``None``: all of them). The second scale is the
        ranking terms' (one over their pair or list counts), given their ``(sums, counts)``: with
        ``normalize="global"`` both kinds of counts go in one ``all_reduce``.
        """
        if self.task_loss_reduction != "mean":
            return None, None
        batch = logits.shape[0]
        dtype = functional.compute_dtype(logits.dtype)
        across_ranks = self.normalize == "global" and distributed.is_distributed()
        ranking_counts = None if ranking is None else ranking[1].to(dtype)
        if not across_ranks and (masks[0] is None if len(masks) == 1 else all(mask is None for mask in masks)):
            return 1.0 / max(batch, 1), None if ranking_counts is None else ranking_counts.clamp_min(1).reciprocal()
        if len(masks) == 1:
            counts = functional.task_counts(masks[0], batch, len(self.tasks), dtype, logits.device)
        else:
            counts = self.split.join(
                [
                    functional.task_counts(mask, batch, len(group.positions), dtype, logits.device)
                    for group, mask in zip(self._groups, masks, strict=True)
                ],
                dim=0,
            )
        if across_ranks:
            group = self._group.get()
            if ranking_counts is not None:
                counts = torch.cat([counts, ranking_counts])
            # An empty task's sum is 0, so dividing it by 1 instead of 0 gives the 0 we want.
            scales = distributed.world_size(group) / distributed.all_reduce_sum(counts, group).clamp_min(1)
            if ranking_counts is None:
                return scales, None
            return scales[: len(self.tasks)], scales[len(self.tasks) :]
        return counts.clamp_min(1).reciprocal(), None if ranking_counts is None else ranking_counts.clamp_min(
            1
        ).reciprocal()

    def _check_values(self, rows: Sequence[Inputs], weights: Optional[torch.Tensor]) -> None:
        # Only labelled entries are checked: the others contribute nothing, whatever they hold.
        for group, row in zip(self._groups, rows, strict=True):
            group.check_values(row)
            row_weights, row_mask = row[2], row[3]
            if row_weights is not None and row_weights.ndim == 2:
                v.check_values("weights", row_weights, low=0, where=row_mask, index_map=group.task_index)
        if weights is not None and weights.ndim == 1:
            v.check_values("weights", weights, low=0)
