r"""Grouped AUC and NDCG@k per task from one ``[B, T]`` block with a group id per row, as sums.

A group is the rows that share one id inside one block (one ``update``): a user or a request.
Inside a group the entries of each task are ordered by logit with one sort of the whole block on
a combined key (group, then logit; unlabelled entries below every labelled one), so there is no
loop over groups or tasks and no value is read on the host. Logits are compared in float32 (a
float64 logit is rounded first); equal logits tie.

Per group :math:`g` and task, with the masses of :mod:`losses._auc` (an entry weighs
:math:`w y` as a positive and :math:`w (1 - y) / r` as a negative):

- AUC: :math:`A_g = \sum_{i \in P_g} w_i (Q_{g,<x_i} + Q_{g,=x_i} / 2) / (P_g Q_g)`, defined when
  the group holds positive and negative mass; it counts with the group's labelled weight
  :math:`W_g = P_g + Q_g`. The sums are :math:`\sum_g W_g A_g` and :math:`\sum_g W_g`.
- NDCG@k: the labelled entries ranked by logit, highest first; DCG with gain :math:`2^y - 1` on
  the label rounded at 1/2 (1 for :math:`y \ge 1/2`, else 0) and discount
  :math:`1 / \log_2(\text{rank} + 1)` over ranks 1 to ``k``; tied logits share the mean discount
  of the ranks they span. Divided by the ideal DCG (every positive first), for groups with at
  least one positive; sample weights do not enter.
  The sums are :math:`\sum_g \text{NDCG}_g` per ``k`` and the number of such groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch

_LOW_BITS = 33  # an ordered float32 key in [1, 2**32]; 0 marks an unlabelled entry
_LOW_MASK = (1 << _LOW_BITS) - 1


def group_rows(ks: Sequence[int]) -> tuple[str, ...]:
    """The rows of :func:`grouped_sums`, in order."""
    return ("groups", "gauc_sum", "gauc_weight", "ndcg_groups", *(f"ndcg_sum@{k}" for k in ks))


def dense_rank(groups: torch.Tensor) -> torch.Tensor:
    """Each id's rank among the distinct ids of ``groups``, ``0 .. G - 1``, with one sort of ``B`` ids."""
    ordered, order = torch.sort(groups)
    new = torch.ones_like(ordered, dtype=torch.int64)
    if ordered.numel() > 1:
        new[1:] = ordered[1:] != ordered[:-1]
    new[0] = 0
    return torch.empty_like(new).scatter_(0, order, new.cumsum(0))


def _ordered_bits(logits: torch.Tensor) -> torch.Tensor:
    """Int64 keys in ``[1, 2**32]`` that order like the float32 logits (-0.0 equal to 0.0)."""
    bits = (logits.to(torch.float32) + 0.0).view(torch.int32)
    # Negative floats: flipping all bits but the sign reverses their order below the positives.
    flipped = bits.bitwise_xor((bits >> 31) & 0x7FFFFFFF)
    return flipped.to(torch.int64).add_(2**31 + 1)


def _discount_table(ks: Sequence[int], size: int, device: torch.device) -> torch.Tensor:
    """``(K, size + 1)``: entry ``r`` is the summed discount of ranks 1 to ``min(r, k)``."""
    ranks = torch.arange(1, size + 1, dtype=torch.float64, device=device)
    discount = 1.0 / torch.log2(ranks + 1.0)
    cutoff = torch.tensor(list(ks), dtype=torch.float64, device=device).unsqueeze(1)
    table = torch.where(ranks <= cutoff, discount, 0.0).cumsum(1)
    return torch.cat([table.new_zeros(len(ks), 1), table], 1)


