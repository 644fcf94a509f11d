"""Binary cross-entropy on logits, as a module whose ``pos_weight`` is a buffer."""

from __future__ import annotations

from typing import Optional

import torch

from losses import _validation as v
from losses import functional
from losses._base import _Loss
from losses.functional import Reduction


class BCEWithLogitsLoss(_Loss):
    r"""Creates a criterion that measures the binary cross-entropy between ``sigmoid(logits)`` and ``labels``.

    The unreduced loss of element :math:`i` is

    .. math::
        \ell_i = -w_i \left[ p\, y_i \log \sigma(x_i) + (1 - y_i) \log(1 - \sigma(x_i)) \right]

    where :math:`w` are the per-element ``weights`` of ``forward`` and :math:`p` the ``pos_weight``
    of the element's class (last dimension). With ``label_smoothing`` :math:`\varepsilon` the
    targets become :math:`y (1 - \varepsilon) + \varepsilon / 2`. ``mean`` divides the sum of
    :math:`\ell_i` by the number of elements (weights do not renormalize), ``sum`` adds them up.
    An empty input gives 0 for ``mean`` (where torch gives NaN) and ``sum``, with a zero
    gradient, and an empty tensor for ``none``.

    ``pos_weight`` trades recall for precision: for a class with 100 positive and 300 negative
    examples, ``pos_weight=3`` makes the positives weigh as much as the negatives in the loss.

    Args:
        pos_weight: weight of positive examples, one per class (last dimension of the logits);
            a tensor, a sequence or an array (NumPy included) of non-negative finite numbers.
            Default: ``None`` (all 1).
            Stored as a buffer, so it follows ``.to()`` and is saved in ``state_dict()``; a
            constant, so a tensor that requires grad is a ``ValueError``.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``. Default: ``"mean"``.
        label_smoothing: :math:`\varepsilon \in [0, 1]`. Default: ``0.0``.
        check_inputs: if ``True``, ``forward`` also checks values: finite logits, labels in
            [0, 1], non-negative finite weights. This waits for the device on every call, so it
            is off by default; turn it on to debug a NaN. It is skipped while ``torch.compile``
            traces (a compiled graph cannot branch on values). Default: ``False``.

    ``meta`` logits work without moving the loss (shape inference; value checks are skipped);
    logits on any other device than ``pos_weight`` are a ``ValueError``. Gradients flow to the
    logits, to floating labels and to ``weights`` (which torch's own BCE refuses to
    differentiate). Inputs must be tensors, of real numbers: anything else is a ``TypeError``.
    At infinite logits the loss is torch's, NaN included where the limit is finite (a ``+inf``
    logit with label 1, a ``-inf`` logit with any label).

    Shape:
        - logits: :math:`(*)`, floating point; float16/bfloat16 are computed in float32.
        - labels: :math:`(*)`, float, integer or bool.
        - weights: optional, broadcastable to :math:`(*)`.
        - output: scalar; :math:`(*)` for ``reduction="none"``. float32 for half-precision logits.

    Examples:
        >>> loss = BCEWithLogitsLoss(pos_weight=[3.0, 1.0])
        >>> logits = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
        >>> labels = torch.tensor([[1, 0], [0, 1]])
        >>> loss(logits, labels)
        tensor(1.1389)
    """

    pos_weight: Optional[torch.Tensor]

    def __init__(
        self,
        pos_weight: Optional[v.TensorLike] = None,
        reduction: Reduction = "mean",
        label_smoothing: float = 0.0,
        *,
        check_inputs: bool = False,
    ) -> None:
        super().__init__(reduction, label_smoothing, check_inputs)
        self._register_weight("pos_weight", v.weight_tensor("pos_weight", pos_weight))

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if self.check_inputs:
            v.check_values("logits", logits)
            v.check_values("labels", labels, low=0, high=1)
            if weights is not None:
                v.check_values("weights", weights, low=0)
        return functional.binary_cross_entropy_with_logits(
            logits,
            labels,
            weights=weights,
            pos_weight=v.on_device_of("pos_weight", self.pos_weight, logits),
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )
