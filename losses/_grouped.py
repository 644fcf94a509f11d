r"""Grouped AUC and NDCG@k per task from one ``[B, T]`` block with a group id per row, as sums.

A group is the rows that share one id inside one block (one ``update``): a user or a request.
The ``B`` ids become small integers as the ranking losses make them
(:func:`~losses._ragged.group_ids`): on the CPU the ids themselves, minus the smallest, when they
span few enough values, else their ranks from a sort of the ``B`` ids. Then one sort of the
block's ``B T`` entries on a combined int64 key (task, group, logit highest first; unlabelled
entries after every labelled one) orders each task's entries group by group. When the key fits
in 63 bits the keys are one 1D tensor, which torch sorts with a parallel radix sort on the CPU;
otherwise each task's row is sorted. Runs of equal keys (ties) and groups are then read from
running sums along each task's row, taken at each run's and group's first entry: no loop over
groups or tasks, and no value read on the host but the ids' range on the CPU (where it costs no
device sync). Logits are compared in float32 (a float64 logit is rounded first); equal
logits tie, and a NaN logit ties with -inf (last), whatever its sign bit.

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

from losses._ragged import descending_code, group_ids

_LOW_BITS = 33  # a logit's key in [0, 2**32), highest logit first; 2**32 marks an unlabelled entry
_KEY_BITS = 63  # the bits of a non-negative int64: task, group rank and logit must fit for one 1D sort


def group_rows(ks: Sequence[int]) -> tuple[str, ...]:
    """The rows of :func:`grouped_sums`, in order."""
    return ("groups", "gauc_sum", "gauc_weight", "ndcg_groups", *(f"ndcg_sum@{k}" for k in ks))


def _descending_bits(logits: torch.Tensor) -> torch.Tensor:
    """Int64 keys in ``[-2**31, 2**31)`` ordering the float32 logits highest first (-0.0 = 0.0, NaN = -inf)."""
    # A NaN's sign bit is arbitrary (inf - inf sets it on x86), so its bits alone ranked it first or
    # last by that bit. As -inf it ranks last, tied with -inf, as NaN goes to the lowest AUC bin.
    # (nan_to_num's own default would also turn the infinities into the largest finite floats.)
    finite_or_inf = torch.nan_to_num(logits.to(torch.float32), nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    return descending_code(finite_or_inf).to(torch.int64)


def _discount_table(ks: Sequence[int], size: int, device: torch.device) -> torch.Tensor:
    """``(K, size + 1)``: entry ``r`` is the summed discount of ranks 1 to ``min(r, k)``."""
    ranks = torch.arange(1, size + 1, dtype=torch.float64, device=device)
    discount = 1.0 / torch.log2(ranks + 1.0)
    cutoff = torch.tensor(list(ks), dtype=torch.float64, device=device).unsqueeze(1)
    table = torch.where(ranks <= cutoff, discount, 0.0).cumsum(1)
    return torch.cat([table.new_zeros(len(ks), 1), table], 1)


def _sort_block(
    logits: torch.Tensor, labelled: Optional[torch.Tensor], groups: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T, B)`` keys sorted by (task, group, logit descending) and the flat ``[B, T]`` index of each.

    One sort of the ``B T`` keys (task, group, logit bits) as a single int64 tensor when they fit in
    63 bits (the group bits from the ids' span, or from ``B`` for ranked ids): torch sorts 1D
    integers with a parallel radix sort on the CPU. Otherwise each task's row is sorted on (group,
    logit).
    """
    rows, tasks = logits.shape
    low = _descending_bits(logits)
    if labelled is not None:
        low = torch.where(labelled, low, 2**31)  # after every labelled entry
    task_bits = (tasks - 1).bit_length()
    ids, span = group_ids(groups, 2 ** max(_KEY_BITS - _LOW_BITS - task_bits, 0))
    group_bits = (span - 1).bit_length()
    rank = (ids << _LOW_BITS).add_(2**31)  # and the logit keys from 0
    if task_bits + group_bits + _LOW_BITS <= _KEY_BITS:
        task = torch.arange(tasks, device=logits.device) << (group_bits + _LOW_BITS)
        ordered, index = torch.sort(low.add_(rank.unsqueeze(1)).add_(task).view(-1))
        return ordered.view(tasks, rows), index.view(tasks, rows)
    # Rows of the sort contiguous: sorting a transposed view costs half as much again.
    ordered, order = torch.sort(low.add_(rank.unsqueeze(1)).t().contiguous(), dim=1)
    return ordered, order.mul_(tasks).add_(torch.arange(tasks, device=logits.device).unsqueeze(1))


def _runs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T, B)`` bool each: where a run of equal values starts, and where it ends, along each row."""
    tasks, rows = values.shape
    # Boundary j (0 .. B) lies before entry j: the starts are boundaries 0 .. B - 1, the ends 1 .. B.
    boundary = torch.empty(tasks, rows + 1, dtype=torch.bool, device=values.device)
    boundary[:, 0] = True
    boundary[:, -1] = True
    torch.ne(values[:, 1:], values[:, :-1], out=boundary[:, 1:-1])
    return boundary[:, :-1], boundary[:, 1:]


def _before(sums: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """``(n, T, B)``: the running sums ``(n, T, B + 1)`` before each entry's run or group, at padded ``first``."""
    flat = sums.reshape(len(sums), -1)
    return flat.gather(1, first.view(1, -1).expand(len(sums), -1)).view(len(sums), *first.shape)


