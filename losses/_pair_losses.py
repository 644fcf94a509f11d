r"""The pair losses of the ranking terms, fused with their gradient: one pass over pairs each way.

A pair ``p`` of sorted positions ``(h, l)`` (``h`` the higher label) has the margin
:math:`z_p = x_l - x_h` (the score the lower-labelled entry wins by) and the loss
:math:`w_p f(z_p)`. :class:`SortedPairLossSums` returns the per-column sums of these and, in the
same forward, adds :math:`w_p f'(z_p)` at ``l`` and subtracts it at ``h`` (two ``index_add``): its
backward only scales each entry's sum by the incoming gradient, instead of an autograd graph of a
dozen small nodes over ``[P]`` tensors. Each kind of pair loss is one row of :data:`PAIR_LOSSES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F

from losses._once_differentiable import once_differentiable
from losses._ragged import per_column_sums


class PairLoss(NamedTuple):
    """A pair loss ``f`` of the margin ``z``, its derivative ``f'``, and ``w f'(z)`` in as few ops as it takes."""

    value: Callable[[torch.Tensor], torch.Tensor]
    slope: Callable[[torch.Tensor], torch.Tensor]
    weighted_slope: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


#: ``logistic``: :math:`\log(1 + e^z)`, slope :math:`\sigma(z)`; ``hinge``: :math:`\max(0, 1 + z)`,
#: slope 1 where :math:`1 + z > 0` (0 at the kink, as ``relu``).
PAIR_LOSSES: dict[str, PairLoss] = {
    # Past softplus's threshold (z > 20) its slope is 1; sigmoid(z) there is within e^-20 of it.
    "logistic": PairLoss(F.softplus, torch.sigmoid, lambda z, w: torch.sigmoid(z).mul_(w)),
    "hinge": PairLoss(
        lambda z: torch.relu(1 + z), lambda z: (z > -1).to(z.dtype), lambda z, w: torch.where(z > -1, w, 0.0)
    ),
}


def _row_weights(
    high: torch.Tensor, low: torch.Tensor, weighted: bool, swap: bool, scratch: bool = False
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Each pair's margin ``x_l - x_h`` and weight from its members' rows ``[x, (gain, discount), (w)]``, ``[K, P]``.

    The weight is ``None`` when it is 1 for every pair. ``scratch``: ``high`` and ``low`` are fresh
    gathers outside autograd, which the swap overwrites in place (the same ops, with no new ``[P]``
    tensor each: fewer pages for the allocator to fault in, a lower peak).
    """
    weight = high[-1] * low[-1] if weighted else None
    if not swap:
        return low[0] - high[0], weight
    # The margin, and the differences of gain and discount, in one op; then
    # |delta NDCG| of swapping the pair: |gain_h - gain_l| |discount_h - discount_l|
    if not scratch:
        difference = low[:3] - high[:3]
        delta = (difference[1] * difference[2]).abs()
        return difference[0], delta if weight is None else weight * delta
    difference = low[:3].sub_(high[:3])
    if weight is None:  # a fresh tensor: the sum's dot product reads a row at another offset in other order
        return difference[0], torch.mul(difference[1], difference[2]).abs_()
    return difference[0], weight.mul_(difference[1].mul_(difference[2]).abs_())


def _weighted_sums(
    values: torch.Tensor, weight: Optional[torch.Tensor], column: Optional[torch.Tensor], columns: int
) -> torch.Tensor:
    if column is None and weight is not None:
        return torch.dot(values, weight).reshape(1)  # one op for the product and the sum
    return per_column_sums(values if weight is None else values * weight, column, columns)


class SortedPairLossSums(torch.autograd.Function):
    """``[R]`` sums over pairs of sorted rows of ``weight * f(x[lower] - x[higher])``, weights formed in the pass.

    ``x`` is ``[N]`` in entry order (differentiable); ``rows`` ``[K, N]`` (detached) holds, in sorted
    order (``rows[:, i]`` is entry ``order[i]``): ``x`` itself, then gain and discount if ``swap``
    (lambda_ndcg's ``|delta NDCG|``), then the sample weight if ``weighted``. Forward gathers the rows of
    both members of every pair once (two gathers for all ``K`` values; each row stays contiguous, which
    the pointwise ops need to be vectorised) and already sums each entry's gradient; backward only
    scales it by the incoming gradient of its column.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        rows: torch.Tensor,
        order: torch.Tensor,
        higher: torch.Tensor,
        lower: torch.Tensor,
        column: Optional[torch.Tensor],
        columns: int,
        kind: str,
        weighted: bool,
        swap: bool,
    ) -> torch.Tensor:
        loss = PAIR_LOSSES[kind]
        margin, weight = _row_weights(
            rows.index_select(1, higher), rows.index_select(1, lower), weighted, swap, scratch=True
        )
        sums = _weighted_sums(loss.value(margin), weight, column, columns)
        ctx.columns = columns
        if ctx.needs_input_grad[0]:
            slope = loss.slope(margin) if weight is None else loss.weighted_slope(margin, weight)
            per_row = slope.new_zeros(x.numel()).index_add_(0, lower, slope).index_add_(0, higher, slope, alpha=-1)
            # x too: a recorded backward links its refusal of a second derivative to it
            ctx.save_for_backward(torch.empty_like(per_row).scatter_(0, order, per_row), x)  # to entry order
        return sums

    @staticmethod
    @once_differentiable  # the saved gradient is a constant: a second derivative is refused, not silently 0
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        per_entry = ctx.saved_tensors[0]
        # Entries are task-major (e = r B + b): column r's gradient scales a block of B entries (B may be 0).
        grad_x = (per_entry.view(ctx.columns, per_entry.numel() // ctx.columns) * grad.unsqueeze(1)).reshape(-1)
        return grad_x, None, None, None, None, None, None, None, None, None


def sorted_pair_loss_sums(
    x: torch.Tensor,
    rows: torch.Tensor,
    order: torch.Tensor,
    higher: torch.Tensor,
    lower: torch.Tensor,
    column: Optional[torch.Tensor],
    columns: int,
    kind: str,
    weighted: bool,
    swap: bool,
) -> torch.Tensor:
    """:class:`SortedPairLossSums`, or the same math as plain differentiable ops.

    Plain ops run under a ``torch.func`` transform (the fused Function has no vmap rule) and when
    ``rows`` requires grad (sample weights being learnt), which the fused Function does not give.
    """
    if torch._C._are_functorch_transforms_active() or rows.requires_grad:
        sorted_x = x.index_select(0, order)
        _, weight = _row_weights(rows.index_select(1, higher), rows.index_select(1, lower), weighted, swap)
        margin = sorted_x.index_select(0, lower) - sorted_x.index_select(0, higher)
        return _weighted_sums(PAIR_LOSSES[kind].value(margin), weight, column, columns)
    sums: torch.Tensor = SortedPairLossSums.apply(x, rows, order, higher, lower, column, columns, kind, weighted, swap)  # type: ignore[no-untyped-call]
    return sums
