r"""Some columns of the logits taken out for a second term, with both terms' gradients met in one buffer.

When the pointwise terms read all of ``logits`` ``[B, C]`` and the ranking terms read ``R`` of its
columns, autograd sums two ``[B, C]`` gradients: the pointwise one, and the columns' gradient
written into a fresh ``[B, C]`` of zeros (``slice_backward``), added out of place. That is two
``[B, C]`` buffers allocated, faulted in and written for ``R`` columns, which at ``R = 1`` of 16 cost
more than the ranking term's own backward. :class:`ColumnFork` makes the two reads the two outputs of
one node: its backward receives the two gradients apart and adds the ``[B, R]`` one into the columns
of the ``[B, C]`` one, in place.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


def _columns(logits: torch.Tensor, span: Optional[tuple[int, int]], index: torch.Tensor) -> torch.Tensor:
    # A run of consecutive columns is a view; other columns are gathered.
    return logits.narrow(1, *span) if span is not None else logits.index_select(1, index)


class ColumnFork(torch.autograd.Function):
    """``(logits, logits[:, columns])``; the backward adds the second gradient into the first's columns.

    ``span`` is ``(first column, count)`` when the columns are consecutive, else ``None`` and
    ``index`` names them. The first gradient is added to in place: it comes from the module's own
    pointwise terms, whose backward makes a fresh tensor that nothing else holds. It is copied first
    when it is not contiguous or has a zero stride (a broadcast, say), and the add is out of place
    when the backward is itself recorded (``create_graph``).
    """

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, span: Optional[tuple[int, int]], index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        ctx.span, ctx.shape = span, logits.shape
        ctx.save_for_backward(index)
        # The input itself as the first output: autograd makes it a view of ``logits``, no copy.
        return logits, _columns(logits, span, index)

    @staticmethod
    def backward(
        ctx: Any, grad_all: Optional[torch.Tensor], grad_columns: Optional[torch.Tensor]
    ) -> tuple[Optional[torch.Tensor], None, None]:
        if grad_columns is None:
            return grad_all, None, None
        (index,) = ctx.saved_tensors
        if grad_all is None:
            grad_all = grad_columns.new_zeros(ctx.shape)
        elif torch.is_grad_enabled():  # create_graph: a differentiable, out-of-place sum
            if ctx.span is not None:
                index = torch.arange(ctx.span[0], ctx.span[0] + ctx.span[1], device=grad_all.device)
            return grad_all.index_add(1, index, grad_columns), None, None
        elif not grad_all.is_contiguous() or 0 in grad_all.stride():
            # A broadcast has no entry of its own to add to. Over size-1 dims (B = 1) it passes for
            # contiguous, yet its zero strides still alias the gradient it was expanded from.
            grad_all = grad_all.clone(memory_format=torch.contiguous_format)
        if ctx.span is not None:
            grad_all.narrow(1, *ctx.span).add_(grad_columns)
        else:
            grad_all.index_add_(1, index, grad_columns)
        return grad_all, None, None


def fork_columns(
    logits: torch.Tensor, span: Optional[tuple[int, int]], index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, columns)`` for the pointwise and the ranking terms, through :class:`ColumnFork` when it pays.

    Without a gradient to form, under ``torch.compile`` (whose own fusion makes the sum cheap, and
    which should not trace an in-place write to a gradient) and under ``torch.func`` transforms (no
    vmap rule here), the columns are plain views or gathers.
    """
    if (
        not (torch.is_grad_enabled() and logits.requires_grad)
        or torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
    ):
        return logits, _columns(logits, span, index)
    forked: tuple[torch.Tensor, torch.Tensor] = ColumnFork.apply(logits, span, index)  # type: ignore[no-untyped-call]
    return forked
