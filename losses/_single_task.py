"""The single-task losses: binary and softmax cross-entropy, as :mod:`torch.nn.functional` with weights.

Public through :mod:`losses.functional`; their argument checks are in :mod:`losses._input_checks`.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

from losses import _input_checks as checks
from losses._dtypes import as_dtype, compute_dtype

Reduction = Literal["mean", "sum", "none"]


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator``, and 0 where the denominator is exactly 0.

    Any other denominator divides, a negative one included (as torch does with negative class
    weights). Dividing by 1 where the denominator is 0, then selecting 0 there, keeps the
    gradient finite: a masked ``0 / 0`` would still send NaN backwards.
    """
    nonzero = denominator != 0
    return torch.where(nonzero, numerator / torch.where(nonzero, denominator, torch.ones_like(denominator)), 0.0)


def binary_cross_entropy_with_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    pos_weight: Optional[torch.Tensor] = None,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    r"""Binary cross-entropy between ``sigmoid(logits)`` and ``labels``.

    .. math::
        \ell_i = -w_i \left[ p\, y_i \log \sigma(x_i) + (1 - y_i) \log(1 - \sigma(x_i)) \right],
        \qquad y_i \leftarrow y_i (1 - \varepsilon) + \varepsilon / 2

    with ``p`` the ``pos_weight`` (broadcast over the last dimension) and ``w`` the per-element
    ``weights``. ``mean`` divides the sum by the number of elements, as torch does; no elements
    give 0 (torch: NaN) with a zero gradient. Gradients flow to ``logits``, to floating ``labels``
    and to ``weights`` (which torch refuses to differentiate); a ``pos_weight`` that requires grad
    is a ``ValueError``. Complex tensors are a ``TypeError``.

    Shape:
        - logits: any shape ``(*)``, floating point.
        - labels: ``(*)``, float, integer or bool (converted like ``labels.type_as(logits)``).
        - weights: broadcastable to ``(*)``.
        - pos_weight: broadcastable to ``(*)``, typically ``(C,)`` for the last dimension.
        - output: scalar, or ``(*)`` for ``reduction="none"``.

    Example:
        >>> logits = torch.tensor([0.0, 2.0])
        >>> binary_cross_entropy_with_logits(logits, torch.tensor([1, 0]))
        tensor(1.4100)
    """
    checks.check_binary_cross_entropy_call(logits, labels, weights, pos_weight, reduction, label_smoothing)
    dtype = compute_dtype(logits.dtype)
    logits = logits.to(dtype)
    labels = labels.to(dtype)
    if reduction == "mean" and logits.numel() == 0:
        # torch's mean of no elements is NaN; the sum of none is the documented 0, with a gradient.
        reduction = "sum"
    if label_smoothing:
        labels = labels * (1.0 - label_smoothing) + 0.5 * label_smoothing
    if weights is not None and weights.requires_grad:
        # torch's BCE refuses to differentiate its `weight`; the product of the element losses does.
        elements = F.binary_cross_entropy_with_logits(
            logits, labels, pos_weight=None if pos_weight is None else pos_weight.to(dtype), reduction="none"
        ) * weights.to(dtype)
        return elements.mean() if reduction == "mean" else elements.sum() if reduction == "sum" else elements
    return F.binary_cross_entropy_with_logits(
        logits,
        labels,
        weight=None if weights is None else weights.to(dtype),
        pos_weight=None if pos_weight is None else pos_weight.to(dtype),
        reduction=reduction,
    )


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    class_weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    r"""Cross-entropy between ``softmax(logits)`` over the class dimension and ``labels``.

    For class-index labels :math:`y_i` with class weights :math:`c` and per-sample weights :math:`s`:

    .. math::
        \ell_i = -s_i\, c_{y_i} \log \frac{e^{x_{i,y_i}}}{\sum_k e^{x_{i,k}}}

    (with label smoothing, the smoothed target as in :func:`torch.nn.functional.cross_entropy`).
    ``mean`` divides :math:`\sum_i \ell_i` by :math:`\sum_{i:\, y_i \ne \text{ignore}} c_{y_i}`,
    exactly torch's denominator, so per-sample weights act as multipliers and do not renormalize.
    A denominator of exactly 0 (no sample, every label ``ignore_index``, or class weights that sum
    to 0 over the labelled samples) gives 0 with a zero gradient, where torch gives NaN or inf; any
    other denominator divides, a negative one included, as in torch. For probability labels
    ``mean`` divides by the number of samples (0 for none). A sample labelled ``ignore_index``
    adds nothing whatever its weight holds (NaN included); its logits get a zero gradient when
    finite, and NaN when not, as in torch. Gradients flow to ``logits``, probability ``labels`` and
    ``weights``; a ``class_weight`` that requires grad is a ``ValueError``, complex tensors a
    ``TypeError``.

    Shape:
        - logits: ``(C)``, ``(N, C)`` or ``(N, C, d_1, ..., d_K)``.
        - labels: class indices (any integer dtype, converted to int64) of shape ``()``, ``(N)``
          or ``(N, d_1, ..., d_K)``, or probabilities of the shape of ``logits``.
        - weights: the shape of the class-index labels (logits without the class dimension).
        - class_weight: ``(C)``.
        - output: scalar, or one loss per sample for ``reduction="none"``.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
        >>> cross_entropy(logits, torch.tensor([0, 2]))
        tensor(0.6691)
    """
    ignore_index = checks.check_cross_entropy_call(
        logits, labels, weights, class_weight, ignore_index, reduction, label_smoothing
    )
    dtype = compute_dtype(logits.dtype)
    logits = logits.to(dtype)
    # torch takes int64 (or uint8) class indices only; every other integer dtype is converted.
    labels = labels.to(dtype) if labels.is_floating_point() else as_dtype(labels, torch.long)
    if class_weight is not None:
        class_weight = class_weight.to(dtype)
    probability_labels = labels.is_floating_point()
    if reduction == "mean" and probability_labels and logits.numel() == 0:
        reduction = "sum"  # no samples: 0, where torch's mean gives NaN
    if weights is None and (probability_labels or reduction != "mean"):
        return F.cross_entropy(
            logits,
            labels,
            weight=class_weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )
    elements = F.cross_entropy(
        logits,
        labels,
        weight=class_weight,
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=label_smoothing,
    )
    valid = None if probability_labels else labels != ignore_index
    if weights is not None:
        weights = weights.to(dtype)
        # Selected, not multiplied by the 0 loss: an ignored sample's NaN weight must add nothing.
        elements = elements * (weights if valid is None else torch.where(valid, weights, 0.0))
    if reduction != "mean":
        return elements.sum() if reduction == "sum" else elements
    if valid is None:
        return elements.sum() / max(elements.numel(), 1)
    if class_weight is None:
        denominator = valid.sum().to(dtype)
    else:
        denominator = (class_weight[torch.where(valid, labels, 0)] * valid).sum()
    return safe_divide(elements.sum(), denominator)
