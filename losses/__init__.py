"""PyTorch loss modules for multi-task ranking models."""

from losses.bce import BCEWithLogitsLoss
from losses.builders import build_loss, build_multi_task_loss, get_global_loss_detached
from losses.cross_entropy import CrossEntropyLoss
from losses.loss_type import LossType
from losses.metrics import GlobalLoss, MultiTaskGlobalLoss, sync_for_checkpoint
from losses.multi_task import MultiTaskLoss
from losses.ranking_metrics import MultiTaskRankingMetrics
from losses.task import Task
from losses.weighting import (
    DynamicWeightAverage,
    GeometricLossStrategy,
    RandomLossWeighting,
    TaskWeighting,
    UncertaintyWeighting,
)

__version__ = "0.2.0"

__all__ = [
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "DynamicWeightAverage",
    "GeometricLossStrategy",
    "GlobalLoss",
    "LossType",
    "MultiTaskGlobalLoss",
    "MultiTaskLoss",
    "MultiTaskRankingMetrics",
    "RandomLossWeighting",
    "Task",
    "TaskWeighting",
    "UncertaintyWeighting",
    "__version__",
    "build_loss",
    "build_multi_task_loss",
    "get_global_loss_detached",
    "sync_for_checkpoint",
]
