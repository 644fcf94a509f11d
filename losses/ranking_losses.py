r"""Pairwise and listwise ranking losses over ragged groups: the ranking terms of a :class:`~losses.Task`.

A group is the set of rows sharing a ``groups`` id (a request, a query, a session). Within one
group of one column, with logits :math:`x`, labels :math:`y \ge 0` and per-sample weights
:math:`w`:

.. math::
    \text{pairwise\_logistic:}\quad \ell_{ij} = \log(1 + e^{-(x_i - x_j)}) \qquad
    \text{pairwise\_hinge:}\quad \ell_{ij} = \max(0, 1 - (x_i - x_j))

over every pair with :math:`y_i > y_j`, each weighted :math:`w_i w_j`; ``lambda_ndcg`` is the
logistic pair loss weighted :math:`w_i w_j |\Delta\mathrm{NDCG}_{ij}|` (detached). The term of a
column is the weighted sum over the pairs of all groups divided by their number :math:`P`.
``softmax`` is, per group :math:`g` with :math:`Y_g = \sum_{i \in g} y_i > 0` and two different
labels,

.. math::
    \ell_g = -\sum_{i \in g} \frac{y_i}{Y_g} \log \mathrm{softmax}(x_g)_i,

weighted by the mean weight of the group's rows, summed, divided by the number of such groups.
Weights are multipliers, as everywhere in ``losses``: the mean divides by the count of pairs
(groups), not by their weight sum. A group with one labelled row, or with equal labels, adds no
pair; a column with no pair (no list) gives 0 with a zero gradient.

Each kind is one row of :data:`RANKINGS`: it maps the sorted runs of a batch to per-column
weighted sums and counts, which :class:`~losses.MultiTaskLoss` divides (by global counts with
``normalize="global"``). Rows never pad a group to the largest one and loop over no group: see
``losses._ragged``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal, NamedTuple, Optional

import torch

from losses import _input_checks as checks
from losses import _ragged
from losses._dtypes import compute_dtype
from losses._list_losses import SoftmaxListSums
from losses._pair_losses import sorted_pair_loss_sums

RankingKind = Literal["pairwise_logistic", "pairwise_hinge", "softmax", "lambda_ndcg"]


class Ragged(NamedTuple):
    """What a row of :data:`RANKINGS` reads: the entries (``[N]``, entry order), and their sorted runs.

    Values at left-out entries are read by no pair: a row that reads them (a list) masks them first.
    """

    logits: torch.Tensor  #: ``[N]``, differentiable, anything where left out
    labels: torch.Tensor  #: ``[N]``, anything where left out
    weights: Optional[torch.Tensor]  #: ``[N]``, anything where left out; ``None``: all 1
    keep: torch.Tensor  #: ``[N]`` bool, the entries that take part
    runs: _ragged.Runs
    #: ``[N]``: the entries sorted by key, then by logit from high to low (ties in entry order), for a
    #: row that reads ranks by logit (:attr:`Ranking.by_logit`); else ``None``
    by_logit: Optional[torch.Tensor]
    columns: int


#: ``(sums, counts)``, each ``[R]``: a column's term is ``sums / counts`` (0 without a count).
Sums = tuple[torch.Tensor, torch.Tensor]


def _ndcg_rows(ragged: Ragged) -> torch.Tensor:
    """lambda_ndcg's rows ``[x, gain / IDCG, discount, (w)]`` in sorted order, ``[K, N]``, ``x`` detached.

    The discount is ``1 / log2(2 + rank)``, ranks by logit from high to low within the group (ties in
    row order); the IDCG sums ``gain / log2(2 + position in the run)``: runs are sorted by label from
    high to low, so a sorted position is an ideal rank.
    """
    runs, x, w = ragged.runs, ragged.logits.detach(), ragged.weights
    n = runs.start.numel()
    # In place from the one fresh tensor: every [N] buffer this path allocates is another few pages to fault in.
    log_ranks = torch.arange(2, n + 2, dtype=x.dtype, device=x.device).sub_(runs.start).log2_()
    # The same keys sorted by logit put every run at the same sorted positions, so the entry at the
    # k-th position by logit has the discount of position k: no rank needs computing or gathering.
    by_logit = ragged.by_logit
    assert by_logit is not None
    by_entry = x.new_empty((3 if w is None else 4, n))
    by_entry[0], by_entry[1] = x, ragged.labels  # the labels become gains below: |delta NDCG| is a detached weight
    by_entry[2].scatter_(0, by_logit, log_ranks.reciprocal())
    if w is not None:
        by_entry[3] = w  # learnt weights: a copy autograd records (the rows then require grad)
    rows = by_entry.index_select(1, runs.order)
    gains = torch.exp2(rows[1].detach()).sub_(1)
    ideal = torch.zeros_like(gains).index_add_(0, runs.start, torch.div(gains, log_ranks, out=log_ranks))
    tiny = torch.finfo(gains.dtype).tiny  # rows of a group with no gain are in no pair
    scale = ideal.index_select(0, runs.start).clamp_min_(tiny)
    if rows.requires_grad:  # learnt weights: rows are in the graph, which no out= may write into
        return torch.cat([rows[:1], (gains / scale).unsqueeze(0), rows[2:]])
    torch.div(gains, scale, out=rows[1])
    return rows


def _pair_term(ragged: Ragged, pair_loss: str, ndcg: bool = False) -> Sums:
    runs, x, w = ragged.runs, ragged.logits, ragged.weights
    higher, lower = _ragged.pairs(runs)
    if ndcg:
        rows = _ndcg_rows(ragged)
    else:  # the rows the pairs read, in sorted order, gathered at once: logit, (weight)
        rows = torch.stack([x.detach()] + ([] if w is None else [w])).index_select(1, runs.order)
    column = runs.column
    pair_column = None if column is None else column.index_select(0, higher)
    sums = sorted_pair_loss_sums(
        x, rows, runs.order, higher, lower, pair_column, ragged.columns, pair_loss, w is not None, ndcg
    )
    if column is None:  # the one column's count is the number of pairs, already read
        return sums, sums.new_full((1,), higher.numel())
    return sums, _ragged.per_column_sums(runs.higher.to(sums.dtype), column, ragged.columns)


def _softmax_term(ragged: Ragged) -> Sums:
    runs, x, w = ragged.runs, ragged.logits, ragged.weights
    rows = torch.stack([x.detach(), ragged.labels] + ([] if w is None else [w]))
    if torch._C._are_functorch_transforms_active() or rows.requires_grad:
        # torch.func needs a vmap rule, and learnt weights or labels a gradient, which the fused Function lacks.
        return _softmax_plain(ragged)
    run_column = None
    if runs.column is not None:
        run_column = torch.zeros_like(runs.start).scatter_(0, runs.start, runs.column)
    sums: Sums = SoftmaxListSums.apply(  # type: ignore[no-untyped-call]
        x,
        rows.index_select(1, runs.order),
        runs.order,
        runs.start,
        runs.higher,
        run_column,
        ragged.columns,
        w is not None,
    )
    return sums


def _softmax_plain(ragged: Ragged) -> Sums:
    """The softmax term as plain differentiable ops: the same math as :class:`~losses._list_losses.SoftmaxListSums`."""
    runs, keep = ragged.runs, ragged.keep
    order, run = runs.order, runs.start
    # A list reads every entry of its run: left-out entries (runs of one) enter as 0, with no gradient.
    zero = ragged.logits.new_zeros(())
    x = torch.where(keep, ragged.logits, zero).index_select(0, order)
    y = torch.where(keep, ragged.labels, zero).index_select(0, order)
    w = keep.to(x.dtype) if ragged.weights is None else torch.where(keep, ragged.weights, zero)
    w = w.index_select(0, order)
    n = x.numel()
    peak = x.detach().new_zeros(n).scatter_reduce_(0, run, x.detach(), "amax", include_self=False)
    exp_sum = x.new_zeros(n).index_add(0, run, torch.exp(x - peak.index_select(0, run)))
    label_sum = y.new_zeros(n).index_add_(0, run, y)
    # A list needs a positive label and two different labels: one row, or equal labels, rank nothing.
    listed = (label_sum > 0) & (runs.higher.new_zeros(n).index_add_(0, run, runs.higher) > 0)
    # Ids past the last run hold nothing: keep them out of the log (a 0 there is a NaN gradient).
    log_norm = torch.log(torch.where(listed, exp_sum, 1.0)) + peak
    cross = x.new_zeros(n).index_add(0, run, x * y)
    mean_weight = w.new_zeros(n).index_add_(0, run, w) / run.new_zeros(n).index_add_(
        0, run, torch.ones_like(run)
    ).clamp_min(1).to(w.dtype)
    losses = torch.where(listed, (log_norm - cross / torch.where(listed, label_sum, 1.0)) * mean_weight, 0.0)
    column = None if runs.column is None else x.new_zeros(n, dtype=torch.long).scatter_(0, run, runs.column)
    return _ragged.per_column_sums(losses, column, ragged.columns), _ragged.per_column_sums(
        listed.to(x.dtype), column, ragged.columns
    )


class Ranking(NamedTuple):
    """A row of :data:`RANKINGS`."""

    sums: Callable[[Ragged], Sums]  #: the batch's sorted runs to per-column sums and counts
    by_logit: bool = False  #: whether it reads ranks by logit (:attr:`Ragged.by_logit`)


#: The table of ranking kinds.
RANKINGS: dict[str, Ranking] = {
    "pairwise_logistic": Ranking(partial(_pair_term, pair_loss="logistic")),
    "pairwise_hinge": Ranking(partial(_pair_term, pair_loss="hinge")),
    "softmax": Ranking(_softmax_term),
    "lambda_ndcg": Ranking(partial(_pair_term, pair_loss="logistic", ndcg=True), by_logit=True),
}


def unchecked_ranking_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    kind: str,
) -> Sums:
    """The per-column ``(sums, counts)`` of one ranking kind over ``[B, R]`` columns (shapes already checked).

    ``weights`` is ``[B, R]``, ``[B]`` or ``None``; ``mask`` is ``[B, R]`` or ``None``. Computed in
    float32 for half precision, else in the logits' dtype.
    """
    row = RANKINGS[kind]
    return row.sums(ragged_entries(logits, labels, groups, weights, mask, row.by_logit))


def ragged_entries(
    logits: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    by_logit: bool = False,
) -> Ragged:
    """The ``[B, R]`` columns as flat entries and their sorted runs: what a row of :data:`RANKINGS` reads."""
    batch, columns = logits.shape
    dtype = compute_dtype(logits.dtype)
    keep = torch.ones_like(logits, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    keys, bound = _ragged.flat_keys(groups, keep)
    flat_keep = keep.t().reshape(-1)
    # Left-out entries may hold anything (NaN included): each is a run of its own, in no pair.
    y = labels.t().reshape(-1).to(dtype)
    w = None
    if weights is not None:
        block = weights.unsqueeze(1).expand(batch, columns) if weights.ndim == 1 else weights
        w = block.t().reshape(-1).to(dtype)
    x = logits.t().reshape(-1).to(dtype)
    runs = _ragged.sort_runs(keys, y, batch, flat_keep, bound)
    order = _ragged.sort_by_key_then_descending(keys, x.detach())[1] if by_logit else None
    return Ragged(x, y, w, flat_keep, runs, order, columns)


def ranking_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    kind: RankingKind = "pairwise_logistic",
    weights: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""The ranking term of one column: the functional twin of a :class:`~losses.Task`'s ``ranking``.

    See the module docstring (and ``docs/ranking_losses.rst``) for the math of each ``kind``.

    Args:
        logits: the scores, :math:`(B)`, floating point.
        labels: the relevance of each row, :math:`(B)`, non-negative (binary or graded 0, 1, 2, ...).
        groups: the group id of each row, :math:`(B)`, any integer values, rows in any order.
        kind: ``"pairwise_logistic"`` | ``"pairwise_hinge"`` | ``"softmax"`` | ``"lambda_ndcg"``.
            Default: ``"pairwise_logistic"``.
        weights: optional per-sample weights :math:`(B)`.
        mask: optional bool :math:`(B)`, false where a row takes part in no pair or list.

    Returns:
        a scalar: the weighted sum over the pairs (lists) divided by their count; 0 without any.

    Example:
        >>> logits = torch.tensor([2.0, 0.0, 1.0, 3.0, -1.0])
        >>> labels = torch.tensor([1, 0, 0, 0, 1])
        >>> groups = torch.tensor([7, 7, 7, 9, 9])  # two requests: 2 pairs, then 1
        >>> round(ranking_loss(logits, labels, groups).item(), 4)
        1.4861
        >>> round(ranking_loss(logits, labels, groups, kind="softmax").item(), 4)
        2.2129
    """
    checks.check_ranking_loss_call(logits, labels, groups, kind, weights, mask, tuple(RANKINGS))
    sums, counts = unchecked_ranking_sums(
        logits.unsqueeze(1),
        labels.unsqueeze(1),
        groups,
        None if weights is None else weights.unsqueeze(1),
        None if mask is None else mask.unsqueeze(1),
        kind,
    )
    return (sums / counts.clamp_min(1)).squeeze(0)