def _sorted_masses(
    positive: torch.Tensor, weight: torch.Tensor, relevant: torch.Tensor, source: torch.Tensor, out: torch.Tensor
) -> None:
    """Writes each entry's positive mass, negative mass and relevance in sorted order into ``out`` ``(3, T, B)``."""
    # ``out`` may be a strided view: each write below is a copy into it.
    shape = relevant.shape
    dtype = torch.float64 if torch.float64 in (positive.dtype, weight.dtype) else torch.float32
    # One gather of (positive, whole) pairs in their own dtype: the sort's order is random access
    # over the block, and a pair costs one cache miss where two gathers cost two.
    pairs = torch.view_as_complex(torch.stack([positive.to(dtype).expand(shape), weight.to(dtype).expand(shape)], -1))
    index = source.view(-1)
    out[:2].copy_(torch.view_as_real(pairs.view(-1).gather(0, index)).t().view(out[:2].shape))
    out[1] -= out[0]
    out[2].copy_(relevant.reshape(-1).gather(0, index).view(out[2].shape))


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
    device = logits.device
    out = torch.zeros(len(group_rows(ks)), tasks, dtype=torch.float64, device=device)
    if rows == 0:
        return out
    keys, source = _sort_block(logits, labelled, groups)
    run_start, run_end = _runs(keys)
    group_start, group_end = _runs(keys >> _LOW_BITS)

    # Rows 0-2: the positive mass, negative mass and relevance of each entry in sorted order;
    # rows 3..: per run, at its last entry, the AUC's pair term and the DCG of each k. Each is
    # written after the 0 that starts its row and turned into running sums in place:
    # sums[:, t, j] is the sum before entry j, sums[:, t, j + 1] the sum through it.
    quantities = 4 + len(ks)
    sums = torch.empty(quantities, tasks, rows + 1, dtype=torch.float64, device=device)
    sums[:, :, 0] = 0.0
    values = sums[:, :, 1:]
    _sorted_masses(positive, weight, relevant, source, values[:3])
    values[:3].cumsum_(2)

    # The padded position (t (B + 1) + j) of the first entry of each entry's run and group.
    padded = torch.arange(tasks * (rows + 1), device=device).view(tasks, rows + 1)[:, :rows]
    run_first = torch.where(run_start, padded, 0).cummax(1).values
    group_first = torch.where(group_start, padded, 0).cummax(1).values

    # At a run's last entry: its masses and relevant count (zero elsewhere).
    in_run = _before(sums[:3], run_first)
    torch.sub(values[:3], in_run, out=in_run).masked_fill_(~run_end, 0.0)
    run_p, run_q, run_relevant = in_run
    # The run's positives against the negatives above it in its group (the entries are ordered
    # highest logit first), its own negatives counting half.
    group_base = _before(sums[:3], group_first)
    torch.sub(values[1], group_base[1], out=values[3]).sub_(run_q, alpha=0.5).mul_(run_p)
    # Summed discounts up to rank r; constant from the largest k on, so ranks are capped there.
    top = min(rows, max(ks, default=0))
    table = _discount_table(ks, top, device)  # (K, top + 1)
    if ks:
        # Ranks from the group's top; a tied run shares the mean discount of the ranks it spans.
        last = padded - group_first  # the rank of the run's last entry, less 1
        before = run_first - group_first  # the ranks above the run
        share = run_relevant.div_(torch.sub(last, before).add_(1))
        last.clamp_(max=top - 1)
        before.clamp_(max=top)
        for row, discount in zip(values[4:], table, strict=True):  # per cutoff k
            row.copy_(torch.take(discount[1:], last).sub_(torch.take(discount, before)).mul_(share))
    values[3:].cumsum_(2)

    # At a group's last entry: the group's sums (its masses, positives, pair terms and DCGs).
    group_sums = torch.sub(values[:3], group_base, out=group_base)
    terms = _before(sums[3:], group_first)
    torch.sub(values[3:], terms, out=terms)
    p_mass, q_mass, positives = group_sums
    pair_terms = terms[0]
    pairs = p_mass * q_mass
    both = group_end & (p_mass > 0) & (q_mass > 0)
    group_weight = p_mass + q_mass
    out[0] = torch.count_nonzero(group_end, 1)
    # AUC = 1 - (pairs with the negative above) / (P Q), weighted by P + Q.
    out[1] = torch.where(both, group_weight * (pairs - pair_terms) / pairs, 0.0).sum(1)
    out[2] = torch.where(both, group_weight, 0.0).sum(1)
    ranked = group_end & (positives > 0)
    out[3] = torch.count_nonzero(ranked, 1)
    if ks:
        count = positives.to(torch.int64).clamp_(max=top)
        ideal = torch.stack([torch.take(discount, count) for discount in table])
        out[4:] = torch.where(ranked, terms[1:] / ideal, 0.0).sum(-1)
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
