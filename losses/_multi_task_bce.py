"""The binary row of the multi-task losses: BCE over a ``[B, T]`` block with the Task options.

:func:`multi_task_bce` runs the fused autograd node of :mod:`losses._fused_bce`;
:func:`multi_task_bce_elements` is the same math from differentiable torch operations (the
``none`` reduction and the :mod:`torch.func` transforms). Public through :mod:`losses.functional`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from losses import _input_checks as checks
from losses._dtypes import as_block, as_dtype, compute_dtype, element_inputs
from losses._fused_bce import Focal, MultiTaskBCE


def multi_task_bce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    pos_weight: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    scale: Union[float, torch.Tensor, None] = None,
    task_weight: Optional[torch.Tensor] = None,
    factor: Optional[float] = None,
    *,
    focal_gamma: Optional[torch.Tensor] = None,
    focal_alpha: Optional[torch.Tensor] = None,
    label_smoothing: Optional[torch.Tensor] = None,
    neg_sampling_rate: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-task binary cross-entropy over a ``[B, T]`` block, and their weighted total.

    .. math::
        L_t = s_t \sum_{b} m_{bt}\, w_{bt} \left[ (1 - y_{bt}) x_{bt}
              - (1 + (p_t - 1) y_{bt}) \log \sigma(x_{bt}) \right],
        \qquad L = f \sum_t \tau_t L_t

    The bracket is the element loss of :func:`binary_cross_entropy_with_logits`, computed in
    torch's order of operations, so infinite logits give torch's values (``+inf`` with label 0
    is ``inf``, a ``-inf`` logit NaN) and gradients. Entries where
    ``mask`` is false contribute nothing to the losses or the gradient, whatever their label
    holds (NaN included). One autograd node with an analytic gradient: no loop over tasks and no
    ``[B, T]`` intermediate kept for backward. Under a :mod:`torch.func` transform (``grad``,
    ``vmap``, ``jacrev``, ``jvp``, ...) the same values come from plain differentiable torch
    operations instead, which the transforms can follow.

    The options of :class:`~losses.Task`, one value per task (``None``: every task keeps the
    default, and the pass skips that math). With ``focal_gamma`` or ``focal_alpha`` the bracket
    becomes the focal element loss :math:`-\alpha_1 p y (1 - \sigma(x))^\gamma \log \sigma(x) -
    \alpha_0 (1 - y) \sigma(x)^\gamma \log(1 - \sigma(x))` (a kernel of its own, with its own
    analytic gradient); ``label_smoothing`` :math:`\varepsilon` replaces :math:`y` by :math:`y (1 -
    \varepsilon) + \varepsilon / 2`; ``neg_sampling_rate`` :math:`r` multiplies the weight by
    :math:`y + (1 - y) / r` (of the label before smoothing). Their values are not checked here
    (:class:`~losses.Task` checks them).

    Args:
        scale: :math:`s`, a float, a 0-dim or a ``(T)`` tensor (one over the labelled count for a mean);
            ``None`` for 1, the plain sums.
        task_weight: :math:`\tau`, ``(T)``; ``None`` for ones.
        factor: :math:`f`, e.g. ``1 / T`` for the mean over tasks; ``None`` skips :math:`L`
            (returned as 0).
        focal_gamma: :math:`\gamma \ge 0`, ``(T)``. Default: ``None`` (0).
        focal_alpha: :math:`\alpha \in [0, 1]`, ``(T)``: :math:`(\alpha_1, \alpha_0) = (\alpha,
            1 - \alpha)`; a NaN entry gives that task :math:`(1, 1)`. Default: ``None`` (all
            :math:`(1, 1)`).
        label_smoothing: :math:`\varepsilon \in [0, 1]`, ``(T)``. Default: ``None`` (0).
        neg_sampling_rate: :math:`r \in (0, 1]`, ``(T)``. Default: ``None`` (1).

    Shape:
        - logits, labels, mask: ``(B, T)``; weights: ``(B, T)`` or ``(B)``; pos_weight and the
          options: ``(T)``.
        - output: ``(T)`` and a scalar, float32 for half-precision logits.

    Example:
        >>> logits = torch.tensor([[0.0, 1.0], [0.0, -1.0]])
        >>> labels = torch.tensor([[1.0, 0.0], [0.0, float("nan")]])
        >>> mask = torch.tensor([[True, True], [True, False]])
        >>> multi_task_bce(logits, labels, torch.ones(2), mask=mask, factor=0.5)
        (tensor([1.3863, 1.3133]), tensor(1.3498))
    """
    options = {
        "focal_gamma": focal_gamma,
        "focal_alpha": focal_alpha,
        "label_smoothing": label_smoothing,
        "neg_sampling_rate": neg_sampling_rate,
    }
    checks.check_multi_task_call(
        logits, labels, weights, mask, 0, scale, pos_weight=pos_weight, task_weight=task_weight, **options
    )
    return unchecked_multi_task_bce(
        logits,
        labels,
        pos_weight,
        weights,
        mask,
        scale,
        task_weight,
        factor,
        focal_gamma=focal_gamma,
        focal_alpha=focal_alpha,
        label_smoothing=label_smoothing,
        neg_sampling_rate=neg_sampling_rate,
    )


