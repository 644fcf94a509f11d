"""Ragged groups without padding: the rows of each group as one run of a sort, and the pairs inside.

The entries of ``R`` ranking columns over ``B`` rows are flattened task-major (entry ``e = r B + b``)
and keyed by ``(column, group)``: a group of one column is one run of consecutive positions after a
sort, whatever the group ids are and however the rows are ordered. An entry the mask leaves out gets
a key of its own, so it is a run of one: in no pair, and its label is 0, so in no list. Runs are
described by per-position tensors of size ``N = R B`` (a run's id is below ``N``), never by a
``[groups, largest group]`` padding; the pairs of all runs are built by index arithmetic, and their
count, which sizes their tensors, is the one value read back from the device.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Runs(NamedTuple):
    """The flat entries sorted by (column, group) key, and by label from high to low inside a run.

    Every tensor is ``[N]`` and indexed by sorted position unless said otherwise.
    """

    order: torch.Tensor  #: the flat entry at each sorted position
    run: torch.Tensor  #: the run (group of one column) id, dense in ``[0, runs)``
    start: torch.Tensor  #: the run's first sorted position
    size: torch.Tensor  #: the run's size
    lower_start: torch.Tensor  #: the first sorted position after this entry's label tie, in its run
    lower: torch.Tensor  #: how many entries of the run have a lower label: this entry's pairs
    column: Optional[torch.Tensor]  #: the ranking column (``r``) of the entry; ``None`` with one column


def flat_keys(groups: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The ``[R B]`` keys of the task-major entries: ``r B + g`` with ``g`` the dense group id, or a key of its own.

    ``groups`` is ``[B]`` of any integer ids in any order; ``keep`` is the ``[B, R]`` bool of the
    entries that take part. Dense ids come from one sort of the ids (no ``unique``, whose size is
    data-dependent).
    """
    batch, columns = keep.shape
    sorted_ids, by_id = torch.sort(groups, stable=True)
    new = torch.ones_like(sorted_ids, dtype=torch.bool)
    new[1:] = sorted_ids[1:] != sorted_ids[:-1]
    dense = torch.empty_like(by_id).scatter_(0, by_id, new.cumsum(0) - 1)
    entries = torch.arange(columns * batch, device=groups.device).view(columns, batch)
    grouped = dense.unsqueeze(0) + entries[:, :1]  # r B + g
    # An entry left out: a key above every grouped one, distinct for each entry.
    return torch.where(keep.t(), grouped, entries + columns * batch).reshape(-1)


def _run_ids(sorted_keys: torch.Tensor) -> torch.Tensor:
    new = torch.ones_like(sorted_keys, dtype=torch.bool)
    new[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return new.cumsum(0) - 1


def _run_bounds(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ids dense and non-decreasing over sorted positions: each position's run start and size."""
    sizes = torch.zeros_like(ids).index_add_(0, ids, torch.ones_like(ids))
    starts = sizes.cumsum(0) - sizes
    return starts.index_select(0, ids), sizes.index_select(0, ids)


def descending_code(values: torch.Tensor) -> torch.Tensor:
    """An int64 in ``[0, 2^32)`` per value, smaller for a larger value: its float32 bits, order-preserving.

    Packed under a key (``key * 2^32 + code``) it makes one integer sort do the work of two stable
    sorts (by value, then by key). Values are compared in float32: labels or logits closer than
    float32 tells apart are ties.
    """
    bits = (values.to(torch.float32) + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 becomes 0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed order is now the floats' order
    return (2**31 - 1) - ordered


def sort_runs(keys: torch.Tensor, labels: torch.Tensor, batch: int) -> Runs:
    """Sort the entries by key, then by label from high to low (one sort), and describe the runs."""
    packed, order = torch.sort(keys * 2**32 + descending_code(labels), stable=True)
    run = _run_ids(packed >> 32)
    start, size = _run_bounds(run)
    # A tie (same key, same label) is a run of equal packed values: one comparison finds both edges.
    ties = _run_ids(packed)
    # Only where each tie ends is needed: the cumulative tie sizes, gathered once.
    lower_start = torch.zeros_like(ties).index_add_(0, ties, torch.ones_like(ties)).cumsum(0).index_select(0, ties)
    return Runs(
        order=order,
        run=run,
        start=start,
        size=size,
        lower_start=lower_start,
        lower=start + size - lower_start,
        column=None if order.numel() == batch else torch.div(order, batch, rounding_mode="floor"),
    )


def pairs(runs: Runs) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair (higher label, lower label) inside a run, as two ``[P]`` tensors of sorted positions.

    The entry at sorted position ``i`` pairs with the ``lower[i]`` entries after its label tie:
    pair ``p`` of ``i``'s block is ``(i, lower_start[i] + p - block_start[i])``. Memory is
    ``O(P)``; ``P`` is read from the device once, because it sizes the tensors.
    """
    count = int(runs.lower.sum())
    positions = torch.arange(runs.lower.numel(), device=runs.lower.device)
    higher = torch.repeat_interleave(positions, runs.lower, output_size=count)
    # lower_start[i] + p - block_start[i]: the part fixed per block is gathered once per pair.
    shift = runs.lower_start - runs.lower.cumsum(0) + runs.lower
    return higher, torch.arange(count, device=runs.lower.device) + shift.index_select(0, higher)


def logit_ranks(keys: torch.Tensor, logits: torch.Tensor, runs: Runs, positions: torch.Tensor) -> torch.Tensor:
    """Each sorted entry's 0-based rank by logit (high to low, in float32) inside its run; ties in row order.

    ``positions`` is each sorted entry's position in its run (``arange(N) - runs.start``).
    """
    order = torch.argsort(keys * 2**32 + descending_code(logits), stable=True)
    # The same keys, sorted: the runs sit at the same sorted positions as in `runs`, so the entry at
    # logit-sorted position k has the rank of position k in its run.
    ranks = torch.empty_like(order).scatter_(0, order, positions)
    return ranks.index_select(0, runs.order)
