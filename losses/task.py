"""``Task``: what one task of a :class:`~losses.MultiTaskLoss` is, and which options it takes."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, Optional

TaskKind = Literal["binary", "multiclass", "regression"]
RankingKind = Literal["pairwise_logistic", "pairwise_hinge", "softmax", "lambda_ndcg"]

#: The task kinds, in the order a :class:`~losses.MultiTaskLoss` runs their passes.
KINDS: tuple[str, ...] = ("binary", "multiclass", "regression")

#: The ranking terms a binary task may add to its loss (the table of their math is
#: ``losses.ranking_losses.RANKINGS``; this module stays free of torch).
RANKINGS: tuple[str, ...] = ("pairwise_logistic", "pairwise_hinge", "softmax", "lambda_ndcg")

#: The options each kind takes beyond ``name``, ``kind`` and ``weight``; any other option must keep its default.
OPTIONS: dict[str, frozenset[str]] = {
    "binary": frozenset(
        {
            "pos_weight",
            "focal_gamma",
            "focal_alpha",
            "label_smoothing",
            "neg_sampling_rate",
            "ranking",
            "ranking_weight",
            "pointwise_weight",
        }
    ),
    "multiclass": frozenset({"num_classes", "label_smoothing"}),
    "regression": frozenset(),
}

_DEFAULTS: dict[str, Any] = {
    "pos_weight": 1.0,
    "num_classes": None,
    "focal_gamma": 0.0,
    "focal_alpha": None,
    "label_smoothing": 0.0,
    "neg_sampling_rate": 1.0,
    "ranking": None,
    "ranking_weight": 1.0,
    "pointwise_weight": 1.0,
}


@dataclass(frozen=True)
class Task:
    r"""One task of a :class:`~losses.MultiTaskLoss`: its name, its kind and the options of its loss.

    The element loss :math:`\ell(x, y)` of each kind, for logit :math:`x` (or the logits
    :math:`x_{1..C}` of a multi-class task) and label :math:`y`:

    .. math::
        \text{binary:}\quad \ell = -\alpha_1\, p\, y\, (1 - \sigma(x))^{\gamma} \log \sigma(x)
            - \alpha_0 (1 - y)\, \sigma(x)^{\gamma} \log(1 - \sigma(x))

        \text{multiclass:}\quad \ell = -\sum_{c=1}^{C} q_c \log \mathrm{softmax}(x)_c,
            \qquad q_c = (1 - \varepsilon) [c = y] + \varepsilon / C

        \text{regression:}\quad \ell = \tfrac{1}{2} (x - y)^2

    with :math:`p` the ``pos_weight``, :math:`\gamma` the ``focal_gamma``, :math:`(\alpha_1,
    \alpha_0) = (\alpha, 1 - \alpha)` for a ``focal_alpha`` :math:`\alpha` and :math:`(1, 1)`
    without one, and a binary label smoothed to :math:`y (1 - \varepsilon) + \varepsilon / 2`.
    For a hard label this is the focal loss of Lin et al., :math:`-\alpha_t (1 - p_t)^\gamma \log
    p_t`; ``focal_gamma=0`` and ``focal_alpha=None`` give plain binary cross-entropy exactly.
    ``neg_sampling_rate`` :math:`r` multiplies the weight of a binary entry by
    :math:`y + (1 - y) / r`: a negative counts :math:`1 / r` (its importance weight when only a
    share :math:`r` of the negatives was kept), a positive 1.

    Every field is checked at construction; an option a kind does not take, or a value out of
    range, is a ``ValueError`` naming the task and the field (a value of the wrong type, a
    ``TypeError``). Numbers may be Python or NumPy scalars; they are stored as ``float`` (``int``
    for ``num_classes``).

    Args:
        name: the task's name: the result key is ``"loss/<name>"``.
        kind: ``"binary"`` | ``"multiclass"`` | ``"regression"``. Default: ``"binary"``.
        pos_weight: the weight of positive labels (binary), finite and non-negative. Default: ``1.0``.
        weight: the task's weight in the global reduction (``task_weights``), finite and
            non-negative. Default: ``1.0``.
        num_classes: the number of classes, at least 2; required for ``"multiclass"``, where the
            task owns that many logit columns. Default: ``None``.
        focal_gamma: :math:`\gamma \ge 0` of the focal modulation (binary). Default: ``0.0``.
        focal_alpha: :math:`\alpha \in [0, 1]`, the positives' share of the focal class balance
            (binary), or ``None`` for none. Default: ``None``.
        label_smoothing: :math:`\varepsilon \in [0, 1]` (binary or multiclass). Default: ``0.0``.
        neg_sampling_rate: :math:`r \in (0, 1]`, the share of negatives kept (binary). Default: ``1.0``.
        ranking: a ranking term over the rows of each group (binary): ``"pairwise_logistic"``,
            ``"pairwise_hinge"``, ``"softmax"`` or ``"lambda_ndcg"`` (see ``docs/ranking_losses.rst``),
            or ``None``. The task's loss is then ``pointwise_weight * pointwise + ranking_weight *
            ranking``, and ``MultiTaskLoss.forward`` needs ``groups``. Default: ``None``.
        ranking_weight: the ranking term's weight, finite and non-negative. Default: ``1.0``.
        pointwise_weight: the pointwise term's weight, finite and non-negative; ``0`` makes a
            ranking-only task, whose labels may be graded (0, 1, 2, ...). Default: ``1.0``.

    Example:
        >>> Task("negative_feedback", kind="multiclass", num_classes=3).num_classes
        3
        >>> Task("dwell", kind="regression", pos_weight=2.0)
        Traceback (most recent call last):
        ...
        ValueError: Task 'dwell': expected `pos_weight` to keep its default 1.0 (a 'regression' task takes no ...
    """

    name: str
    kind: TaskKind = "binary"
    pos_weight: float = 1.0
    weight: float = 1.0
    num_classes: Optional[int] = None
    focal_gamma: float = 0.0
    focal_alpha: Optional[float] = None
    label_smoothing: float = 0.0
    neg_sampling_rate: float = 1.0
    ranking: Optional[RankingKind] = None
    ranking_weight: float = 1.0
    pointwise_weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"Expected `name` of a Task to be a str, got {type(self.name).__name__}.")
        if not self.name:
            raise ValueError("Expected `name` of a Task to be a non-empty str, got ''.")
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            self._fail("kind", f"one of {KINDS}", self.kind)
        for field, default in _DEFAULTS.items():
            if field not in OPTIONS[self.kind] and getattr(self, field) != default:
                raise ValueError(
                    f"Task {self.name!r}: expected `{field}` to keep its default {default!r} (a {self.kind!r} task "
                    f"takes no `{field}`), got {getattr(self, field)!r}."
                )
        self._number("pos_weight", low=0.0)
        self._number("weight", low=0.0)
        self._number("focal_gamma", low=0.0)
        self._number("label_smoothing", low=0.0, high=1.0)
        self._number("neg_sampling_rate", low=0.0, high=1.0, open_low=True)
        if self.focal_alpha is not None:
            self._number("focal_alpha", low=0.0, high=1.0)
        self._number("ranking_weight", low=0.0)
        self._number("pointwise_weight", low=0.0)
        if self.ranking is not None and (not isinstance(self.ranking, str) or self.ranking not in RANKINGS):
            self._fail("ranking", f"None or one of {RANKINGS}", self.ranking)
        if self.ranking is None:
            for field in ("ranking_weight", "pointwise_weight"):
                if getattr(self, field) != 1.0:
                    self._fail(
                        field,
                        "1.0 without a `ranking` term (it weighs the terms of a ranking task)",
                        getattr(self, field),
                    )
        if self.kind == "multiclass":
            classes: Any = self.num_classes  # typed int, but a caller may pass anything
            expectation = "an int of at least 2 for a 'multiclass' task"
            if classes is not None and (isinstance(classes, bool) or not isinstance(classes, numbers.Integral)):
                self._fail("num_classes", expectation, classes, TypeError)
            if classes is None or classes < 2:  # missing, or too few
                self._fail("num_classes", expectation, classes)
            object.__setattr__(self, "num_classes", int(classes))

    def _number(self, field: str, low: float, high: float = math.inf, open_low: bool = False) -> None:
        value = getattr(self, field)
        interval = f"{'(' if open_low else '['}{low}, {high}{']' if math.isfinite(high) else ')'}"
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            self._fail(field, f"a number in {interval}", value, TypeError)
        number = float(value)  # NumPy scalars included: stored as a plain float
        if not (math.isfinite(number) and (number > low if open_low else number >= low) and number <= high):
            self._fail(field, f"finite and in {interval}", value)
        # A frozen dataclass: set the float form through object.__setattr__.
        object.__setattr__(self, field, number)

    def _fail(self, field: str, expectation: str, value: Any, error: type[Exception] = ValueError) -> NoReturn:
        raise error(f"Task {self.name!r}: expected `{field}` to be {expectation}, got {value!r}.")

    @property
    def columns(self) -> int:
        """How many logit columns the task owns: ``num_classes`` for a multi-class task, else 1."""
        return self.num_classes if self.kind == "multiclass" and self.num_classes is not None else 1