def unchecked_multi_task_bce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    pos_weight: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    scale: Union[float, torch.Tensor, None] = None,
    task_weight: Optional[torch.Tensor] = None,
    factor: Optional[float] = None,
    *,
    focal_gamma: Optional[torch.Tensor] = None,
    focal_alpha: Optional[torch.Tensor] = None,
    label_smoothing: Optional[torch.Tensor] = None,
    neg_sampling_rate: Optional[torch.Tensor] = None,
    focal_power: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`multi_task_bce` without its argument checks: for a caller that checked them once (the modules).

    ``focal_power`` ``k`` in {1, 2, 3}: the caller knows that every ``focal_gamma`` is 0 or ``k``
    (a module, from its Tasks), and the focal modulations are then products, not exponentials
    (0: any gamma).
    """
    dtype = compute_dtype(logits.dtype)
    if task_weight is None:
        task_weight = torch.ones_like(pos_weight, dtype=dtype)
    if torch._C._are_functorch_transforms_active():
        # torch.func needs an autograd.Function with setup_context and a vmap rule, which the fused
        # one gives up for speed (see MultiTaskBCE). Under a transform the same math runs as plain
        # differentiable ops, which every transform (grad, vmap, jacrev, jvp, hessian) understands.
        task_losses = unchecked_multi_task_bce_elements(
            logits,
            labels,
            pos_weight,
            weights,
            mask,
            focal_gamma=focal_gamma,
            focal_alpha=focal_alpha,
            label_smoothing=label_smoothing,
            neg_sampling_rate=neg_sampling_rate,
        ).sum(0)
        if scale is not None:
            task_losses = task_losses * scale
        task_weight = as_dtype(task_weight, dtype)
        total = task_losses.new_zeros(()) if factor is None else (task_losses * task_weight).sum() * factor
        return task_losses, total
    x, y, w = as_dtype(logits, dtype), as_dtype(labels, dtype), None if weights is None else as_block(weights, dtype)
    positive, focal = as_dtype(pos_weight, dtype), None
    # Tested here, not inside the helpers: plain BCE, the common case, then pays no call for them.
    if focal_gamma is not None or focal_alpha is not None:
        # The focal kernel smooths the labels in its own first pass over them (see Focal).
        if neg_sampling_rate is not None:
            y, w = _binary_targets(y, w, None, neg_sampling_rate)
        focal = _focal_constants(positive, focal_gamma, focal_alpha, label_smoothing, focal_power)
        if not torch.is_grad_enabled():
            x = x.detach()  # the kernel forms the gradient only for logits that get one
    elif label_smoothing is not None or neg_sampling_rate is not None:
        y, w = _binary_targets(y, w, label_smoothing, neg_sampling_rate)
    result: tuple[torch.Tensor, torch.Tensor] = MultiTaskBCE.apply(  # type: ignore[no-untyped-call]
        x, y, w, mask, positive, scale, as_dtype(task_weight, dtype), factor, focal
    )
    return result


def _binary_targets(
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    label_smoothing: Optional[torch.Tensor],
    neg_sampling_rate: Optional[torch.Tensor],
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The labels after smoothing and the weights after negative sampling (each one pass, only when given)."""
    if neg_sampling_rate is not None:
        # y + (1 - y) / r: a negative counts 1 / r, a positive 1, a soft label in between, as in
        # the ranking metrics' importance weights.
        importance = torch.lerp(neg_sampling_rate.to(labels.dtype).reciprocal(), labels.new_ones(()), labels)
        weights = importance if weights is None else importance.mul_(weights)
    if label_smoothing is not None:
        labels = torch.lerp(labels, labels.new_full((), 0.5), label_smoothing.to(labels.dtype))
    return labels, weights


def _focal_factors(
    pos_weight: torch.Tensor, focal_gamma: Optional[torch.Tensor], focal_alpha: Optional[torch.Tensor]
) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """The positives' factor and, for the focal kernel, ``(gamma, negatives' factor)``; ``None`` for plain BCE."""
    if focal_gamma is None and focal_alpha is None:
        return pos_weight, None
    gamma = torch.zeros_like(pos_weight) if focal_gamma is None else focal_gamma.to(pos_weight.dtype)
    if focal_alpha is None:
        return pos_weight, (gamma, torch.ones_like(pos_weight))
    alpha = focal_alpha.to(pos_weight.dtype)
    without = alpha.isnan()  # a task without an alpha weighs both targets 1
    return pos_weight * torch.where(without, 1.0, alpha), (gamma, torch.where(without, 1.0, 1.0 - alpha))


