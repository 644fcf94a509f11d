"""Softmax cross-entropy as a module whose class ``weight`` is a buffer."""

from __future__ import annotations

from typing import Optional

import torch

from losses import _validation as v
from losses import functional
from losses._base import _Loss
from losses.functional import Reduction


class CrossEntropyLoss(_Loss):
    r"""Creates a criterion that measures the cross-entropy between ``softmax(logits)`` and ``labels``.

    For class-index labels the unreduced loss of sample :math:`i` is

    .. math::
        \ell_i = -s_i\, c_{y_i} \log \frac{\exp(x_{i, y_i})}{\sum_{k=1}^{C} \exp(x_{i, k})}

    with :math:`c` the class ``weight`` and :math:`s` the per-sample ``weights`` of ``forward``
    (:math:`\ell_i = 0` where :math:`y_i` is ``ignore_index``). Probability labels use
    :math:`-\sum_k c_k\, y_{i,k} \log \mathrm{softmax}(x_i)_k`. ``label_smoothing`` mixes the target
    with the uniform distribution, as :class:`torch.nn.CrossEntropyLoss` does.

    ``mean`` divides :math:`\sum_i \ell_i` by torch's denominator: the number of labelled samples,
    or with a class ``weight`` the sum of :math:`c_{y_i}` over them; per-sample weights multiply
    the losses but do not change the denominator (as ``weight`` in BCE). A batch whose labels are
    all ``ignore_index`` gives 0, where torch gives NaN. For probability labels ``mean`` divides by
    the number of samples. An empty batch gives 0 for ``mean`` (torch: NaN) and ``sum``, with a
    zero gradient, and an empty tensor for ``none``.

    Args:
        weight: a weight per class, shape :math:`(C)`, non-negative and finite: a tensor, a
            sequence or an array (NumPy included). Default: ``None``.
            Stored as a buffer; a constant, so a tensor that requires grad is a ``ValueError``.
        ignore_index: a class-index label that contributes neither loss nor gradient. Default: ``-100``.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``. Default: ``"mean"``.
        label_smoothing: :math:`\varepsilon \in [0, 1]`. Default: ``0.0``.
        check_inputs: if ``True``, ``forward`` also checks values: finite logits (an ignored
            sample's too: torch sends NaN backwards from non-finite ones), class indices in
            ``[0, C)`` or ``ignore_index``, probabilities in [0, 1], non-negative finite weights
            (except at ignored samples, where a weight adds nothing whatever it holds). This waits
            for the device on every call, so it is off by default; it is skipped while
            ``torch.compile`` traces. Default: ``False``.

    Class-index labels of any integer dtype are converted to int64. ``meta`` logits work without
    moving the loss (shape inference; value checks are skipped); logits on any other device than
    ``weight`` are a ``ValueError``. Gradients flow to the logits, to probability labels and to
    the per-sample ``weights``. A sample labelled ``ignore_index`` adds nothing whatever its weight
    holds; its logits get a zero gradient when they are finite and NaN when not, as in torch (not
    zeroed: that would cost a pass over the logits). Inputs must be tensors of real numbers.

    Shape:
        - logits: :math:`(C)`, :math:`(N, C)` or :math:`(N, C, d_1, \dots, d_K)`, floating point.
        - labels: class indices (integer) of shape :math:`()`, :math:`(N)` or
          :math:`(N, d_1, \dots, d_K)`, or probabilities (floating) of the shape of ``logits``.
        - weights: optional, the shape of the class-index labels.
        - output: scalar; the shape of the class-index labels for ``reduction="none"``.

    Examples:
        >>> loss = CrossEntropyLoss(weight=[1.0, 2.0, 1.0])
        >>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> loss(logits, torch.tensor([0, 1]))
        tensor(0.4475)
    """

    weight: Optional[torch.Tensor]

    def __init__(
        self,
        weight: Optional[v.TensorLike] = None,
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        label_smoothing: float = 0.0,
        *,
        check_inputs: bool = False,
    ) -> None:
        super().__init__(reduction, label_smoothing, check_inputs)
        self.ignore_index = v.check_int("ignore_index", ignore_index)
        self._register_weight("weight", v.weight_tensor("weight", weight))

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, {super().extra_repr()}"

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if self.check_inputs:
            self._check_values(logits, labels, weights)
        return functional.cross_entropy(
            logits,
            labels,
            weights=weights,
            class_weight=v.on_device_of("weight", self.weight, logits),
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )

    def _check_values(self, logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor]) -> None:
        # Every logit is checked, an ignored sample's too: non-finite logits there would send NaN
        # backwards (as in torch). Its weight is not: it adds nothing, whatever it holds.
        v.check_values("logits", logits)
        labelled = None
        if v.check_tensor("labels", labels).is_floating_point():
            v.check_values("labels", labels, low=0, high=1)
        elif logits.ndim > 0:
            classes = logits.shape[0 if logits.ndim == 1 else 1]
            v.check_values("labels", labels, low=0, high=classes - 1, allowed=self.ignore_index)
            labelled = labels != self.ignore_index
        if weights is not None:
            # A weights tensor of another shape gets its named shape error from the functional.
            matches = labelled is not None and v.check_tensor("weights", weights).shape == labelled.shape
            v.check_values("weights", weights, low=0, where=labelled if matches else None)
