"""PyTorch loss modules for multi-task ranking models."""

from losses.bce import BCEWithLogitsLoss
from losses.cross_entropy import CrossEntropyLoss
from losses.loss_type import LossType

__version__ = "0.1.0"

__all__ = ["BCEWithLogitsLoss", "CrossEntropyLoss", "LossType", "__version__"]
