"""Multi-task binary cross-entropy as one autograd node with an analytic gradient.

Autograd through the element-wise formula would keep several ``[B, T]`` intermediates alive and
replay one backward kernel per forward op. Here the forward writes into a few fresh buffers in
place and keeps nothing but its inputs; the backward rebuilds ``sigmoid(x)`` and forms the
gradient in place. That is what brings the loss within 2x of a single unweighted
``binary_cross_entropy_with_logits`` call (see ``docs/performance.md``).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

Scale = Union[float, torch.Tensor, None]


def _log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    # softplus with beta = -1 is log(sigmoid(x)) computed stably, in one kernel with one output;
    # F.logsigmoid also writes a second [B, T] buffer for its own backward, which we do not use.
    # Past the threshold softplus returns x itself, where log(sigmoid(x)) = x - log1p(exp(x)) = x
    # to within exp(-50).
    return F.softplus(x, beta=-1.0, threshold=50.0)


def column_sums(block: torch.Tensor) -> torch.Tensor:
    """Sum a contiguous ``[B, T]`` block over its rows.

    On the CPU a reduction over the outer dimension of a tall, narrow block is slow; summing
    groups of rows first (a ``[B / 256, 256, T]`` view) is several times faster and, being a
    two-level sum, no less accurate. Under ``torch.compile`` it is a plain ``sum(0)``.
    """
    rows, columns = block.shape
    # Under torch.compile the compiler writes its own reduction, and branching on the row count
    # would build one graph per branch of a dynamic batch size.
    if torch.compiler.is_compiling() or rows < _TWO_LEVEL_ROWS:
        return block.sum(0)
    head = rows - rows % _ROW_GROUP
    sums = block[:head].view(-1, _ROW_GROUP, columns).sum(1).sum(0)
    if head < rows:
        sums = sums + block[head:].sum(0)
    return sums


_ROW_GROUP = 256
_TWO_LEVEL_ROWS = 8192


def _element_losses(
    x: torch.Tensor,
    y: torch.Tensor,
    pos_weight: torch.Tensor,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
) -> torch.Tensor:
    # l = (1 - y) x - (1 + (p - 1) y) log sigmoid(x), in torch's order of operations, so that
    # infinite and huge logits give torch's values: (1 - y) x is a product, never x - y x (at
    # x = +inf, y = 0 that is inf - 0 * inf = NaN where torch gives inf), and the weight
    # multiplies log sigmoid(x) whole, each product rounded on its own (splitting the weight,
    # or a fused multiply-add, leaves 1e22 where torch's terms cancel to 0 at x = -1e30).
    # Two [B, T] buffers, written in place: `weighted` holds (1 + (p - 1) y) log sigmoid(x);
    # `losses` holds log sigmoid(x), then (1 - y) x, then the loss.
    if torch.compiler.is_compiling():
        # The compiler fuses the expression into its kernels, so the count of passes does not
        # matter, and it rounds its own way anyway. The softplus form, (1 - y) softplus(x) -
        # p y log sigmoid(x), keeps (1 - y) a factor (inf-safe as above) and lets the compiler
        # reuse log sigmoid(x) in the gradient's loop, which makes it as fast as before the
        # infinite-logit fix; tests check it against torch at infinite and huge logits too.
        log_sigmoid = _log_sigmoid(x)
        losses = (1.0 - y) * (x - log_sigmoid) - pos_weight * y * log_sigmoid
    else:
        ones = torch.ones_like(pos_weight)
        weighted = torch.addcmul(ones, y, pos_weight - ones)
        losses = _log_sigmoid(x)
        weighted.mul_(losses)
        losses = torch.sub(ones, y, out=losses).mul_(x).sub_(weighted)
        del weighted
    if weights is not None:
        losses.mul_(weights)
    if mask is not None:
        # Filling, not multiplying: an unlabelled entry may hold a NaN label, and NaN * 0 is NaN.
        losses.masked_fill_(mask.logical_not(), 0.0)
    return losses


def _element_gradients(
    x: torch.Tensor,
    y: torch.Tensor,
    pos_weight: torch.Tensor,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    task_scale: torch.Tensor,
) -> torch.Tensor:
    # dl/dx = (1 + (p - 1) y) s - p y = s - y (p + (1 - p) s) with s = sigmoid(x); the bracket is
    # lerp(p, 1, s). Times the weight and the upstream per-task factor, built in one buffer. Under
    # create_graph (double backward) the same steps run out of place, so autograd can follow them.
    in_place = not torch.is_grad_enabled()
    grad = torch.sigmoid(x)
    bracket = torch.lerp(pos_weight, torch.ones_like(pos_weight), grad)
    grad = grad.addcmul_(y, bracket, value=-1).mul_(task_scale) if in_place else (grad - y * bracket) * task_scale
    if weights is not None:
        grad = grad.mul_(weights) if in_place else grad * weights
    if mask is not None:
        grad = grad.masked_fill_(mask.logical_not(), 0.0) if in_place else torch.where(mask, grad, 0.0)
    return grad


class MultiTaskBCE(torch.autograd.Function):
    """Per-task losses ``L_t = scale_t * S_t`` and ``total = factor * sum_t task_weight_t * L_t``.

    ``S_t`` is the masked, weighted sum of task ``t``'s element losses. ``scale`` is a float, a
    ``[T]`` tensor or ``None`` (1); ``factor`` ``None`` skips ``total`` (returned as 0).
    Inputs are already in the compute dtype; ``weights`` is ``[B, T]`` or ``[B, 1]``.
    """

    # forward takes ctx itself (no setup_context): with setup_context, Function.apply binds the
    # arguments through inspect.signature on every call, which costs more than the whole
    # forward for small batches. Python floats are kept out of tensor ops where possible: each
    # one becomes a tensor of its own, a cost that shows for small batches.
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        y: torch.Tensor,
        weights: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
        pos_weight: torch.Tensor,
        scale: Scale,
        task_weight: torch.Tensor,
        factor: Optional[float],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Every tensor below is fresh, so in-place updates are safe and save allocations.
        task_losses = column_sums(_element_losses(x, y, pos_weight, weights, mask))
        if scale is not None:
            task_losses.mul_(scale)
        if factor is None:
            total = task_losses.new_zeros(())
        else:
            total = torch.dot(task_losses, task_weight)
            if factor != 1.0:
                total.mul_(factor)
        scale_tensor = scale if isinstance(scale, torch.Tensor) else None
        ctx.save_for_backward(x, y, weights, mask, pos_weight, scale_tensor, task_weight)
        ctx.scale = None if scale_tensor is not None else scale
        ctx.factor = factor
        # Usually only `total` is backpropagated: no zero gradient is built for the task losses.
        ctx.set_materialize_grads(False)
        return task_losses, total

    @staticmethod
    def backward(
        ctx: Any, grad_tasks: Optional[torch.Tensor], grad_total: Optional[torch.Tensor]
    ) -> tuple[Optional[torch.Tensor], ...]:
        x, y, weights, mask, pos_weight, scale_tensor, task_weight = ctx.saved_tensors
        # What multiplies d(l_bt)/d(x_bt): d(outputs)/d(S_t) = scale_t (g_t + factor task_weight_t g_total).
        factor: Optional[float] = ctx.factor
        scale: Optional[float] = ctx.scale
        upstream = None
        if grad_total is not None and factor is not None:
            upstream = task_weight * grad_total
            if grad_tasks is None:
                # The usual case: both floats fold into one multiply.
                multiplier = factor if scale is None else factor * scale
                if multiplier != 1.0:
                    upstream.mul_(multiplier)
                scale = None
            else:
                if factor != 1.0:
                    upstream.mul_(factor)
                upstream.add_(grad_tasks)
        elif grad_tasks is not None:
            upstream = grad_tasks
        if upstream is None or not ctx.needs_input_grad[0]:
            return (None,) * 8
        if scale is not None:
            upstream = upstream * scale
        if scale_tensor is not None:
            upstream = upstream * scale_tensor
        return _element_gradients(x, y, pos_weight, weights, mask, upstream), None, None, None, None, None, None, None
