r"""ROC AUC and PR-AUC per task from fixed-bin weighted histograms of the logits: constant memory, exact sums.

The bin rule. ``N`` bins of width :math:`h = 16 / (N - 1)` in logit, centred on
:math:`-12, -12 + h, \dots, 4`: the logits of click-through-rate tasks (mostly -10 to 2) with a
margin of 2 on each side, probabilities from :math:`6 \cdot 10^{-6}` to 0.982; the two end bins
also take every logit beyond them (and a NaN logit counts in the lowest bin). A logit :math:`x`
goes into bin :math:`\lfloor (\min(\max(x, -12), 4) + 12) / h + 1/2 \rfloor`. The margin
matters for PR-AUC, which is decided by the few highest logits: with the top bin at 2, the 0.1%
of logits above it shared one threshold, and PR-AUC moved by 2e-3 on the issue's data. The edges depend on ``N`` alone,
so they are the same on every rank and in every checkpoint.

The label rule, as for NE: an entry of label :math:`y \in [0, 1]` and weight :math:`w` adds
:math:`w y` to its bin of the positive histogram :math:`P` and :math:`w (1 - y) / r` (``r`` its
task's negative sampling rate) to the negative histogram :math:`Q`: binary labels as they are, a
probability as a positive and a negative of those weights (which tie with each other);
unlabelled entries add nothing.

From the histograms, with :math:`Q_{<b}` the negative mass of the bins below ``b``, ties within a
bin counting half, and precision at bin ``b`` the positive share of the mass at or above it:

.. math::
    \text{auc} = \frac{\sum_b P_b \,(Q_{<b} + Q_b / 2)}{\sum P \sum Q}, \qquad
    \text{pr\_auc} = \sum_b \frac{P_b}{\sum P}\,\frac{P_{\ge b}}{P_{\ge b} + Q_{\ge b}}.

The exact AUC orders the pairs inside a bin by their logits instead of counting them half, so
:math:`|\text{auc} - \text{exact}| \le \frac{1}{2} \sum_b P_b Q_b / (\sum P \sum Q)`, which
:func:`auc_error_bound` returns; for logits of densities :math:`f_+, f_-` within the dense range
it is about :math:`\frac{h}{2} \int f_+ f_-`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch

#: The centres of the end bins; beyond them the end bins take everything.
DENSE_RANGE = (-12.0, 4.0)
#: The names of the values :func:`auc_values` gives, one row each.
AUC_RESULTS = ("auc", "pr_auc")


class AucBins:
    """The fixed bins of ``auc_bins=N`` for ``T`` tasks: which bin of which histogram an entry goes to."""

    def __init__(self, bins: int, num_tasks: int) -> None:
        self.bins = bins
        self.num_tasks = num_tasks
        self.width = (DENSE_RANGE[1] - DENSE_RANGE[0]) / (bins - 1)
        # The index (class * T + task) * N + bin is computed in floating point; float32 holds it
        # exactly while it stays below 2**24.
        self.index_dtype = torch.float32 if 2 * num_tasks * bins <= 2**24 else torch.float64
        self._offsets: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape of the histograms: ``(2, T, N)``, negatives first, then positives."""
        return (2, self.num_tasks, self.bins)

    def centres(self) -> torch.Tensor:
        """The centre of every bin in logit, float64 (the end bins reach beyond theirs)."""
        return torch.linspace(DENSE_RANGE[0], DENSE_RANGE[1], self.bins, dtype=torch.float64)

    def _offset(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        # Per task: t * N + 12 / h + 1/2, so that truncating gives the flat index of the bin.
        key = (device, dtype)
        if key not in self._offsets:
            shift = -DENSE_RANGE[0] / self.width + 0.5
            self._offsets[key] = (torch.arange(self.num_tasks, dtype=torch.float64) * self.bins + shift).to(
                device=device, dtype=dtype
            )
        return self._offsets[key]

    def histograms(self, logits: torch.Tensor, positive: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The ``(2, T, N)`` float64 histograms of one ``[B, T]`` block.

        ``positive`` is each entry's positive mass, ``weight`` its whole mass (positive plus
        negative; both zero where unlabelled). One clamp and one affine map to the flat (task, bin)
        index, then one scatter-add per mass, no loop over tasks, no value read on the host. Each
        scatter-add goes into two histograms, one per half of the block's rows (an odd last row
        into the first): torch runs the rows of a 2D ``scatter_add_`` in parallel on the CPU,
        where a 1D one runs on one thread. The masses are summed in float32 (float64 for float64
        logits) within each half, then in float64.
        """
        dtype = self.index_dtype if logits.dtype != torch.float64 else torch.float64
        x = torch.nan_to_num(logits.to(dtype), nan=DENSE_RANGE[0]).clamp_(*DENSE_RANGE)
        index = torch.add(self._offset(x.device, dtype), x, alpha=1.0 / self.width, out=x).to(torch.int64)
        mass_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        index = index.reshape(-1)
        half = logits.shape[0] // 2 * self.num_tasks
        counts = torch.zeros(2, 2, self.num_tasks * self.bins, dtype=mass_dtype, device=logits.device)
        for kind, mass in enumerate((weight, positive)):
            flat = mass.to(mass_dtype).expand(logits.shape).reshape(-1)
            counts[kind].scatter_add_(1, index[: 2 * half].view(2, half), flat[: 2 * half].view(2, half))
            counts[kind, 0].scatter_add_(0, index[2 * half :], flat[2 * half :])
        # The halves summed in float64: the whole mass, then the positive mass.
        histograms = torch.sum(counts, 1, dtype=torch.float64)
        # Negative mass: the whole minus the positive, never below zero by rounding.
        histograms[0].sub_(histograms[1]).clamp_(min=0.0)
        return histograms.view(self.shape)


def _split(histograms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    negative, positive = histograms.unbind(-3)
    return positive, negative


def auc_values(histograms: torch.Tensor) -> torch.Tensor:
    """``(2, T)``: the AUC and the PR-AUC of every task from its ``(2, T, N)`` histograms; NaN for one class."""
    positive, negative = _split(histograms)
    total_pos = positive.sum(-1)
    total_neg = negative.sum(-1)
    below = negative.cumsum(-1) - negative  # negative mass of the lower bins
    pairs = (positive * (below + 0.5 * negative)).sum(-1)
    defined = (total_pos > 0) & (total_neg > 0)
    auc = torch.where(defined, pairs / (total_pos * total_neg), math.nan)
    # Mass at or above each bin: the predicted positives when the threshold is that bin.
    pos_above = positive.flip(-1).cumsum(-1).flip(-1)
    all_above = pos_above + negative.flip(-1).cumsum(-1).flip(-1)
    precision = torch.where(all_above > 0, pos_above / all_above, 0.0)
    average_precision = (positive * precision).sum(-1) / total_pos
    pr_auc = torch.where(defined, average_precision, math.nan)
    return torch.stack([auc, pr_auc])


def auc_error_bound(histograms: torch.Tensor) -> torch.Tensor:
    r"""``(T)``: the largest possible :math:`|\text{auc} - \text{exact AUC}|` the bins allow, per task.

    Half the mass of the positive-negative pairs that share a bin, over the mass of all pairs;
    NaN where the AUC is undefined.
    """
    positive, negative = _split(histograms)
    pairs = positive.sum(-1) * negative.sum(-1)
    return torch.where(pairs > 0, 0.5 * (positive * negative).sum(-1) / pairs, math.nan)


def auc_undefined(histograms: torch.Tensor, tasks: Sequence[str]) -> Optional[str]:
    """Which tasks have an undefined AUC (one class only, or nothing labelled), or ``None``."""
    if histograms.is_meta:
        return None
    positive, negative = _split(histograms)
    one_class = (positive.sum(-1) <= 0) | (negative.sum(-1) <= 0)
    named = [task for task, flag in zip(tasks, one_class.tolist(), strict=True) if flag]
    return f"AUC and PR-AUC need positives and negatives, missing for {named}" if named else None
