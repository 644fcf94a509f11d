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
