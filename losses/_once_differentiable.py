"""Backwards that refuse a second derivative, even when the first is taken with a constant upstream gradient.

torch's ``once_differentiable`` attaches its error to its results only when an incoming gradient
requires grad, and through a node that leads to no input. Under ``create_graph=True`` with a
constant incoming gradient (a loss whose ranking term enters linearly) the fused ranking Functions
then returned their saved first derivative as a constant: a gradient penalty's second backward ran
and silently left out the ranking term's curvature. Here the refusal is a node whose inputs include
the Function's saved inputs, so any second backward that reaches them raises.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Optional

import torch

_MESSAGE = (
    "trying to differentiate twice a function that was marked with @once_differentiable: the ranking "
    "terms' fused Functions save their first derivative as a constant (see docs/ranking_losses.rst)"
)

Backward = Callable[..., tuple[Optional[torch.Tensor], ...]]


class _Refused(torch.autograd.Function):
    """``value`` itself, recorded as depending on ``links``; its backward raises."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, *links: torch.Tensor) -> torch.Tensor:
        return value.view_as(value)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError(_MESSAGE)


def once_differentiable(backward: Backward) -> Backward:
    """``backward`` under ``torch.no_grad``; recorded (``create_graph``), its results refuse a second derivative."""

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
        with torch.no_grad():
            results = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return results
        links = [t for t in (*grads, *ctx.saved_tensors) if t is not None and t.requires_grad]
        if not links:
            return results
        return tuple(None if r is None else _Refused.apply(r, *links) for r in results)  # type: ignore[no-untyped-call]

    return wrapper
