"""The ranking terms of a :class:`~losses.MultiTaskLoss`: which tasks have one, and their sums per batch.

Built at construction from the Task specs: the tasks with a ``ranking`` are gathered by kind (one
pass of :func:`losses.ranking_losses.unchecked_ranking_sums` per kind present, a row of
:data:`~losses.ranking_losses.RANKINGS`), each column being the task's one logit. ``forward`` of the
loss adds ``ranking_weight * sums / counts`` to each such task's loss; the counts join the one
``all_reduce`` of ``normalize="global"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import nn

from losses import _validation as v
from losses import functional
from losses._column_fork import fork_columns
from losses._input_checks import check_groups
from losses.ranking_losses import unchecked_ranking_sums
from losses.task import RANKINGS, Task


class RankingTerms(nn.Module):
    """The ranking tasks' positions, logit columns and weights (buffers), and their sums and counts."""

    positions: torch.Tensor
    logit_columns: torch.Tensor
    ranking_weight: torch.Tensor

    def __init__(self, specs: Sequence[Optional[Task]], logit_starts: Sequence[int]) -> None:
        super().__init__()
        ranked = [t for t, spec in enumerate(specs) if spec is not None and spec.ranking is not None]
        kinds = [specs[t].ranking for t in ranked]  # type: ignore[union-attr]
        # Ranked tasks in kind order (the order of the table), so each kind's columns are one slice.
        ranked = [t for kind in RANKINGS for t, k in zip(ranked, kinds, strict=True) if k == kind]
        self.kinds = tuple((kind, sum(k == kind for k in kinds)) for kind in RANKINGS if kind in kinds)
        self.names = tuple(specs[t].name for t in ranked)  # type: ignore[union-attr]
        self.register_buffer("positions", torch.tensor(ranked, dtype=torch.long), persistent=False)
        self.register_buffer(
            "logit_columns", torch.tensor([logit_starts[t] for t in ranked], dtype=torch.long), persistent=False
        )
        #: The Tasks' ranking weights as given: the buffer holds them in float64 under any dtype cast.
        self._weights = tuple(specs[t].ranking_weight for t in ranked)  # type: ignore[union-attr]
        self.register_buffer("ranking_weight", torch.tensor(self._weights, dtype=torch.float64), persistent=False)
        logit_columns = [logit_starts[t] for t in ranked]
        #: ``(first task, first logit column)`` when both run consecutively (one ranked task, say): the
        #: columns are then views (``narrow``), whose gradient costs a fill and a copy, not a scatter.
        self._spans = (ranked[0], logit_columns[0]) if _consecutive(ranked) and _consecutive(logit_columns) else None

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> RankingTerms:
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        if self.ranking_weight.dtype != torch.float64:  # a cast: the Tasks' floats again, on the new device
            weights = torch.tensor(self._weights, dtype=torch.float64, device=self.ranking_weight.device)
            self.ranking_weight = weights
        return self

    def extra_repr(self) -> str:
        return ", ".join(f"{kind}={count}" for kind, count in self.kinds)

    def fork(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, columns)``: the logits for the pointwise terms, and the ranked tasks' ``[B, R]`` for :meth:`sums`.

        Through :func:`~losses._column_fork.fork_columns`: both gradients meet in one ``[B, C]`` buffer.
        """
        span = None if self._spans is None else (self._spans[1], len(self.names))
        return fork_columns(logits, span, v.on_device_of("logit_columns", self.logit_columns, logits))

    def sums(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weights: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
        groups: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each ranked task's weighted sum and count of pairs (or lists), ``[R]`` each, in :attr:`names` order.

        ``logits`` are the ranked tasks' columns, ``[B, R]`` (from :meth:`fork`); the other inputs are
        the module's, ``[B, T]`` (weights also ``[B]``).

        Under ``torch.compile`` this runs eagerly, outside the graph (one graph break; ``fullgraph=True``
        refuses it): the number of pairs sizes tensors, and the segment sums of a few columns are
        beyond what inductor generates code for in torch 2.13. The pointwise terms stay compiled.
        """
        sums: tuple[torch.Tensor, torch.Tensor] = _sums_outside_graph(self, logits, labels, weights, mask, groups)
        return sums

    def _sums(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weights: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
        groups: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        groups = check_groups(groups, logits.shape[0], logits)
        if logits.device.type == "meta":  # shape inference: the pair count has no value to read
            empty = logits.new_zeros(len(self.names), dtype=functional.compute_dtype(logits.dtype))
            return empty, empty
        x = logits  # already the ranked columns
        y, w, m = self._columns(labels, weights, mask)
        if len(self.kinds) == 1:
            return unchecked_ranking_sums(x, y, groups, w, m, self.kinds[0][0])
        parts, start = [], 0
        for kind, count in self.kinds:  # at most one pass per kind: a loop over the table, not over tasks
            part = slice(start, start + count)
            parts.append(
                unchecked_ranking_sums(
                    x[:, part],
                    y[:, part],
                    groups,
                    w if w is None or w.ndim == 1 else w[:, part],
                    None if m is None else m[:, part],
                    kind,
                )
            )
            start += count
        return torch.cat([s for s, _ in parts]), torch.cat([c for _, c in parts])

    def _columns(
        self, labels: torch.Tensor, weights: Optional[torch.Tensor], mask: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The ranked tasks' columns of labels, weights and mask, ``[B, R]`` each."""
        # Weights [B] are shared by every task; [B, T] give each task its column.
        shared = weights is None or weights.ndim == 1
        if self._spans is not None:
            task, count = self._spans[0], len(self.names)
            return (
                labels.narrow(1, task, count),
                weights if shared else weights.narrow(1, task, count),  # type: ignore[union-attr]
                None if mask is None else mask.narrow(1, task, count),
            )
        positions = v.on_device_of("positions", self.positions, labels)
        return (
            labels.index_select(1, positions),
            weights if shared else weights.index_select(1, positions),  # type: ignore[union-attr]
            None if mask is None else mask.index_select(1, positions),
        )


def _consecutive(indices: Sequence[int]) -> bool:
    return list(indices) == list(range(indices[0], indices[0] + len(indices)))


_sums_outside_graph = torch.compiler.disable(RankingTerms._sums)  # type: ignore[no-untyped-call]
