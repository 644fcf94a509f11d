"""The ancestor's public functions, same signatures, built on this library's modules.

See ``docs/migrating.rst`` for what each kept and what it fixes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal, Optional, Union

import torch

from losses import _validation as v
from losses import distributed
from losses.bce import BCEWithLogitsLoss
from losses.cross_entropy import CrossEntropyLoss
from losses.functional import GlobalReduction, Reduction, compute_dtype
from losses.loss_type import LossType, parse_loss_type
from losses.multi_task import MultiTaskLoss, TaskReduction, warn_unless_mean


def build_loss(
    loss_type: Union[LossType, str], reduction: Reduction = "mean"
) -> Union[BCEWithLogitsLoss, CrossEntropyLoss]:
    """Return the single-task loss module for ``loss_type``, called as ``loss(logits, labels)``.

    Both loss types work (the ancestor mapped only BCE and raised ``KeyError`` for cross-entropy).
    A reduction other than ``mean`` warns, as the ancestor did.

    Example:
        >>> loss = build_loss(LossType.CROSS_ENTROPY)
        >>> loss(torch.zeros(2, 4), torch.tensor([0, 3]))
        tensor(1.3863)
    """
    kind = parse_loss_type(loss_type)
    v.check_choice("reduction", reduction, v.ELEMENT_REDUCTIONS)
    warn_unless_mean("reduction", reduction)
    if kind is LossType.BCE_WITH_LOGITS:
        return BCEWithLogitsLoss(reduction=reduction)
    return CrossEntropyLoss(reduction=reduction)


def build_multi_task_loss(
    loss_type: Union[LossType, str],
    tasks: Sequence[str],
    task_loss_reduction: TaskReduction = "mean",
    global_reduction: GlobalReduction = "mean",
    pos_weights: Optional[v.TensorLike] = None,
) -> MultiTaskLoss:
    """Return a :class:`~losses.MultiTaskLoss`, called as ``loss(logits, labels, weights)``.

    Gives the ancestor's keys and values (``"loss/<task>"`` per task, then ``"loss"``) for every
    reduction pair; ``pos_weights`` become a buffer instead of being rebuilt on the CPU per call.

    Example:
        >>> loss = build_multi_task_loss(LossType.BCE_WITH_LOGITS, ["fav", "reply"], pos_weights=[1.0, 2.0])
        >>> out = loss(torch.zeros(2, 2), torch.tensor([[0, 1], [1, 0]]), torch.ones(2, 2))
        >>> {name: round(value.item(), 4) for name, value in out.items()}
        {'loss/fav': 0.6931, 'loss/reply': 1.0397, 'loss': 0.8664}
    """
    return MultiTaskLoss(
        tasks,
        loss_type=loss_type,
        pos_weights=pos_weights,
        task_loss_reduction=task_loss_reduction,
        global_reduction=global_reduction,
    )


def get_global_loss_detached(
    local_loss: torch.Tensor,
    reduction: Literal["mean", "sum"] = "mean",
    process_group: Optional[distributed.ProcessGroup] = None,
) -> torch.Tensor:
    r"""Reduce a detached copy of ``local_loss`` over the ranks of ``process_group``, for logging.

    .. math::
        L_{\text{mean}} = \sum_{r=1}^{W} \frac{L_r}{W}, \qquad L_{\text{sum}} = \sum_{r=1}^{W} L_r

    over the :math:`W` ranks of ``process_group`` (default ``None``: every rank): ``mean``
    averages the ranks' values, ``sum`` adds them. The result is a new tensor: the caller's loss
    (and its graph) is never touched, unlike the ancestor's in-place divide. ``mean`` divides each
    rank's value before summing, so it overflows only where the mean itself would; float16 and
    bfloat16 losses are reduced in float32 and **returned in float32** (two float16 losses of
    40000 average to 40000, where a float16 sum would be ``inf``); integer and bool losses, for
    both reductions, in the default floating dtype (float32): two uint8 losses of 200 sum to 400,
    two ``True`` to 2. A complex loss is a ``TypeError``. Without a process group the world size is
    1 and the value comes back as it is (converted as above). A reduction other than ``mean`` warns
    that DDP averages gradients, so the logged value no longer matches them.

    Args:
        local_loss: this rank's loss, any shape.
        reduction: ``"mean"`` | ``"sum"``. Default: ``"mean"``.
        process_group: the group to reduce over, as given to DDP; only its ranks may call this
            (another rank gets a ``ValueError``). Default: ``None``, every rank.

    Example:
        >>> loss = torch.tensor(0.25, requires_grad=True)
        >>> get_global_loss_detached(loss)
        tensor(0.2500)
    """
    v.check_real_tensors(local_loss=local_loss)
    v.check_choice("reduction", reduction, ("mean", "sum"))
    distributed.check_group("process_group", process_group)
    if reduction != "mean":
        warnings.warn(
            f"`reduction={reduction!r}`: DDP averages gradients over ranks, so a global loss reduced "
            "with anything but 'mean' does not match the loss DDP optimizes unless you changed DDP to match.",
            UserWarning,
            stacklevel=2,
        )
    loss = local_loss.detach()
    # Integer and bool losses too are reduced in floating point: an integer sum wraps around and a
    # bool all_reduce is a logical or.
    loss = loss.to(compute_dtype(loss.dtype) if loss.is_floating_point() else torch.get_default_dtype())
    if reduction == "mean":
        # Out of place: the caller's tensor is never written to.
        loss = loss / distributed.world_size(process_group)
    return distributed.all_reduce_sum(loss, process_group)
