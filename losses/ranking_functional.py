r"""Ranking-metric math: the per-task weighted sums of a ``[B, T]`` block, and the ratios they give.

Two tables drive everything, so a new metric is one more row, not a branch:

- :data:`SUM_ROWS`: each row is one weighted sum per task, built from three element quantities
  of a labelled entry: the logit :math:`x`, the positive mass :math:`u = w y` and the effective
  weight :math:`s = u + w (1 - y) / r` (negatives count :math:`1 / r`, the rate at which they were
  kept when the data were down-sampled). :func:`ranking_sums` returns them as one ``[K, T]``
  float64 tensor, rows in table order.
- :data:`RESULTS`: each row is one metric per task, a ratio of those sums.

The AUC histograms (:class:`AucBins`, :func:`auc_values`, :func:`auc_error_bound`) and the grouped
sums of gauc and NDCG (:func:`grouped_sums`, :func:`grouped_values`) live in their own modules and
are importable from here.

:class:`~losses.MultiTaskRankingMetrics` holds the sums as float64 states; these functions are its
functional twins, also usable on their own. Nothing here is differentiable: inputs are detached.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from losses._auc import AucBins, auc_error_bound, auc_values
from losses._grouped import grouped_sums, grouped_values
from losses.functional import check_multi_task_inputs

__all__ = [
    "RESULTS",
    "SUM_ROWS",
    "AucBins",
    "Elements",
    "auc_error_bound",
    "auc_values",
    "elements",
    "grouped_sums",
    "grouped_values",
    "ranking_compute",
    "ranking_sums",
    "ranking_values",
    "result_keys",
    "sums_of_elements",
    "unchecked_ranking_sums",
    "undefined_message",
]


class Elements(NamedTuple):
    """What the sum rows are built from, per ``[B, T]`` entry; zero wherever the mask is false."""

    logits: torch.Tensor  #: x, the logit
    weight: torch.Tensor  #: s, the effective weight: positive mass plus negative mass over the rate
    positive: torch.Tensor  #: u, the positive mass w * y
    sample_weight: Optional[torch.Tensor]  #: w, zero where unlabelled; None when every entry weighs 1


def _prediction(e: Elements) -> torch.Tensor:
    return torch.sigmoid(e.logits).mul_(e.weight)


def _cross_entropy(e: Elements) -> torch.Tensor:
    # u softplus(-x) + (s - u) softplus(x) = s softplus(x) - u x: one softplus, computed as
    # log1p(exp(x)), accurate where most entries of a ranking task sit (negatives, x < 0), and
    # finite for every finite logit. No probability is clipped.
    return F.softplus(e.logits).mul_(e.weight).addcmul_(e.positive, e.logits, value=-1)


#: The weighted sums per task, in the row order of :func:`ranking_sums`.
SUM_ROWS: dict[str, Callable[[Elements], torch.Tensor]] = {
    "weight": lambda e: e.weight,  # sum s
    "positive": lambda e: e.positive,  # sum u
    "prediction": _prediction,  # sum s sigmoid(x)
    "cross_entropy": _cross_entropy,  # sum s ce(x, y)
}

Sums = Mapping[str, torch.Tensor]


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` where the denominator is positive, NaN elsewhere (never inf)."""
    return torch.where(denominator > 0, numerator / denominator, math.nan)


def _logloss(s: Sums) -> torch.Tensor:
    return _ratio(s["cross_entropy"], s["weight"])


def _ctr(s: Sums) -> torch.Tensor:
    return _ratio(s["positive"], s["weight"])


def _label_entropy(s: Sums) -> torch.Tensor:
    """H(ctr) = -(q log q + (1 - q) log(1 - q)); 1 - q taken from the negative mass, not from 1 - q."""
    q = _ctr(s)
    not_q = _ratio(s["weight"] - s["positive"], s["weight"])
    return -(torch.xlogy(q, q) + torch.xlogy(not_q, not_q))


def _ne(s: Sums) -> torch.Tensor:
    return _ratio(_logloss(s), _label_entropy(s))


#: The metrics per task, each a ratio of :data:`SUM_ROWS`; NaN where it is undefined.
RESULTS: dict[str, Callable[[Sums], torch.Tensor]] = {
    "ne": _ne,
    "rce": lambda s: 100.0 * (1.0 - _ne(s)),
    "logloss": _logloss,
    "calibration": lambda s: _ratio(s["prediction"], s["positive"]),
    "ctr": _ctr,
}

_KEEP_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}

# Row groups of this size are summed in the compute dtype, the group sums in float64.
_ROW_GROUP = 256


def _column_sums64(block: torch.Tensor) -> torch.Tensor:
    """Float64 column sums of a ``[B, T]`` block (which may be an expanded view).

    Casting the whole block to float64 first costs more than the rest of an update; summing
    groups of 256 rows in the block's own dtype (torch's pairwise sum, error about one rounding of
    that dtype) and only the ``[B / 256, T]`` group sums in float64 costs nothing extra, and no
    error grows with the number of rows or of updates.
    """
    rows, columns = block.shape
    head = rows - rows % _ROW_GROUP
    sums = block[:head].reshape(-1, _ROW_GROUP, columns).sum(1).sum(0, dtype=torch.float64)
    if head < rows:
        sums += block[head:].sum(0, dtype=torch.float64)
    return sums


