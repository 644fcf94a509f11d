"""What every single-task loss module shares: a validated ``reduction`` and ``label_smoothing``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from losses import _validation as v
from losses.functional import Reduction


class _Loss(nn.Module):
    reduction: Reduction
    label_smoothing: float
    check_inputs: bool

    def __init__(self, reduction: Reduction = "mean", label_smoothing: float = 0.0, check_inputs: bool = False) -> None:
        super().__init__()
        self.reduction = v.check_choice("reduction", reduction, v.ELEMENT_REDUCTIONS)  # type: ignore[assignment]
        self.label_smoothing = v.check_probability("label_smoothing", label_smoothing)
        self.check_inputs = bool(check_inputs)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"

    def _register_weight(self, name: str, value: Optional[torch.Tensor]) -> None:
        # Registered even when None so that `state_dict` keys and `.to()` behave the same for
        # every instance of the class; a None buffer is simply skipped by both.
        self.register_buffer(name, value)