def _focal_constants(
    pos_weight: torch.Tensor,
    focal_gamma: Optional[torch.Tensor],
    focal_alpha: Optional[torch.Tensor],
    label_smoothing: Optional[torch.Tensor],
    power: int,
) -> Focal:
    """The focal kernel's constants: its signed target weights, affine in the label as given (see ``Focal``).

    With smoothing ``e``: ``-a1 y' = -a1 e / 2 - a1 (1 - e) y`` and ``-a0 (1 - y') = -a0 (1 - e / 2)
    + a0 (1 - e) y``; without, ``-a1 y`` and ``-a0 + a0 y``, which is exactly 0 at ``y = 1``.
    """
    positive, factors = _focal_factors(pos_weight, focal_gamma, focal_alpha)
    assert factors is not None
    gamma, negative = factors
    if label_smoothing is None:
        pos_slope, pos_offset, neg_offset = positive.neg(), torch.zeros_like(positive), negative.neg()
        neg_slope = negative
    else:
        smoothing = label_smoothing.to(positive.dtype)
        kept = 1.0 - smoothing
        pos_slope, pos_offset = positive * kept, positive * smoothing
        pos_slope.neg_()
        pos_offset.mul_(-0.5)
        neg_slope, neg_offset = negative * kept, negative * (1.0 - 0.5 * smoothing)
        neg_offset.neg_()
    if not power:
        return Focal(gamma, pos_offset, pos_slope, neg_offset, neg_slope)
    floor = (gamma == 0).to(gamma.dtype)  # max(s, 1) ** k = 1 for the tasks without modulation
    return Focal(gamma, pos_offset, pos_slope, neg_offset, neg_slope, power, floor)


def multi_task_bce_elements(
    logits: torch.Tensor,
    labels: torch.Tensor,
    pos_weight: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    *,
    focal_gamma: Optional[torch.Tensor] = None,
    focal_alpha: Optional[torch.Tensor] = None,
    label_smoothing: Optional[torch.Tensor] = None,
    neg_sampling_rate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Binary cross-entropy of every entry of a ``[B, T]`` block, 0 where ``mask`` is false.

    The element losses of :func:`multi_task_bce`, built from differentiable torch operations (so
    every autograd mode and ``torch.func`` transform works): unlabelled entries are replaced
    before the math, so they give 0 and a zero gradient whatever they hold. The options are those
    of :func:`multi_task_bce`.

    Shape:
        - logits, labels, mask: ``(B, T)``; weights: ``(B, T)`` or ``(B)``; pos_weight and the
          options: ``(T)``.
        - output: ``(B, T)``, float32 for half-precision logits.

    Example:
        >>> logits = torch.tensor([[0.0, float("nan")]])
        >>> multi_task_bce_elements(logits, torch.tensor([[1, 0]]), torch.ones(2), mask=torch.tensor([[True, False]]))
        tensor([[0.6931, 0.0000]])
    """
    options = {
        "focal_gamma": focal_gamma,
        "focal_alpha": focal_alpha,
        "label_smoothing": label_smoothing,
        "neg_sampling_rate": neg_sampling_rate,
    }
    checks.check_multi_task_call(logits, labels, weights, mask, 0, pos_weight=pos_weight, **options)
    return unchecked_multi_task_bce_elements(logits, labels, pos_weight, weights, mask, **options)


def unchecked_multi_task_bce_elements(
    logits: torch.Tensor,
    labels: torch.Tensor,
    pos_weight: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    *,
    focal_gamma: Optional[torch.Tensor] = None,
    focal_alpha: Optional[torch.Tensor] = None,
    label_smoothing: Optional[torch.Tensor] = None,
    neg_sampling_rate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`multi_task_bce_elements` without its argument checks."""
    x, y, w = element_inputs(logits, labels, weights, mask)
    dtype = x.dtype
    y, w = _binary_targets(y, w, label_smoothing, neg_sampling_rate)
    positive, focal = _focal_factors(as_dtype(pos_weight, dtype), focal_gamma, focal_alpha)
    if focal is None:
        return F.binary_cross_entropy_with_logits(x, y, weight=w, pos_weight=positive, reduction="none")
    gamma, negative = focal
    # The focal element loss from differentiable ops, as the fused kernel computes it:
    # (1 - s)^g = exp(g log sigmoid(-x)) and s^g = exp(g log sigmoid(x)).
    log_s, log_q = F.logsigmoid(x), F.logsigmoid(-x)
    positives = torch.exp(gamma * log_q) * log_s * (y * positive)
    negatives = torch.exp(gamma * log_s) * log_q * ((1.0 - y) * negative)
    losses = (positives + negatives).neg()
    return losses if w is None else losses * w
