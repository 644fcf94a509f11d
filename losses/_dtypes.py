"""The dtype a loss is computed in, and the conversions every kernel shares."""

from __future__ import annotations

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
