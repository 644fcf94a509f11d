"""Plain float64 restatements of the ranking metrics, for the tests to compare with.

Three yardsticks, each a loop over tasks written as directly as torch allows:

- ``reference_metrics``: the definitions of issue 11 and docs/ranking_metrics.rst. Per task, over
  the labelled entries, with ``p = sigmoid(x)`` and each entry's importance weight
  ``v = w`` for a positive, ``w / rate`` for a negative (binary labels):
  ``logloss = sum(v * ce) / sum(v)`` with ``ce = -(y log p + (1 - y) log(1 - p))``,
  ``ctr = sum(v * y) / sum(v)``, ``ne = logloss / H(ctr)``, ``rce = 100 (1 - ne)``,
  ``calibration = sum(v * p) / sum(v * y)``.
- ``torchrec_ne``: torchrec's NE (``torchrec/metrics/ne.py``) in our words: probabilities clamped to
  ``[eta, 1 - eta]`` with ``eta = 1e-12``, the weighted cross-entropy sum in log base 2, divided by
  the cross-entropy of always predicting the weighted mean label (also clamped), i.e. the
  weighted count times the label entropy. The base of the logarithm cancels.
- ``ancestor_rce``: the ancestor's RCE (``metrics/rce.py`` of the-algorithm-ml) in our words:
  probabilities clamped to ``[eps, 1 - eps]`` with ``eps = 1e-7`` and ``eps`` added again inside
  each log; weighted mean cross-entropy over the cross-entropy of predicting the weighted mean
  label for itself; ``100 (1 - ratio)``. On data whose probabilities stay far from 0 and 1 the
  clipping does not bite and it agrees with ours to about ``eps / p``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch


def _columns(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    t: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task ``t``'s labelled logits, labels and weights, as float64 vectors."""
    rows = torch.ones(logits.shape[0], dtype=torch.bool) if mask is None else mask[:, t]
    x = logits[rows, t].double()
    y = labels[rows, t].double()
    if weights is None:
        w = torch.ones_like(x)
    elif weights.ndim == 1:
        w = weights[rows].double()
    else:
        w = weights[rows, t].double()
    return x, y, w


def entropy(q: float) -> float:
    return -sum(value * math.log(value) for value in (q, 1.0 - q) if value > 0)


def reference_metrics(
    tasks: Sequence[str],
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    rates: Optional[Sequence[float]] = None,
    prefix: str = "",
) -> dict[str, float]:
    """Every metric of every task, as Python floats (NaN where undefined); binary labels."""
    out: dict[str, float] = {}
    per_task = []
    for t in range(len(tasks)):
        x, y, w = _columns(logits, labels, weights, mask, t)
        rate = 1.0 if rates is None else rates[t]
        v = torch.where(y > 0.5, w, w / rate)
        p = torch.sigmoid(x)
        ce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
        total, positive = v.sum().item(), (v * y).sum().item()
        logloss = (v * ce).sum().item() / total if total > 0 else math.nan
        ctr = positive / total if total > 0 else math.nan
        h = entropy(ctr) if total > 0 else 0.0
        ne = logloss / h if h > 0 else math.nan
        calibration = (v * p).sum().item() / positive if positive > 0 else math.nan
        per_task.append({"ne": ne, "rce": 100 * (1 - ne), "logloss": logloss, "calibration": calibration, "ctr": ctr})
    for name in ("ne", "rce", "logloss", "calibration", "ctr"):
        for task, values in zip(tasks, per_task, strict=True):
            out[f"{prefix}{name}/{task}"] = values[name]
    return out


def torchrec_ne(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, eta: float = 1e-12) -> list[float]:
    """torchrec's NE per task of ``[B, T]`` inputs (``weights`` ``[B, T]``), from probabilities."""
    result = []
    for t in range(logits.shape[1]):
        p = torch.sigmoid(logits[:, t].double()).clamp(eta, 1 - eta)
        y, w = labels[:, t].double(), weights[:, t].double()
        ce_sum = (-w * y * torch.log2(p) - w * (1 - y) * torch.log2(1 - p)).sum()
        pos, neg = (w * y).sum(), (w * (1 - y)).sum()
        mean_label = (pos / w.sum()).clamp(eta, 1 - eta)
        ce_norm = -pos * torch.log2(mean_label) - neg * torch.log2(1 - mean_label)
        result.append((ce_sum / ce_norm).item())
    return result


