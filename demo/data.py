"""Synthetic engagement data from a known logistic model per task, so the best possible loss is known."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Engagement tasks with their positive rates, from common to rare.
ENGAGEMENTS = (
    ("click", 0.30),
    ("fav", 0.10),
    ("repost", 0.03),
    ("reply", 0.015),
    ("share", 0.005),
)

#: Tasks whose label is logged on only some rows (e.g. the surface that shows the button);
#: the rest are unlabelled and masked out.
LABELLED_SHARE = {"reply": 0.6, "share": 0.5}


@dataclass(frozen=True)
class Batch:
    features: torch.Tensor  # [B, D]
    labels: torch.Tensor  # [B, T], 0/1; NaN where unlabelled
    weights: torch.Tensor  # [B], per-sample weight (e.g. how recent the impression is)
    mask: torch.Tensor  # [B, T], True where a label exists
    true_logits: torch.Tensor  # [B, T], the generating model's logits


def _intercepts(scores: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
    """Per-task intercepts b with mean(sigmoid(scores + b)) = rate, by bisection (the mean rises with b)."""
    low, high = torch.full_like(rates, -20.0), torch.full_like(rates, 20.0)
    for _ in range(40):
        middle = (low + high) / 2
        too_high = torch.sigmoid(scores + middle).mean(0) > rates
        high = torch.where(too_high, middle, high)
        low = torch.where(too_high, low, middle)
    return (low + high) / 2


class EngagementModel:
    """A logistic model per task over shared dense features: P(y_t = 1 | x) = sigmoid(x @ W_t + b_t)."""

    def __init__(self, tasks: int, features: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.tasks, self.features = tasks, features
        self.weight = torch.randn(features, tasks, generator=gen) * 1.5 / math.sqrt(features)
        rates = torch.tensor([rate for _, rate in ENGAGEMENTS[:tasks]])
        self.bias = _intercepts(torch.randn(50_000, features, generator=gen) @ self.weight, rates)
        self.labelled = torch.tensor([LABELLED_SHARE.get(name, 1.0) for name, _ in ENGAGEMENTS[:tasks]])

    def sample(self, rows: int, gen: torch.Generator) -> Batch:
        x = torch.randn(rows, self.features, generator=gen)
        logits = x @ self.weight + self.bias
        labels = (torch.rand(rows, self.tasks, generator=gen) < torch.sigmoid(logits)).float()
        mask = torch.rand(rows, self.tasks, generator=gen) < self.labelled
        weights = 0.5 + torch.rand(rows, generator=gen)
        return Batch(x, labels.masked_fill(~mask, float("nan")), weights, mask, logits)