def _zero_unlabelled(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``tensor`` where ``keep`` is all ones, +0.0 where it is zero, whatever the entry holds (NaN too).

    The same as ``torch.where(mask, tensor, 0)``, through the bits: on the CPU ``where`` on a bool
    mask costs more than ten multiplies, a bitwise and about one. A multiply by the mask would not
    do: NaN * 0 is NaN.
    """
    return tensor.view(keep.dtype).bitwise_and(keep).view(tensor.dtype)


def elements(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    neg_sampling_rates: Optional[torch.Tensor] = None,
) -> Elements:
    """The element quantities of a block whose shapes were checked; logits float32 or float64."""
    dtype = logits.dtype
    shape = logits.shape
    y = labels.detach().to(dtype)
    w = None if weights is None else weights.detach().to(dtype)
    if w is not None and w.ndim == 1:
        w = w.unsqueeze(1)
    x = logits.detach()
    if mask is not None:
        keep = mask.to(_KEEP_BITS[dtype]).neg_()  # all bits set where labelled
        x = _zero_unlabelled(x, keep)
        y = _zero_unlabelled(y, keep)
        w = mask.to(dtype) if w is None else _zero_unlabelled(w, keep)
    positive = y if w is None else y * w
    if neg_sampling_rates is None:
        weight = torch.ones((), dtype=dtype, device=x.device).expand(shape) if w is None else w.expand(shape)
    else:
        inverse_rates = neg_sampling_rates.detach().to(device=x.device, dtype=dtype).reciprocal()
        negative = (1.0 - y) if w is None else w - positive
        weight = negative.mul_(inverse_rates).add_(positive)
    return Elements(x, weight, positive, w)


def unchecked_ranking_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    neg_sampling_rates: Optional[torch.Tensor],
) -> torch.Tensor:
    """:func:`ranking_sums` without its checks, for callers that made them."""
    if logits.dtype != torch.float64:
        logits = logits.to(torch.float32)
    return sums_of_elements(elements(logits, labels, weights, mask, neg_sampling_rates))


def sums_of_elements(e: Elements) -> torch.Tensor:
    """The ``(K, T)`` float64 rows of :data:`SUM_ROWS` from a block's element quantities."""
    return torch.stack([_column_sums64(row(e)) for row in SUM_ROWS.values()])


def check_sampling_rates(rates: torch.Tensor, num_tasks: int) -> None:
    """Shape check of a ``neg_sampling_rates`` tensor: ``(T)``."""
    if rates.shape != (num_tasks,):
        raise ValueError(
            f"Expected `neg_sampling_rates` of shape ({num_tasks},), one rate per task, got {tuple(rates.shape)}."
        )


def ranking_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    neg_sampling_rates: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""The weighted sums of :data:`SUM_ROWS` per task of one ``[B, T]`` block, in one pass.

    With :math:`m` the mask, :math:`w` the weights and :math:`r_t` the rate at which task
    :math:`t`'s negatives were kept, each labelled entry has the positive mass
    :math:`u = w y`, the effective weight :math:`s = u + w (1 - y) / r_t` and

    .. math::
        \begin{aligned}
        S^{\text{weight}}_t &= \textstyle\sum_b m_{bt}\, s_{bt}, &
        S^{\text{positive}}_t &= \textstyle\sum_b m_{bt}\, u_{bt}, \\
        S^{\text{prediction}}_t &= \textstyle\sum_b m_{bt}\, s_{bt}\, \sigma(x_{bt}), &
        S^{\text{cross\_entropy}}_t &= \textstyle\sum_b m_{bt}
            \left[ s_{bt} \log(1 + e^{x_{bt}}) - u_{bt}\, x_{bt} \right].
        \end{aligned}

    The last bracket is :math:`u \log(1 + e^{-x}) + (s - u) \log(1 + e^{x})`, the weighted
    binary cross-entropy of the logit, finite for every finite logit (no probability is clipped).
    Entries where ``mask`` is false add nothing, whatever they hold (NaN included).

    Terms are computed in the logits' precision (float32 for half precision), summed in groups of
    256 rows in that precision and in float64 across groups; the result is float64.

    Shape:
        - logits: ``(B, T)``, floating point.
        - labels: ``(B, T)``; float, int or bool.
        - weights: ``(B, T)`` or ``(B)``; mask: bool ``(B, T)``, true where a label exists.
        - neg_sampling_rates: ``(T)``, each in (0, 1].
        - output: ``(K, T)`` float64, ``K = len(SUM_ROWS)``.

    Example:
        >>> logits = torch.tensor([[0.0], [2.0], [-1.0]])
        >>> labels = torch.tensor([[1], [0], [0]])
        >>> ranking_sums(logits, labels, neg_sampling_rates=torch.tensor([0.5]))
        tensor([[5.0000],
                [1.0000],
                [2.7995],
                [5.5735]], dtype=torch.float64)
    """
    if logits.ndim != 2:
        raise ValueError(f"Expected `logits` of shape [B, T], got {tuple(logits.shape)}.")
    check_multi_task_inputs(
        logits, labels.detach(), None if weights is None else weights.detach(), mask, logits.shape[1], 0
    )
    if neg_sampling_rates is not None:
        check_sampling_rates(neg_sampling_rates, logits.shape[1])
    return unchecked_ranking_sums(logits, labels, weights, mask, neg_sampling_rates)


def undefined_message(sums: torch.Tensor, tasks: Sequence[str]) -> Optional[str]:
    """Why some metrics of some tasks are NaN, or ``None`` if all are defined (reads the sums).

    ``None`` for sums on the meta device, which hold no values to read.
    """
    if sums.is_meta:
        return None
    rows = dict(zip(SUM_ROWS, sums.unbind(0), strict=True))
    empty = rows["weight"] <= 0
    one_class = ~empty & ((rows["positive"] <= 0) | (rows["positive"] >= rows["weight"]))
    parts = []
    for flags, reason in ((empty, "no labelled weight"), (one_class, "labels all of one class")):
        named = [task for task, flag in zip(tasks, flags.tolist(), strict=True) if flag]
        if named:
            parts.append(f"{reason} for {named}")
    return "; ".join(parts) if parts else None


def _check_sums(sums: torch.Tensor, num_tasks: Optional[int] = None) -> None:
    tasks = sums.shape[-1] if num_tasks is None and sums.ndim else num_tasks
    if sums.ndim != 2 or tuple(sums.shape) != (len(SUM_ROWS), tasks):
        raise ValueError(
            f"Expected `sums` of shape ({len(SUM_ROWS)}, {'T' if tasks is None else tasks}) (sum rows, tasks), "
            f"got {tuple(sums.shape)}."
        )


def ranking_values(sums: torch.Tensor) -> torch.Tensor:
    r"""Every metric of :data:`RESULTS` for every task, as one ``(M, T)`` tensor in table order.

    The values of :func:`ranking_compute` without the dict: row ``m`` is the metric ``m`` of
    :data:`RESULTS` for every task, NaN where it is undefined. It reads no value on the host and
    does not warn. Flattened, its rows give the values of :func:`ranking_compute` in key order.

    Shape:
        - sums: ``(K, T)``, the rows of :data:`SUM_ROWS`.
        - output: ``(M, T)`` in the dtype of ``sums``, ``M = len(RESULTS)``.

    Example:
        >>> sums = ranking_sums(torch.tensor([[0.0], [2.0], [-1.0]]), torch.tensor([[1], [0], [0]]))
        >>> ranking_values(sums)
        tensor([[  1.6409],
                [-64.0884],
                [  1.0444],
                [  1.6497],
                [  0.3333]], dtype=torch.float64)
    """
    _check_sums(sums)
    rows = dict(zip(SUM_ROWS, sums.unbind(0), strict=True))
    return torch.stack([metric(rows) for metric in RESULTS.values()])


def result_keys(tasks: Sequence[str], prefix: str = "") -> list[str]:
    """The keys of :func:`ranking_compute`, ``"<prefix><metric>/<task>"``, metric-major."""
    return [f"{prefix}{name}/{task}" for name in RESULTS for task in tasks]


def ranking_compute(
    sums: torch.Tensor, tasks: Sequence[str], prefix: str = "", warn: bool = True
) -> dict[str, torch.Tensor]:
    r"""Every metric of :data:`RESULTS` for every task, from the sums of :func:`ranking_sums`.

    .. math::
        \text{logloss} = \frac{S^{\text{cross\_entropy}}}{S^{\text{weight}}}, \quad
        \text{ctr} = \frac{S^{\text{positive}}}{S^{\text{weight}}}, \quad
        \text{ne} = \frac{\text{logloss}}{H(\text{ctr})}, \quad
        \text{rce} = 100\,(1 - \text{ne}), \quad
        \text{calibration} = \frac{S^{\text{prediction}}}{S^{\text{positive}}}

    with :math:`H(q) = -q \log q - (1 - q) \log (1 - q)`. A task without labelled weight gives NaN
    for all five; a task whose labels are all one class gives NaN for ``ne`` and ``rce`` (and for
    ``calibration`` if it has no positive). One ``UserWarning`` names those tasks; nothing raises
    and nothing is inf.

    Args:
        sums: ``(K, T)``, the rows of :data:`SUM_ROWS`, summed over any number of blocks.
        tasks: the ``T`` task names.
        prefix: put before every key, e.g. ``"window_"``. Default: ``""``.
        warn: warn about undefined metrics (this reads the sums on the host). Default: ``True``.

    Returns:
        ``{"<metric>/<task>": float64 scalar}``, metric-major in the order of :data:`RESULTS`.

    Example:
        >>> sums = ranking_sums(torch.tensor([[0.0], [2.0], [-1.0]]), torch.tensor([[1], [0], [0]]))
        >>> for key, value in ranking_compute(sums, ["click"]).items():
        ...     print(f"{key:<18}{value.item():8.4f}")
        ne/click            1.6409
        rce/click         -64.0884
        logloss/click       1.0444
        calibration/click   1.6497
        ctr/click           0.3333
    """
    _check_sums(sums, len(tasks))
    reason = undefined_message(sums, tasks) if warn else None
    if reason is not None:
        warnings.warn(f"Ranking metrics undefined, returned as NaN: {reason}.", UserWarning, stacklevel=2)
    return dict(zip(result_keys(tasks, prefix), ranking_values(sums).reshape(-1).unbind(), strict=True))
