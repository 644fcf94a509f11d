"""The regression row of the multi-task losses: half the squared error per entry.

Public through :mod:`losses.functional`.
"""

from __future__ import annotations

from typing import Optional

import torch

from losses import _input_checks as checks
from losses._dtypes import element_inputs


def multi_task_squared_error(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Half the squared error of every entry of a ``[B, T]`` block, 0 where ``mask`` is false.

    .. math::
        \ell_{bt} = m_{bt}\, w_{bt}\, \tfrac{1}{2} (x_{bt} - y_{bt})^2

    The regression row of :class:`~losses.MultiTaskLoss`; its gradient is :math:`m w (x - y)`.
    Unlabelled entries are replaced before the math: they give 0 and a zero gradient whatever
    they hold (NaN and inf included).

    Shape:
        - logits, labels, mask: ``(B, T)``; weights: ``(B, T)`` or ``(B)``.
        - output: ``(B, T)``, float32 for half-precision logits.

    Example:
        >>> logits = torch.tensor([[1.0, 2.0], [0.5, 0.0]])
        >>> labels = torch.tensor([[0.0, 2.0], [1.5, float("nan")]])
        >>> multi_task_squared_error(logits, labels, mask=torch.tensor([[True, True], [True, False]]))
        tensor([[0.5000, 0.0000],
                [0.5000, 0.0000]])
    """
    checks.check_multi_task_call(logits, labels, weights, mask, 0)
    return unchecked_multi_task_squared_error(logits, labels, weights, mask)


def unchecked_multi_task_squared_error(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`multi_task_squared_error` without its argument checks."""
    x, y, w = element_inputs(logits, labels, weights, mask)
    losses = (x - y).square().mul(0.5)
    return losses if w is None else losses * w
