"""Task weightings: turn the task losses of :class:`~losses.MultiTaskLoss` into one training loss.

Each takes the dict ``{"loss/<task>": ..., "loss": ...}`` and returns the task entries, the
weights as ``"weight/<task>"`` (detached, for logging) and the weighted ``"loss"``. Pass one as
``MultiTaskLoss(..., weighting=...)`` or call it on the dict. See ``docs/weighting.rst``.
"""

from losses.weighting._base import TaskWeighting
from losses.weighting.dynamic_weight_average import DynamicWeightAverage, dynamic_weight_average_weights
from losses.weighting.geometric import GeometricLossStrategy, geometric_loss_weights
from losses.weighting.random_loss_weighting import RandomLossWeighting, random_loss_weights
from losses.weighting.uncertainty import UncertaintyWeighting

__all__ = [
    "DynamicWeightAverage",
    "GeometricLossStrategy",
    "RandomLossWeighting",
    "TaskWeighting",
    "UncertaintyWeighting",
    "dynamic_weight_average_weights",
    "geometric_loss_weights",
    "random_loss_weights",
]
