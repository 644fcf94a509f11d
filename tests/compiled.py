"""A check shared by the ``torch.compile`` tests: a compiled loss gives the eager one's values and gradient."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def assert_compiled_matches_eager(
    loss: Callable[..., Any], compiled: Callable[..., Any], logits: torch.Tensor, *args: Any
) -> None:
    """Every entry of ``compiled(logits, *args)`` and the gradient of its ``"loss"`` equal the eager ``loss``'s."""
    eager_x, compiled_x = logits.detach().clone().requires_grad_(), logits.detach().clone().requires_grad_()
    eager = loss(eager_x, *args)
    out = compiled(compiled_x, *args)
    for key in eager:
        torch.testing.assert_close(out[key], eager[key], msg=key)
    eager["loss"].backward()
    out["loss"].backward()
    torch.testing.assert_close(compiled_x.grad, eager_x.grad)
