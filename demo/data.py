"""Synthetic engagement data from known models (logistic per binary task, softmax for feedback), so the best
possible loss is known."""

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

#: The multi-class task: negative feedback on an impression, its classes and their shares.
FEEDBACK = "feedback"
FEEDBACK_CLASSES = (("none", 0.9), ("see_less", 0.08), ("report", 0.02))

#: Tasks whose label is logged on only some rows (e.g. the surface that shows the button);
#: the rest are unlabelled and masked out.
LABELLED_SHARE = {"reply": 0.6, "share": 0.5, FEEDBACK: 0.7}


@dataclass(frozen=True)
class Batch:
    features: torch.Tensor  # [B, F]
    labels: torch.Tensor  # [B, T + 1]: the engagements 0/1, then the feedback class; NaN where unlabelled
    weights: torch.Tensor  # [B], per-sample weight (e.g. how recent the impression is)
    mask: torch.Tensor  # [B, T + 1], True where a label exists
    true_logits: torch.Tensor  # [B, T + 3]: the generating model's logits, one block as the ranker's head
    groups: torch.Tensor  # [B], the request of each row (its index when rows are independent)


def _intercepts(scores: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
    """Per-task intercepts b with mean(sigmoid(scores + b)) = rate, by bisection (the mean rises with b)."""
    low, high = torch.full_like(rates, -20.0), torch.full_like(rates, 20.0)
    for _ in range(40):
        middle = (low + high) / 2
        too_high = torch.sigmoid(scores + middle).mean(0) > rates
        high = torch.where(too_high, middle, high)
        low = torch.where(too_high, low, middle)
    return (low + high) / 2


def _class_intercepts(scores: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
    """Class intercepts b with mean(softmax(scores + b)) = shares, by fixed-point steps on log shares."""
    bias = shares.log()
    for _ in range(50):
        bias = bias + shares.log() - torch.softmax(scores + bias, dim=1).mean(0).log()
    return bias - bias[0]


class EngagementModel:
    """The generating model over shared dense features: P(y_t = 1 | x) = sigmoid(x @ W_t + b_t) per
    engagement, and P(feedback = c | x) = softmax(x @ V + c)_c for the negative feedback."""

    def __init__(self, tasks: int, features: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.tasks, self.features = tasks, features
        self.weight = torch.randn(features, tasks, generator=gen) * 1.5 / math.sqrt(features)
        rates = torch.tensor([rate for _, rate in ENGAGEMENTS[:tasks]])
        scores = torch.randn(50_000, features, generator=gen)
        self.bias = _intercepts(scores @ self.weight, rates)
        self.feedback_weight = torch.randn(features, len(FEEDBACK_CLASSES), generator=gen) * 1.5 / math.sqrt(features)
        shares = torch.tensor([share for _, share in FEEDBACK_CLASSES])
        self.feedback_bias = _class_intercepts(scores @ self.feedback_weight, shares)
        names = [name for name, _ in ENGAGEMENTS[:tasks]] + [FEEDBACK]
        self.labelled = torch.tensor([LABELLED_SHARE.get(name, 1.0) for name in names])

    def sample(self, rows: int, gen: torch.Generator, request_rows: int = 1) -> Batch:
        """``rows`` rows; with ``request_rows > 1``, in requests of that many consecutive rows (one user's
        feed) whose features share a user part: half of each feature's variance is the user's, so rows of a
        request are alike, while each row's features, and so the Bayes-optimal model, are as without."""
        x = torch.randn(rows, self.features, generator=gen)
        groups = torch.arange(rows) // request_rows
        if request_rows > 1:
            users = torch.randn(int(groups[-1]) + 1, self.features, generator=gen)
            x = (x + users[groups]) / math.sqrt(2)
        logits = x @ self.weight + self.bias
        labels = (torch.rand(rows, self.tasks, generator=gen) < torch.sigmoid(logits)).float()
        feedback_logits = x @ self.feedback_weight + self.feedback_bias
        feedback = torch.multinomial(torch.softmax(feedback_logits, dim=1), 1, generator=gen).float()
        mask = torch.rand(rows, self.tasks + 1, generator=gen) < self.labelled
        weights = 0.5 + torch.rand(rows, generator=gen)
        labels = torch.cat([labels, feedback], 1).masked_fill(~mask, float("nan"))
        return Batch(x, labels, weights, mask, torch.cat([logits, feedback_logits], 1), groups)