def ancestor_rce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, eps: float = 1e-7) -> list[float]:
    """The ancestor's RCE per task of ``[B, T]`` inputs (``weights`` ``[B, T]``), from probabilities."""

    def clipped_bce(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = p.clamp(eps, 1 - eps)
        return -y * torch.log(p + eps) - (1 - y) * torch.log(1 - p + eps)

    result = []
    for t in range(logits.shape[1]):
        p = torch.sigmoid(logits[:, t].double())
        y, w = labels[:, t].double(), weights[:, t].double()
        mean_label = (w * y).sum() / w.sum()
        pred_ce = (w * clipped_bce(p, y)).sum() / w.sum()
        baseline_ce = clipped_bce(mean_label, mean_label)
        result.append(((1 - pred_ce / baseline_ce) * 100).item())
    return result


# ------------------------------------------------------------------ AUC, PR-AUC, gauc, NDCG
# For binary labels (these helpers take no probabilities): a positive weighs w, a negative
# w / rate; unlabelled entries are left out. NDCG's relevance is y >= 0.5.


def auc_inputs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    t: int,
    rate: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task ``t``'s labelled float64 logits, classes (bool) and masses."""
    x, y, w = _columns(logits, labels, weights, mask, t)
    positive = y >= 0.5
    return x, positive, torch.where(positive, w, w / rate)


def exact_auc(x: torch.Tensor, positive: torch.Tensor, mass: torch.Tensor) -> float:
    """Weighted ROC AUC by sorting every sample: pairs ordered right count 1, tied logits 1/2."""
    order = torch.argsort(x)
    x, positive, mass = x[order].double(), positive[order], mass[order].double()
    pos = torch.where(positive, mass, 0.0)
    neg = mass - pos
    values, inverse = torch.unique_consecutive(x, return_inverse=True)
    pos_tie = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, pos)
    neg_tie = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, neg)
    below = neg_tie.cumsum(0) - neg_tie
    total = pos.sum() * neg.sum()
    if total <= 0:
        return math.nan
    return ((pos_tie * (below + 0.5 * neg_tie)).sum() / total).item()


def exact_average_precision(x: torch.Tensor, positive: torch.Tensor, mass: torch.Tensor) -> float:
    """Weighted average precision, one threshold per distinct logit (scikit-learn's definition)."""
    values, inverse = torch.unique(x.double(), return_inverse=True)
    pos = torch.zeros(len(values), dtype=torch.float64).index_add_(
        0, inverse, torch.where(positive, mass, 0.0).double()
    )
    neg = torch.zeros(len(values), dtype=torch.float64).index_add_(
        0, inverse, torch.where(positive, 0.0, mass).double()
    )
    pos, neg = pos.flip(0), neg.flip(0)  # highest logit first
    tp, fp = pos.cumsum(0), neg.cumsum(0)
    if pos.sum() <= 0 or neg.sum() <= 0:
        return math.nan
    precision = torch.where(tp + fp > 0, tp / (tp + fp), 0.0)
    return ((pos / pos.sum()) * precision).sum().item()


def _dcg_at(gains_by_rank: list[float], k: int) -> float:
    return sum(gain / math.log2(rank + 2) for rank, gain in enumerate(gains_by_rank[:k]))


def group_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    groups: torch.Tensor,
    t: int,
    ks: Sequence[int] = (),
    rate: float = 1.0,
) -> dict[str, float]:
    """gauc and ndcg@k of task ``t`` of one batch by a Python loop over its groups.

    NDCG ranks the labelled entries of a group by logit; tied logits share their ranks' mean
    discount (the expected DCG over the orders of the tie).
    """
    rows = torch.ones(logits.shape[0], dtype=torch.bool) if mask is None else mask[:, t]
    auc_sum = auc_weight = 0.0
    ndcg_sums = dict.fromkeys(ks, 0.0)
    ndcg_groups = 0
    for group in torch.unique(groups).tolist():
        members = (groups == group) & rows
        x = logits[members, t].double()
        positive = labels[members, t].double() >= 0.5
        if weights is None:
            w = torch.ones_like(x)
        elif weights.ndim == 1:
            w = weights[members].double()
        else:
            w = weights[members, t].double()
        mass = torch.where(positive, w, w / rate)
        p, q = mass[positive].sum().item(), mass[~positive].sum().item()
        if p > 0 and q > 0:
            auc_sum += (p + q) * exact_auc(x, positive, mass)
            auc_weight += p + q
        if positive.any():
            ndcg_groups += 1
            # Expected DCG over tie orders: each entry takes the mean discount of its tie's ranks.
            order = torch.argsort(-x, stable=True)
            xs, gains = x[order].tolist(), positive[order].double().tolist()
            for k in ks:
                discounts = [1 / math.log2(r + 2) if r < k else 0.0 for r in range(len(xs))]
                dcg = 0.0
                for i, value in enumerate(xs):
                    tie = [r for r, other in enumerate(xs) if other == value]
                    dcg += gains[i] * sum(discounts[r] for r in tie) / len(tie)
                ideal = _dcg_at(sorted(gains, reverse=True), k)
                ndcg_sums[k] += dcg / ideal
    out = {"gauc_sum": auc_sum, "gauc_weight": auc_weight, "ndcg_groups": float(ndcg_groups)}
    out.update({f"ndcg_sum@{k}": value for k, value in ndcg_sums.items()})
    return out
