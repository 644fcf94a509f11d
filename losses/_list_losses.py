r"""The softmax list loss of the ranking terms, fused with its gradient: the segment sums in one pass.

A list is a run ``s`` of sorted positions (a group of one column), named by its first position. With
:math:`e_i = e^{x_i - m_s}` (:math:`m_s` the run's largest logit), :math:`E_s = \sum e_i`,
:math:`Y_s = \sum y_i` and :math:`\bar w_s` the run's mean weight, a listed run (a positive label
and two different labels) has the loss and the gradient

.. math::
    \ell_s = \bar w_s \Big(\log E_s + m_s - \frac{\sum_i y_i x_i}{Y_s}\Big), \qquad
    \frac{\partial \ell_s}{\partial x_i} = \bar w_s \Big(\frac{e_i}{E_s} - \frac{y_i}{Y_s}\Big).

:class:`SoftmaxListSums` forms every run's sums with one ``index_add`` of the stacked rows, and each
entry's gradient in the same forward; backward only scales it by its column's incoming gradient.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from losses._once_differentiable import once_differentiable
from losses._ragged import per_column_sums


class SoftmaxListSums(torch.autograd.Function):
    """``([R] sums, [R] counts)`` of the listed runs' softmax losses; the gradient goes to ``x`` in entry order.

    ``x`` is ``[N]`` in entry order (differentiable); ``rows`` ``[K, N]`` (detached) holds, in sorted
    order (``rows[:, i]`` is entry ``order[i]``): ``x`` itself, the label, then the sample weight if
    ``weighted`` (else every mean weight is 1). ``start`` names each sorted position's run (its
    first position), ``higher`` counts the entries of the run with a higher label (a run with none
    has equal labels), ``run_column`` is the column of each run id (``None``: one column). Entries
    left out of every list are runs of one: whatever they hold stays in their own run, which is not
    listed, and ``where`` (not a product) keeps it out of the sums and the gradient.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        rows: torch.Tensor,
        order: torch.Tensor,
        start: torch.Tensor,
        higher: torch.Tensor,
        run_column: Optional[torch.Tensor],
        columns: int,
        weighted: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, labels = rows[0], rows[1]
        n = logits.numel()
        peak = logits.new_zeros(n).scatter_reduce_(0, start, logits, "amax", include_self=False)
        exps = torch.exp(logits - peak.index_select(0, start))
        # Every run's sums at once: exp, label, label x logit, pairs (and weight, size), at the run's id.
        parts = [exps, labels, labels * logits, higher] + ([rows[2], torch.ones_like(higher)] if weighted else [])
        sums = logits.new_zeros(len(parts), n).index_add_(1, start, torch.stack(parts))
        exp_sum, label_sum, cross = sums[0], sums[1], sums[2]
        listed = (label_sum > 0) & (sums[3] > 0)
        # Ids that are no run's, and runs not listed, may hold 0 or NaN: `where` keeps them out.
        exp_sum, label_sum = torch.where(listed, exp_sum, 1.0), torch.where(listed, label_sum, 1.0)
        per_run = torch.log(exp_sum) + peak - cross / label_sum
        mean_weight = sums[4] / sums[5] if weighted else None
        if mean_weight is not None:
            per_run = per_run * mean_weight
        losses = torch.where(listed, per_run, 0.0)
        ctx.columns = columns
        if ctx.needs_input_grad[0]:
            # d loss_s / d x_i = mean_weight_s (e_i / E_s - y_i / Y_s), for the entries of listed runs.
            scales = torch.stack([exp_sum.reciprocal(), label_sum.reciprocal()])
            if mean_weight is not None:
                scales = scales * mean_weight
            by_row = torch.cat([scales, listed.to(scales.dtype).unsqueeze(0)]).index_select(1, start)
            per_row = torch.where(by_row[2] > 0, exps * by_row[0] - labels * by_row[1], 0.0)
            # x too: a recorded backward links its refusal of a second derivative to it
            ctx.save_for_backward(torch.empty_like(per_row).scatter_(0, order, per_row), x)  # to entry order
        counts = per_column_sums(listed.to(losses.dtype), run_column, columns)
        ctx.mark_non_differentiable(counts)
        return per_column_sums(losses, run_column, columns), counts

    @staticmethod
    @once_differentiable  # the saved gradient is a constant: a second derivative is refused, not silently 0
    def backward(ctx: Any, grad: torch.Tensor, _: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
        per_entry = ctx.saved_tensors[0]
        # Entries are task-major (e = r B + b): column r's gradient scales a block of B entries (B may be 0).
        grad_x = (per_entry.view(ctx.columns, per_entry.numel() // ctx.columns) * grad.unsqueeze(1)).reshape(-1)
        return grad_x, None, None, None, None, None, None, None
