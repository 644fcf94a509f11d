"""The tasks of one kind inside a :class:`~losses.MultiTaskLoss`: one row of the table of kinds.

A row holds the options of its tasks' loss as buffers and computes all of them in one fused pass
through :mod:`losses.functional`. ``MultiTaskLoss`` builds one row per kind present, at
construction, and a :class:`RowSplit` that hands each row its columns; ``forward`` runs each row
once. A new kind is a new row in :data:`GROUPS`, not a branch in ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional, Union

import torch
from torch import nn

from losses import _validation as v
from losses import functional
from losses._fused_bce import column_sums
from losses.task import Task

Scale = Union[float, torch.Tensor, None]
#: A row's part of the batch: logits, labels, weights (``[B, T_k]`` or the shared ``[B]``), mask.
Inputs = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]


class RowSplit(nn.Module):
    """Hands each row its columns of a batch, and puts the rows' results back in task order.

    The rows' columns are gathered into row order once (no gather when the tasks already come
    grouped by kind) and split into one contiguous part per row. Contiguous, because elementwise
    kernels on a view whose rows skip columns run unvectorized, up to 15x slower (softplus) than on
    a copy, which costs one pass. The gradient of the logits is then one ``cat`` of the rows'
    gradients (and one scatter for a gather), not a zero-filled ``[B, D]`` tensor per row.
    """

    task_order: Optional[torch.Tensor]
    task_inverse: Optional[torch.Tensor]
    logit_order: Optional[torch.Tensor]

    def __init__(self, positions: Sequence[Sequence[int]], logit_columns: Sequence[Sequence[int]]) -> None:
        super().__init__()
        tasks = [t for row in positions for t in row]
        logits = [c for row in logit_columns for c in row]
        self.task_sizes = [len(row) for row in positions]
        self.logit_sizes = [len(row) for row in logit_columns]
        self.rows = len(self.task_sizes)
        inverse = sorted(range(len(tasks)), key=tasks.__getitem__)
        # Not persistent: derived from the task list at construction, like every buffer of a row.
        for name, order in (("task_order", tasks), ("task_inverse", inverse), ("logit_order", logits)):
            identity = order == list(range(len(order)))
            self.register_buffer(name, None if identity else torch.tensor(order), persistent=False)

    def _split(self, tensor: torch.Tensor, order: str, sizes: list[int]) -> list[torch.Tensor]:
        if self.rows == 1:
            return [tensor]
        index = getattr(self, order)
        if index is not None:
            tensor = tensor.index_select(1, v.on_device_of(order, index, tensor))
        return [part.contiguous() for part in torch.split(tensor, sizes, dim=1)]

    def logits(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """Each row's logit columns; ``[B, T, C]`` logits (one multi-class row) as they are."""
        return self._split(logits, "logit_order", self.logit_sizes)

    def per_task(self, block: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        """Each row's columns of a ``[B, T]`` tensor; a ``[B]`` tensor or ``None`` is shared by all."""
        if block is None or block.ndim == 1:
            return [block] * self.rows
        return list(self._split(block, "task_order", self.task_sizes))

    def vector(self, vector: torch.Tensor) -> Sequence[torch.Tensor]:
        """Each row's entries of a per-task vector ``[T]``."""
        if self.rows == 1:
            return (vector,)
        if self.task_order is not None:
            vector = vector.index_select(0, v.on_device_of("task_order", self.task_order, vector))
        return torch.split(vector, self.task_sizes)

    def join(self, parts: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
        """The rows' results (one entry per task along ``dim``) joined in task order."""
        if self.rows == 1:
            return parts[0]
        joined = torch.cat(list(parts), dim)
        if self.task_inverse is None:
            return joined
        return joined.index_select(dim, v.on_device_of("task_inverse", self.task_inverse, joined))


class TaskGroup(nn.Module):
    """The tasks of one kind: their options (buffers) and their fused pass.

    A subclass implements :meth:`elements`, the masked, weighted element losses of its tasks
    ``[B, T_k]``; :meth:`sums` reduces them per task unless the kind has a faster fused pass, and
    :meth:`labelled` may exclude entries beyond the mask (a class index ``-100``).
    """

    kind = ""

    def __init__(self, positions: Sequence[int], tasks: Sequence[Optional[Task]]) -> None:
        super().__init__()
        #: The row's tasks' positions in the task order, for messages.
        self.positions = tuple(positions)
        #: Each task's first column in a ``[B, D]`` block with other rows, for messages; ``None``
        #: when the row is the whole block, whose indices are the caller's own.
        self.logit_starts: Optional[tuple[int, ...]] = None
        #: The Python floats of each option buffer, as the Tasks gave them.
        self._option_values: dict[str, tuple[float, ...]] = {}

    def register_option(self, name: str, values: Optional[Sequence[float]]) -> None:
        """A per-task option as a float64 buffer (``None``: every task keeps the default).

        Float64 holds the Python floats of the Tasks exactly, and stays float64 under a dtype cast
        of the module (:meth:`_apply`): ``label_smoothing=0.1`` is 0.1 in a float64 loss, and
        ``.half()`` or Lightning's ``"bf16-true"`` do not round it. The kernels convert it to their
        compute dtype. Not persistent: it comes from the Tasks, not from a checkpoint.
        """
        if values is not None:
            self._option_values[name] = tuple(float(value) for value in values)
        tensor = None if values is None else torch.tensor(values, dtype=torch.float64)
        self.register_buffer(name, tensor, persistent=False)

    def option_names(self) -> tuple[str, ...]:
        """The names of the option buffers some task of the row sets."""
        return tuple(self._option_values)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> TaskGroup:
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        for name, values in self._option_values.items():
            buffer = getattr(self, name)
            if buffer.dtype != torch.float64:  # a cast: the Tasks' values again, where fn put the buffer
                setattr(self, name, torch.tensor(values, dtype=torch.float64, device=buffer.device))
        return self

    def task_index(self, index: tuple[int, ...]) -> tuple[int, ...]:
        """The block's ``[B, T]`` index of an entry ``(b, t_k)`` of the row's labels, weights or mask."""
        return (index[0], self.positions[index[1]], *index[2:])

    def logit_index(self, index: tuple[int, ...]) -> tuple[int, ...]:
        """The index in the logits the caller passed of an entry of the row's (prepared) logits."""
        if self.logit_starts is None:
            return index
        # (b, t_k) for one column per task, (b, t_k, c) for a multi-class task's class c.
        return (index[0], self.logit_starts[index[1]] + (index[2] if len(index) > 2 else 0))

    def prepare(self, logits: torch.Tensor) -> torch.Tensor:
        """The row's logits in the shape its math takes (``[B, T_k]`` unless the kind has classes)."""
        return logits

    def labelled(self, labels: torch.Tensor, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Which entries count (``None``: all); by default the mask itself."""
        return mask

    def elements(self, inputs: Inputs, pos_weight: torch.Tensor) -> torch.Tensor:
        """The element losses ``[B, T_k]``: 0 wherever the mask is false, whatever the inputs hold there."""
        raise NotImplementedError

    def sums(
        self, inputs: Inputs, pos_weight: torch.Tensor, scale: Scale, task_weight: torch.Tensor, factor: Optional[float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-task losses ``scale * sum_b l_bt``, ``[T_k]``, and ``factor * sum_t task_weight_t L_t`` (0 without)."""
        task_losses = column_sums(self.elements(inputs, pos_weight).contiguous())
        if scale is not None:
            task_losses = task_losses * scale
        if factor is None:
            return task_losses, task_losses.new_zeros(())
        return task_losses, torch.dot(task_losses, task_weight.to(task_losses.dtype)) * factor

    def check_values(self, inputs: Inputs) -> None:
        """The opt-in value checks (``check_inputs=True``) of labelled entries; they wait for the device."""
        logits, labels, _, mask = inputs
        v.check_values("logits", logits, where=mask, index_map=self.logit_index)
        v.check_values("labels", labels, where=mask, index_map=self.task_index)


def _vector(values: Sequence[float], default: float) -> Optional[list[float]]:
    """Per-task values, or ``None`` when every task keeps the default (its math is then skipped)."""
    if all(value == default for value in values):
        return None
    return list(values)


#: The gammas whose power is a product (torch's pow multiplies for 2 and 3), not an exponential.
_PRODUCT_POWERS = {1.0, 2.0, 3.0}


class BinaryTasks(TaskGroup):
    """Binary tasks: BCE with ``pos_weight``, label smoothing, focal modulation and negative sampling.

    One autograd node with an analytic gradient (:func:`losses.functional.multi_task_bce`). The
    kernel is chosen here, once: the plain one unless some task has a ``focal_gamma`` or a
    ``focal_alpha``; smoothing and sampling rates cost a pass each only when some task sets them.
    """

    kind = "binary"
    focal_gamma: Optional[torch.Tensor]
    focal_alpha: Optional[torch.Tensor]
    label_smoothing: Optional[torch.Tensor]
    neg_sampling_rate: Optional[torch.Tensor]
    pointwise_weight: Optional[torch.Tensor]

    def __init__(self, positions: Sequence[int], tasks: Sequence[Optional[Task]]) -> None:
        super().__init__(positions, tasks)
        specs = [Task("_") if task is None else task for task in tasks]
        focal = any(task.focal_gamma or task.focal_alpha is not None for task in specs)
        # NaN stands for "no alpha" (both targets weigh 1); see functional.multi_task_bce.
        alphas = [float("nan") if task.focal_alpha is None else task.focal_alpha for task in specs]
        self.register_option("focal_gamma", [task.focal_gamma for task in specs] if focal else None)
        #: With every gamma 0 or one k in {1, 2, 3}, the focal modulations are products s^k, not
        #: exponentials (see functional.unchecked_multi_task_bce); 0: exponentials. A focal row of
        #: alphas alone takes k = 1 (every task's modulation then exactly 1).
        gammas = {task.focal_gamma for task in specs} - {0.0}
        self._focal_power = int(max(gammas, default=1.0)) if len(gammas) <= 1 and gammas <= _PRODUCT_POWERS else 0
        #: The buffer that power was read from: a replacement (torch.func.functional_call) takes exponentials.
        self._gamma_of_power = self.focal_gamma
        self.register_option("focal_alpha", alphas if focal else None)
        self.register_option("label_smoothing", _vector([task.label_smoothing for task in specs], 0.0))
        self.register_option("neg_sampling_rate", _vector([task.neg_sampling_rate for task in specs], 1.0))
        # A ranking task's pointwise_weight scales its pointwise term (0: ranking only, graded labels allowed).
        self.register_option("pointwise_weight", _vector([task.pointwise_weight for task in specs], 1.0))
        #: The options some task sets: the others' math is skipped, and so is looking them up.
        self._used = tuple(
            name
            for name in ("focal_gamma", "focal_alpha", "label_smoothing", "neg_sampling_rate")
            if getattr(self, name) is not None
        )

    def extra_repr(self) -> str:
        return f"tasks={len(self.positions)}, kernel={'focal' if self.focal_gamma is not None else 'plain'}"

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> TaskGroup:
        super()._apply(fn, recurse)
        self._gamma_of_power = self.focal_gamma  # moved or cast, the same values
        return self

    def _options(self, logits: torch.Tensor) -> dict[str, Optional[torch.Tensor]]:
        return {name: v.on_device_of(name, getattr(self, name), logits) for name in self._used}

    def elements(self, inputs: Inputs, pos_weight: torch.Tensor) -> torch.Tensor:
        logits, labels, weights, mask = inputs
        elements = functional.unchecked_multi_task_bce_elements(
            logits, labels, pos_weight, weights, mask, **self._options(logits)
        )
        if self.pointwise_weight is not None:
            elements = elements * v.on_device_of("pointwise_weight", self.pointwise_weight, elements).to(elements.dtype)
        return elements

    def sums(
        self, inputs: Inputs, pos_weight: torch.Tensor, scale: Scale, task_weight: torch.Tensor, factor: Optional[float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, labels, weights, mask = inputs
        if self.pointwise_weight is not None:
            # float64 like every option (the Task's exact float): the kernel's scale takes its compute dtype.
            pointwise = v.on_device_of("pointwise_weight", self.pointwise_weight, logits)
            pointwise = pointwise.to(functional.compute_dtype(logits.dtype))
            scale = pointwise if scale is None else pointwise * scale
        if not self._used:  # plain BCE: the keyword arguments cost more than the tiny batches' math
            return functional.unchecked_multi_task_bce(
                logits, labels, pos_weight, weights, mask, scale, task_weight, factor
            )
        return functional.unchecked_multi_task_bce(
            logits,
            labels,
            pos_weight,
            weights,
            mask,
            scale,
            task_weight,
            factor,
            focal_power=self._focal_power if self.focal_gamma is self._gamma_of_power else 0,
            **self._options(logits),
        )

    def check_values(self, inputs: Inputs) -> None:
        logits, labels, _, mask = inputs
        if self.pointwise_weight is not None:  # a ranking-only task (pointwise_weight 0) may have graded labels
            graded = self.pointwise_weight.to(labels.device) == 0
            v.check_values("labels", labels, low=0, where=mask, index_map=self.task_index)
            pointwise = ~graded.expand_as(labels) if mask is None else mask & ~graded
            v.check_values("labels", labels, high=1, where=pointwise, index_map=self.task_index)
        else:
            v.check_values("labels", labels, low=0, high=1, where=mask, index_map=self.task_index)
        v.check_values("logits", logits, where=mask, index_map=self.logit_index)


class MulticlassTasks(TaskGroup):
    """Multi-class tasks: softmax cross-entropy with label smoothing over each task's classes.

    In a ``[B, D]`` block a task owns ``num_classes`` columns; tasks with fewer classes than the
    largest are padded, and the padding is left out of the softmax. In the ``[B, T, C]`` layout the
    class dimension is the logits' last. A label ``-100`` (torch's ``ignore_index``) is unlabelled.
    """

    kind = "multiclass"
    label_smoothing: Optional[torch.Tensor]
    num_classes: Optional[torch.Tensor]
    padding_index: Optional[torch.Tensor]

    def __init__(self, positions: Sequence[int], tasks: Sequence[Optional[Task]]) -> None:
        super().__init__(positions, tasks)
        # A name under loss_type="cross_entropy" (None) takes its class count from [B, T, C] logits.
        known = [task.num_classes for task in tasks if task is not None and task.num_classes is not None]
        self.classes = max(known) if known else None
        index: Optional[torch.Tensor] = None
        if len(set(known)) > 1:
            # Pad every task to the widest: its own column c for c < C_t, else its first again (then
            # masked out of the softmax by `num_classes`).
            columns, start = [], 0
            for count in known:
                columns += [start + (c if c < count else 0) for c in range(max(known))]
                start += count
            index = torch.tensor(columns)
        self.register_buffer("padding_index", index, persistent=False)
        self.register_buffer(
            "num_classes", None if index is None else torch.tensor(known, dtype=torch.long), persistent=False
        )
        smoothing = [0.0 if task is None else task.label_smoothing for task in tasks]
        self.register_option("label_smoothing", _vector(smoothing, 0.0))

    def extra_repr(self) -> str:
        return f"tasks={len(self.positions)}, classes={self.classes}"

    def prepare(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.ndim == 3:  # the [B, T, C] layout: every task is multi-class
            return logits
        if self.padding_index is not None:
            logits = logits.index_select(1, v.on_device_of("padding_index", self.padding_index, logits))
        tasks = len(self.positions)
        return logits.reshape(logits.shape[0], tasks, logits.shape[1] // tasks)

    def labelled(self, labels: torch.Tensor, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        labelled = labels != functional.IGNORE_INDEX
        return labelled if mask is None else labelled & mask

    def elements(self, inputs: Inputs, pos_weight: torch.Tensor) -> torch.Tensor:
        logits, labels, weights, mask = inputs
        elements, _ = functional.unchecked_multi_task_cross_entropy(
            logits,
            labels,
            weights,
            mask,
            label_smoothing=v.on_device_of("label_smoothing", self.label_smoothing, logits),
            num_classes=v.on_device_of("num_classes", self.num_classes, logits),
        )
        return elements

    def check_values(self, inputs: Inputs) -> None:
        logits, labels, _, mask = inputs
        labelled = self.labelled(labels, mask)
        assert labelled is not None
        v.check_values(
            "labels",
            labels,
            low=0,
            high=logits.shape[-1] - 1,
            where=mask,
            allowed=functional.IGNORE_INDEX,
            index_map=self.task_index,
        )
        # Beyond that check: whole numbers (float labels of a [B, D] block), each task's own class count.
        if (
            (labels.is_floating_point() or self.num_classes is not None)
            and labels.device.type != "meta"
            and not torch.compiler.is_compiling()
        ):
            bad = labels != labels.trunc() if labels.is_floating_point() else torch.zeros_like(labelled)
            if self.num_classes is not None:
                bad |= labels >= v.on_device_of("num_classes", self.num_classes, labels)
            bad &= labelled
            if bool(bad.any()):
                row, column = (int(i) for i in bad.nonzero()[0])
                raise ValueError(
                    f"Expected the `labels` of multiclass tasks to be class indices in [0, num_classes) of their "
                    f"task, or {functional.IGNORE_INDEX}; got {int(bad.sum())} entries that are not, the first at "
                    f"index {(row, self.positions[column])}: {labels[row, column].item()!r}."
                )
        v.check_values("logits", logits, where=labelled.unsqueeze(-1).expand_as(logits), index_map=self.logit_index)


class RegressionTasks(TaskGroup):
    """Regression tasks: half the squared error, ``0.5 (x - y)^2``, per entry."""

    kind = "regression"

    def extra_repr(self) -> str:
        return f"tasks={len(self.positions)}"

    def elements(self, inputs: Inputs, pos_weight: torch.Tensor) -> torch.Tensor:
        logits, labels, weights, mask = inputs
        return functional.unchecked_multi_task_squared_error(logits, labels, weights, mask)


#: The table of kinds: a task kind's row. The order is the order of the passes.
GROUPS: dict[str, type[TaskGroup]] = {
    "binary": BinaryTasks,
    "multiclass": MulticlassTasks,
    "regression": RegressionTasks,
}
