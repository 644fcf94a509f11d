"""Stateless loss math. The modules in this package hold configuration and call these.

Every function checks the shapes of its tensor arguments (free: no data is read) and computes
half-precision inputs in float32.
"""

from __future__ import annotations

from typing import Literal, Optional, Union, get_args

import torch
import torch.nn.functional as F

from losses import _validation as v
from losses._fused_bce import MultiTaskBCE, column_sums

Reduction = Literal["mean", "sum", "none"]

_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a loss is computed in: float16/bfloat16 are promoted to float32."""
    return torch.float32 if dtype in _HALF else dtype


def _as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Skipping the call when nothing changes matters for small batches, where each op counts.
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _as_block(weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    weights = _as_dtype(weights, dtype)
    return weights.unsqueeze(1) if weights.ndim == 1 else weights


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
    v.check_loss_arguments(
        reduction, label_smoothing, logits=logits, labels=labels, weights=weights, pos_weight=pos_weight
    )
    v.check_floating("logits", logits)
    v.check_same_shape("labels", labels, logits.shape, "logits")
    if weights is not None:
        v.check_broadcasts_to("weights", weights, logits.shape, "logits")
    if pos_weight is not None:
        v.check_broadcasts_to("pos_weight", pos_weight, logits.shape, "logits")
        v.check_no_grad("pos_weight", pos_weight, "it is a constant of the loss (torch does not differentiate it).")
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


def _check_cross_entropy_shapes(logits: torch.Tensor, labels: torch.Tensor) -> torch.Size:
    """Check labels against logits; return the shape of one loss per sample (logits less the class dim)."""
    v.check_floating("logits", logits)
    if logits.ndim == 0:
        raise ValueError("Expected `logits` to have a class dimension, got a scalar.")
    class_dim = 0 if logits.ndim == 1 else 1
    sample_shape = logits.shape[:class_dim] + logits.shape[class_dim + 1 :]
    if labels.is_floating_point():
        if labels.shape != logits.shape:
            raise ValueError(
                "Expected probability `labels` (floating point) to have the shape of `logits` "
                f"{tuple(logits.shape)}, got {tuple(labels.shape)}."
            )
    elif labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(
            f"Expected `labels` to be integer class indices or floating point probabilities, got dtype {labels.dtype}."
        )
    elif labels.shape != sample_shape:
        raise ValueError(
            f"Expected class-index `labels` (integer) of shape {tuple(sample_shape)} for `logits` of shape "
            f"{tuple(logits.shape)} (classes in dimension {class_dim}), got {tuple(labels.shape)}."
        )
    return sample_shape


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
    v.check_loss_arguments(
        reduction, label_smoothing, logits=logits, labels=labels, weights=weights, class_weight=class_weight
    )
    ignore_index = v.check_int("ignore_index", ignore_index)
    v.check_no_grad("class_weight", class_weight, "it is a constant of the loss (torch does not differentiate it).")
    sample_shape = _check_cross_entropy_shapes(logits, labels)
    num_classes = logits.shape[0 if logits.ndim == 1 else 1]
    if class_weight is not None and class_weight.shape != (num_classes,):
        raise ValueError(
            f"Expected class `weight` of length {num_classes} (the class count of `logits` "
            f"{tuple(logits.shape)}), got shape {tuple(class_weight.shape)}."
        )
    if weights is not None and weights.shape != sample_shape:
        raise ValueError(
            f"Expected `weights` to have the shape of one loss per sample {tuple(sample_shape)} "
            f"(`logits` {tuple(logits.shape)} without the class dimension), got {tuple(weights.shape)}."
        )
    dtype = compute_dtype(logits.dtype)
    logits = logits.to(dtype)
    # torch takes int64 (or uint8) class indices only; every other integer dtype is converted.
    labels = labels.to(dtype) if labels.is_floating_point() else _as_dtype(labels, torch.long)
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


def check_multi_task_inputs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    num_tasks: int,
    num_class_dims: int,
) -> None:
    """Check the shapes of a multi-task batch: logits ``[B, T]`` (or ``[B, T, C]``), the rest ``[B, T]``.

    Every argument must be a tensor of real numbers. Labels and weights are constants: the
    gradient of a multi-task loss covers the logits only, so one that requires grad is an error.
    """
    v.check_real_tensors(logits=logits, labels=labels, weights=weights, mask=mask)
    v.check_floating("logits", logits)
    expected_ndim = 2 + num_class_dims
    layout = "[B, T]" if num_class_dims == 0 else "[B, T, C]"
    if logits.ndim != expected_ndim:
        raise ValueError(f"Expected `logits` of shape {layout}, got {tuple(logits.shape)}.")
    if logits.shape[1] != num_tasks:
        raise ValueError(
            f"Expected `logits` to have {num_tasks} tasks in dimension 1 (one per task name), "
            f"got {logits.shape[1]} (shape {tuple(logits.shape)})."
        )
    block = logits.shape[:2]
    if num_class_dims:
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"Expected cross-entropy `labels` to be integer class indices, got dtype {labels.dtype}.")
        if labels.shape != block:
            raise ValueError(
                f"Expected `labels` of shape [B, T] {tuple(block)} (the logits {tuple(logits.shape)} without "
                f"their class dimension), got {tuple(labels.shape)}."
            )
    else:
        v.check_same_shape("labels", labels, block, "logits")
    check_weights_and_mask(logits, labels, weights, mask, block, "logits" if not num_class_dims else "labels")


def check_weights_and_mask(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    block: torch.Size,
    mask_like: str,
) -> None:
    """The checks every multi-task layout shares once its ``[B, T]`` label block is known.

    Labels and weights must not require grad, weights are ``[B, T]`` or ``[B]``, the mask is a bool
    ``[B, T]`` (shaped like the argument ``mask_like``), and everything sits on the logits' device.
    """
    # The fused BCE gradient covers the logits only; one rule for every kind: no silently missing gradient.
    for name, tensor in (("labels", labels), ("weights", weights)):
        v.check_no_grad(name, tensor, "MultiTaskLoss differentiates with respect to `logits` only.")
    # Two comparisons, not `in`: torch.compile, once it made the sizes dynamic, found equal shapes
    # unequal through `in` (a second MultiTaskLoss compiled after one with other logits).
    if weights is not None and weights.shape != block and weights.shape != block[:1]:
        raise ValueError(
            f"Expected `weights` of shape [B, T] {tuple(block)} or [B] {tuple(block[:1])}, got {tuple(weights.shape)}."
        )
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"Expected `mask` to be a bool tensor, got dtype {mask.dtype}.")
        v.check_same_shape("mask", mask, block, mask_like)
    # Free, and torch's own error for a CPU label beside CUDA logits names no argument.
    v.check_same_device(logits, labels=labels, weights=weights, mask=mask)


def _check_multi_task_call(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    num_class_dims: int,
    scale: Union[float, torch.Tensor, None] = None,
    **task_vectors: Optional[torch.Tensor],
) -> None:
    """The argument checks of a public multi-task function: the batch, then its ``(T)`` vectors."""
    v.check_tensor("logits", logits)
    num_tasks = logits.shape[1] if logits.ndim >= 2 else 0
    check_multi_task_inputs(logits, labels, weights, mask, num_tasks, num_class_dims)
    if isinstance(scale, torch.Tensor) and scale.ndim:  # a 0-dim scale (as torch.jit.trace makes) is one number
        task_vectors["scale"] = scale
    for name, vector in task_vectors.items():
        v.check_task_vector(name, vector, num_tasks)


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
    _check_multi_task_call(
        logits, labels, weights, mask, 0, scale, pos_weight=pos_weight, task_weight=task_weight, **options
    )
    return unchecked_multi_task_bce(logits, labels, pos_weight, weights, mask, scale, task_weight, factor, **options)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`multi_task_bce` without its argument checks: for a caller that checked them once (the modules)."""
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
        task_weight = _as_dtype(task_weight, dtype)
        total = task_losses.new_zeros(()) if factor is None else (task_losses * task_weight).sum() * factor
        return task_losses, total
    y, w = _as_dtype(labels, dtype), None if weights is None else _as_block(weights, dtype)
    positive, focal = _as_dtype(pos_weight, dtype), None
    # Tested here, not inside the helpers: plain BCE, the common case, then pays no call for them.
    if label_smoothing is not None or neg_sampling_rate is not None:
        y, w = _binary_targets(y, w, label_smoothing, neg_sampling_rate)
    if focal_gamma is not None or focal_alpha is not None:
        positive, focal = _focal_factors(positive, focal_gamma, focal_alpha)
    result: tuple[torch.Tensor, torch.Tensor] = MultiTaskBCE.apply(  # type: ignore[no-untyped-call]
        _as_dtype(logits, dtype), y, w, mask, positive, scale, _as_dtype(task_weight, dtype), factor, focal
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
    _check_multi_task_call(logits, labels, weights, mask, 1, label_smoothing=label_smoothing, num_classes=num_classes)
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
        labels = _as_dtype(labels, torch.long)
    labelled = labels != IGNORE_INDEX
    if mask is not None:
        labelled = labelled & mask
    safe_labels = _as_dtype(torch.where(labelled, labels, 0), torch.long)
    # Class-major [C, B, T]: on the CPU a softmax over the outermost dimension runs vectorized over
    # B * T, several times faster than over a short last dimension (5x for 3 classes). The copy is
    # ours, so unlabelled entries are overwritten in place (NaN and inf included), before the math.
    x = _as_dtype(logits, dtype).permute(2, 0, 1).clone(memory_format=torch.contiguous_format)
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
        elements = elements * torch.where(labelled, _as_block(weights, dtype), 0.0)
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
    _check_multi_task_call(logits, labels, weights, mask, 0, pos_weight=pos_weight, **options)
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
    dtype = compute_dtype(logits.dtype)
    x, y = _as_dtype(logits, dtype), _as_dtype(labels, dtype)
    w = None if weights is None else _as_block(weights, dtype)
    if mask is not None:
        x, y = torch.where(mask, x, 0.0), torch.where(mask, y, 0.0)
        # A zero weight removes the entry's loss and gradient; the replaced inputs keep both finite.
        w = _as_dtype(mask, dtype) if w is None else torch.where(mask, w, 0.0)
    y, w = _binary_targets(y, w, label_smoothing, neg_sampling_rate)
    positive, focal = _focal_factors(_as_dtype(pos_weight, dtype), focal_gamma, focal_alpha)
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
    _check_multi_task_call(logits, labels, weights, mask, 0)
    return unchecked_multi_task_squared_error(logits, labels, weights, mask)


def unchecked_multi_task_squared_error(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`multi_task_squared_error` without its argument checks."""
    dtype = compute_dtype(logits.dtype)
    x, y = _as_dtype(logits, dtype), _as_dtype(labels, dtype)
    w = None if weights is None else _as_block(weights, dtype)
    if mask is not None:
        x, y = torch.where(mask, x, 0.0), torch.where(mask, y, 0.0)
        w = _as_dtype(mask, dtype) if w is None else torch.where(mask, w, 0.0)
    losses = (x - y).square().mul(0.5)
    return losses if w is None else losses * w


def task_counts(
    mask: Optional[torch.Tensor], batch: int, num_tasks: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """How many entries of each task are labelled: ``mask.sum(0)``, or the batch size without a mask."""
    if mask is None:
        return torch.full((num_tasks,), float(batch), dtype=dtype, device=device)
    # Summing the mask as floats: a bool reduction over rows is many times slower on the CPU.
    # Counts stay exact integers in float32 up to 2**24 rows.
    return column_sums(mask.to(dtype))


GlobalReduction = Literal["mean", "sum", "min", "max", "median"]


def _check_reduce_tasks(task_losses: torch.Tensor, task_weight: torch.Tensor, reduction: str) -> None:
    v.check_choice("reduction", reduction, get_args(GlobalReduction))
    v.check_floating("task_losses", v.check_tensor("task_losses", task_losses))
    if task_losses.ndim not in (1, 2):
        raise ValueError(f"Expected `task_losses` of shape (T) or (T, B), got {tuple(task_losses.shape)}.")
    v.check_task_vector("task_weight", task_weight, task_losses.shape[0])


def reduce_tasks(task_losses: torch.Tensor, task_weight: torch.Tensor, reduction: GlobalReduction) -> torch.Tensor:
    """Scale the per-task losses by ``task_weight`` and reduce them to one value.

    ``task_losses`` is ``(T)``, or ``(T, B)`` for element losses, which are reduced over every
    entry as the ancestor reduced its stacked ``[B]`` task losses. ``median`` of an even count is
    the lower of the two middle values, as :func:`torch.median`. No entries (``(T, 0)``) give 0.

    Example:
        >>> reduce_tasks(torch.tensor([1.0, 2.0, 6.0]), torch.tensor([1.0, 1.0, 0.5]), "max")
        tensor(3.)
    """
    _check_reduce_tasks(task_losses, task_weight, reduction)
    if task_losses.ndim == 2:
        task_weight = task_weight.unsqueeze(1)
    weighted = task_losses * task_weight.to(task_losses.dtype)
    if reduction == "sum" or weighted.numel() == 0:
        return weighted.sum()
    if reduction == "mean":
        return weighted.mean()
    if reduction == "min":
        return weighted.min()
    if reduction == "max":
        return weighted.max()
    return weighted.median()
