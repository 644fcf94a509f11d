"""The dtype a loss is computed in, and the conversions every kernel shares."""

from __future__ import annotations

from typing import Optional

import torch

_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a loss is computed in: float16/bfloat16 are promoted to float32."""
    return torch.float32 if dtype in _HALF else dtype


def as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Skipping the call when nothing changes matters for small batches, where each op counts.
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def as_block(weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Weights in ``dtype``, a ``[B]`` vector as a ``[B, 1]`` column that broadcasts over the tasks."""
    weights = as_dtype(weights, dtype)
    return weights.unsqueeze(1) if weights.ndim == 1 else weights


def element_inputs(
    logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor], mask: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Logits, labels and weights of a ``[B, T]`` block in the compute dtype, masked for element losses.

    Unlabelled entries get logit and label 0 (finite, whatever they held: NaN too) and weight 0, so
    they add neither loss nor gradient; without weights the mask becomes the weights.
    """
    dtype = compute_dtype(logits.dtype)
    x, y = as_dtype(logits, dtype), as_dtype(labels, dtype)
    w = None if weights is None else as_block(weights, dtype)
    if mask is not None:
        x, y = torch.where(mask, x, 0.0), torch.where(mask, y, 0.0)
        w = as_dtype(mask, dtype) if w is None else torch.where(mask, w, 0.0)
    return x, y, w
