"""The multi-class row of the multi-task losses: softmax cross-entropy per (sample, task) entry.

Public through :mod:`losses.functional`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from losses import _input_checks as checks
from losses._dtypes import as_block, as_dtype, compute_dtype

#: The class-index label that marks an entry without a label, as in :func:`torch.nn.functional.cross_entropy`.
IGNORE_INDEX = -100


def multi_task_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    *,
    label_smoothing: Optional[torch.Tensor] = None,
    num_classes: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Softmax cross-entropy of every (sample, task) entry, and which entries are labelled.

    .. math::
        \ell_{bt} = -m_{bt}\, w_{bt} \log \mathrm{softmax}(x_{bt})_{y_{bt}},
        \qquad m_{bt} = \text{mask}_{bt} \wedge (y_{bt} \ne -100)

    A label of ``-100`` (torch's ``ignore_index``) is unlabelled, exactly like a false ``mask``
    entry. An unlabelled entry gives 0 and a zero gradient whatever its logits, label and weight
    hold (NaN and inf included): they are replaced before the math, not multiplied by 0 after.
    Labels of any integer dtype are converted to int64.

    ``label_smoothing`` :math:`\varepsilon_t` (one per task) replaces the one-hot target by
    :math:`(1 - \varepsilon_t)` on the label plus :math:`\varepsilon_t / C_t` on every class, as
    torch's ``label_smoothing``. ``num_classes`` :math:`C_t` (one per task) lets tasks with fewer
    classes than ``C`` share the block: their classes from :math:`C_t` on are padding, left out of
    the softmax and of the smoothing.

    Shape:
        - logits: ``(B, T, C)``; labels (class indices), mask: ``(B, T)``; weights: ``(B, T)`` or ``(B)``.
        - label_smoothing, num_classes (integer): ``(T)``.
        - output: the element losses ``(B, T)`` and the labelled entries ``m``, bool ``(B, T)``.

    Example:
        >>> logits = torch.zeros(2, 1, 4)
        >>> multi_task_cross_entropy(logits, torch.tensor([[3], [-100]]))
        (tensor([[1.3863],
                [0.0000]]), tensor([[ True],
                [False]]))
    """
    checks.check_multi_task_call(
        logits, labels, weights, mask, 1, label_smoothing=label_smoothing, num_classes=num_classes
    )
    return unchecked_multi_task_cross_entropy(
        logits, labels, weights, mask, label_smoothing=label_smoothing, num_classes=num_classes
    )


def unchecked_multi_task_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    *,
    label_smoothing: Optional[torch.Tensor] = None,
    num_classes: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`multi_task_cross_entropy` without its argument checks; labels may also be whole floats."""
    dtype = compute_dtype(logits.dtype)
    if not labels.is_floating_point():
        labels = as_dtype(labels, torch.long)
    labelled = labels != IGNORE_INDEX
    if mask is not None:
        labelled = labelled & mask
    safe_labels = as_dtype(torch.where(labelled, labels, 0), torch.long)
    # Class-major [C, B, T]: on the CPU a softmax over the outermost dimension runs vectorized over
    # B * T, several times faster than over a short last dimension (5x for 3 classes). The copy is
    # ours, so unlabelled entries are overwritten in place (NaN and inf included), before the math.
    x = as_dtype(logits, dtype).permute(2, 0, 1).clone(memory_format=torch.contiguous_format)
    x = x.masked_fill_(labelled.logical_not(), 0.0)
    padding = None
    if num_classes is not None:
        padding = torch.arange(x.shape[0], device=logits.device).unsqueeze(-1) >= num_classes  # [C, T]
        x = x.masked_fill_(padding.unsqueeze(1), -torch.inf)
        # A label in a task's padding (its class count or more) would pick a -inf log-probability
        # and make the loss a silent NaN: point it past the padded width instead, so that it gets
        # torch's own out-of-range error, like any other class index outside [0, C).
        safe_labels = torch.where(safe_labels < num_classes, safe_labels, x.shape[0])
    log_p = F.log_softmax(x, dim=0)
    picked = log_p.gather(0, safe_labels.unsqueeze(0)).squeeze(0)
    if label_smoothing is None:
        elements = picked.neg()
    else:
        if padding is None or num_classes is None:
            uniform = log_p.mean(0)
        else:
            uniform = torch.where(padding.unsqueeze(1), 0.0, log_p).sum(0) / num_classes.to(dtype)
        # -((1 - e) log p_y + e mean_c log p_c): torch's label smoothing.
        elements = torch.lerp(picked, uniform, label_smoothing.to(dtype)).neg()
    if weights is None:
        elements = torch.where(labelled, elements, 0.0)
    else:
        elements = elements * torch.where(labelled, as_block(weights, dtype), 0.0)
    return elements, labelled


def multi_task_cross_entropy_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Per-task sums of softmax cross-entropy: :func:`multi_task_cross_entropy` summed over the batch.

    .. math::
        S_t = -\sum_{b} m_{bt}\, w_{bt} \log \mathrm{softmax}(x_{bt})_{y_{bt}}

    Kept from version 0.1.0; labels of ``-100`` count as unlabelled, as in :func:`multi_task_cross_entropy`.

    Shape:
        - logits: ``(B, T, C)``; labels (class indices), mask: ``(B, T)``; weights: ``(B, T)`` or ``(B)``.
        - output: ``(T)``.

    Example:
        >>> logits = torch.zeros(2, 1, 4)
        >>> multi_task_cross_entropy_sums(logits, torch.tensor([[3], [0]]))
        tensor([2.7726])
    """
    elements, _ = multi_task_cross_entropy(logits, labels, weights, mask)
    return elements.sum(0)