def _segment_start(starts: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return torch.where(starts, positions, 0).cummax(-1).values


def _segment_end(ends: torch.Tensor, positions: torch.Tensor, last: int) -> torch.Tensor:
    return torch.where(ends, positions, last).flip(-1).cummin(-1).values.flip(-1)


def grouped_sums(
    logits: torch.Tensor,
    positive: torch.Tensor,
    weight: torch.Tensor,
    relevant: torch.Tensor,
    labelled: Optional[torch.Tensor],
    groups: torch.Tensor,
    ks: Sequence[int],
) -> torch.Tensor:
    r"""The ``(R, T)`` float64 sums of :func:`group_rows` of one ``[B, T]`` block whose shapes were checked.

    ``positive`` is each entry's positive mass :math:`w y`, ``weight`` its whole mass
    :math:`w y + w (1 - y) / r` (both zero where unlabelled, and broadcastable to ``[B, T]``),
    ``relevant`` the bool relevance of NDCG, ``labelled`` the mask or ``None``, ``groups`` an
    integer id per row; ``ks`` the NDCG cutoffs.
    """
    rows, tasks = logits.shape
    out = torch.zeros(len(group_rows(ks)), tasks, dtype=torch.float64, device=logits.device)
    if rows == 0:
        return out
    shape = logits.shape
    low = _ordered_bits(logits)
    if labelled is not None:
        low = low * labelled
    # Rows of the sort contiguous: sorting a transposed view costs half as much again.
    key = (dense_rank(groups).unsqueeze(1) << _LOW_BITS).add(low).t().contiguous()
    sorted_key, order = torch.sort(key, dim=1)  # the one sort: per task, by group, then logit
    group = sorted_key >> _LOW_BITS  # dense ids 0 .. G - 1, ascending along each row
    pos_mass = positive.expand(shape).t().gather(1, order).to(torch.float64)
    neg_mass = weight.expand(shape).t().gather(1, order).to(torch.float64).sub_(pos_mass)
    rel = relevant.t().gather(1, order)

    positions = torch.arange(rows, device=logits.device).expand(tasks, rows)
    run_start = torch.ones_like(rel)
    run_start[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
    run_end = torch.ones_like(rel)
    run_end[:, :-1] = run_start[:, 1:]
    group_end = torch.ones_like(rel)
    group_end[:, :-1] = group[:, 1:] != group[:, :-1]
    rs = _segment_start(run_start, positions)
    re = _segment_end(run_end, positions, rows - 1)
    ge = _segment_end(group_end, positions, rows - 1)

    # AUC: each positive mass against the negative mass below its run in the row, plus half its
    # run's; the part below its group's start is taken off per group, below.
    neg_through = neg_mass.cumsum(1)
    run_floor = neg_through.gather(1, rs) - neg_mass.gather(1, rs)
    tied = neg_through.gather(1, re) - run_floor
    pairs = pos_mass * run_floor.add_(tied, alpha=0.5)

    # NDCG: ranks counted from the group's top; a tied run shares the mean discount of its ranks.
    table = _discount_table(ks, rows, logits.device)  # (K, B + 1)
    top = (ge - rs + 1).reshape(-1)
    bottom = (ge - re).reshape(-1)
    spread = (re - rs + 1).to(torch.float64)
    gains = (table[:, top] - table[:, bottom]).view(len(ks), tasks, rows).div_(spread).mul_(rel)

    # Per group (slot t * B + g): totals by scatter-add, one per quantity.
    slots = group.add_(torch.arange(tasks, device=logits.device).unsqueeze(1) * rows).reshape(-1)
    quantities = [pairs, pos_mass, neg_mass, rel.to(torch.float64), *gains.unbind(0)]
    totals = torch.zeros(len(quantities), tasks * rows, dtype=torch.float64, device=logits.device)
    for row, quantity in zip(totals, quantities, strict=True):
        row.index_add_(0, slots, quantity.reshape(-1))
    totals = totals.view(len(quantities), tasks, rows)
    pair_mass, p_mass, q_mass, positives = totals[:4]
    pair_mass -= p_mass * (q_mass.cumsum(1) - q_mass)  # the negatives of the groups before

    both = (p_mass > 0) & (q_mass > 0)
    group_weight = p_mass + q_mass
    out[0] = sorted_key[:, -1].bitwise_right_shift(_LOW_BITS) + 1  # the number of groups
    out[1] = torch.where(both, group_weight * pair_mass / (p_mass * q_mass), 0.0).sum(1)
    out[2] = torch.where(both, group_weight, 0.0).sum(1)
    ranked = positives > 0
    out[3] = ranked.sum(1)
    if ks:
        ideal = table.gather(1, positives.to(torch.int64).reshape(1, -1).expand(len(ks), -1))
        ndcg = totals[4:] / ideal.view(len(ks), tasks, rows)
        out[4:] = torch.where(ranked, ndcg, 0.0).sum(-1)
    return out


def grouped_values(sums: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """``(1 + K, T)``: gauc, then NDCG@k for each ``k``; NaN where no group qualifies."""
    gauc = torch.where(sums[2] > 0, sums[1] / sums[2], math.nan)
    ndcg = torch.where(sums[3] > 0, sums[4:] / sums[3], math.nan)
    return torch.cat([gauc.unsqueeze(0), ndcg])


def grouped_undefined(sums: torch.Tensor, tasks: Sequence[str], gauc: bool, ks: Sequence[int]) -> Optional[str]:
    """Why gauc or NDCG is NaN for some tasks although groups were given, or ``None``."""
    if sums.is_meta:
        return None
    seen = sums[0] > 0
    parts = []
    if gauc:
        named = [task for task, flag in zip(tasks, (seen & (sums[2] <= 0)).tolist(), strict=True) if flag]
        if named:
            parts.append(f"gauc needs a group with a positive and a negative, none for {named}")
    if ks:
        named = [task for task, flag in zip(tasks, (seen & (sums[3] <= 0)).tolist(), strict=True) if flag]
        if named:
            parts.append(f"NDCG needs a group with a positive, none for {named}")
    return "; ".join(parts) if parts else None
