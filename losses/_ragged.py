"""Ragged groups without padding: the rows of each group as one run of a sort, and the pairs inside.

The entries of ``R`` ranking columns over ``B`` rows are flattened task-major (entry ``e = r B + b``)
and keyed by ``(column, group)``: a group of one column is one run of consecutive positions after a
sort, whatever the group ids are and however the rows are ordered. An entry the mask leaves out gets
a key of its own, so it is a run of one: in no pair, and its label is 0, so in no list. Runs are
described by per-position tensors of size ``N = R B`` (a run is named by its first sorted position,
below ``N``), never by a ``[groups, largest group]`` padding; the pairs of all runs are built by
index arithmetic, and their count, which sizes their tensors, is the one value read back from the
device.

Every op here on ``N`` or more elements costs a parallel region on several intra-op threads, whose
waiting the CPU time of a training step pays, so the edges of runs and ties come from running maxima
(``cummax``, a serial scan) of marked positions rather than from sizes summed and gathered back.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Runs(NamedTuple):
    """The flat entries sorted by (column, group) key, and by label from high to low inside a run.

    Every tensor is ``[N]`` and indexed by sorted position unless said otherwise.
    """

    order: torch.Tensor  #: the flat entry at each sorted position
    start: torch.Tensor  #: the run's first sorted position, which also names the run (an id below ``N``)
    tie_start: torch.Tensor  #: the first sorted position of this entry's label tie, in its run
    higher: torch.Tensor  #: how many entries of the run have a higher label: this entry's pairs
    column: Optional[torch.Tensor]  #: the ranking column (``r``) of the entry; ``None`` with one column


def _changes(sorted_values: torch.Tensor, first: bool = False) -> torch.Tensor:
    """Bool, true where a sorted value differs from the one before along the last dim (first position: ``first``)."""
    changes = torch.empty_like(sorted_values, dtype=torch.bool)
    changes[..., :1] = first
    torch.ne(sorted_values[..., 1:], sorted_values[..., :-1], out=changes[..., 1:])
    return changes


#: Keys stay below 2^31, so ``key * 2^32`` plus a 32-bit code fits in an int64.
_KEYS = 2**31


def group_ids(groups: torch.Tensor, max_span: int) -> tuple[torch.Tensor, int]:
    """``(ids, span)``: int64 ids in ``[0, span)`` in the order of the group ids, equal for equal groups.

    On the CPU, reading the ids' range costs no device sync: ids spanning at most ``max_span``
    values are used as they are, minus the smallest, with no sort. Otherwise (other devices, or ids
    spread wide, such as hashes) dense ids come from one sort of the ids (no ``unique``, whose size
    is data-dependent), and the span is the batch size.
    """
    batch = groups.numel()
    if groups.device.type == "cpu" and batch > 0:
        low, high = (int(v) for v in torch.aminmax(groups))
        span = high - low + 1
        if span <= max_span:
            # In int64: ids of a narrower dtype (int16, int8) spanning more than half its range would wrap.
            return groups.to(torch.int64) - low, span
    sorted_ids, by_id = torch.sort(groups, stable=True)
    # At least 1: the span strides the columns' keys (an empty batch has R columns of nothing).
    return torch.empty_like(by_id).scatter_(0, by_id, _changes(sorted_ids).cumsum(0)), max(batch, 1)


def _group_ids(groups: torch.Tensor, columns: int) -> tuple[torch.Tensor, int]:
    """:func:`group_ids` for :func:`flat_keys`: keys ``r span + id`` and one per entry above them stay below 2^31."""
    return group_ids(groups, _KEYS // columns - groups.numel())


def per_column_sums(values: torch.Tensor, column: Optional[torch.Tensor], columns: int) -> torch.Tensor:
    """``[R]``: the sum of ``values`` per column, ``column`` naming each value's (``None``: one column)."""
    if column is None:  # one column (the common case): a plain sum is several times faster
        return values.sum().reshape(1)
    return values.new_zeros(columns).index_add_(0, column, values)


def flat_keys(groups: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(keys, bound)``: the ``[R B]`` keys of the task-major entries, each below ``bound`` (at most ``2^31``).

    A key is ``r S + g``, ``g`` a group id below ``S``, or a key of its own for a left-out entry.
    ``groups`` is ``[B]`` of any integer ids in any order; ``keep`` is the ``[B, R]`` bool of the
    entries that take part. Keys are ordered by (column, group id).
    """
    batch, columns = keep.shape
    ids, span = _group_ids(groups, columns)
    grouped = ids.unsqueeze(0)
    if columns > 1:  # r S + g
        grouped = grouped + torch.arange(0, columns * span, span, device=groups.device).unsqueeze(1)
    # An entry left out: a key above every grouped one, distinct for each entry.
    first = columns * span
    alone = torch.arange(first, first + columns * batch, device=groups.device).view(columns, batch)
    return torch.where(keep.t(), grouped, alone).reshape(-1), first + columns * batch


def descending_code(values: torch.Tensor) -> torch.Tensor:
    """An int32 per value in ``[-2^31, 2^31)``, smaller for a larger value: the bits of its negation as float32.

    Added under a key (``key * 2^32 + code``) it makes one integer sort do the work of two stable
    sorts (by value, then by key). Values are compared in float32: values closer than float32 tells
    apart are ties, and so are -0.0 and 0.0.
    """
    bits = (0.0 - values.to(torch.float32)).view(torch.int32)  # 0.0 - v: -v, with 0.0 for both zeros
    # A negative float's bits order it backwards: flip all but the sign bit.
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _packed(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.add(descending_code(values), keys, alpha=2**32)


def sort_by_key_then_descending(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed, order)``: one stable sort by key, then by value from high to low (ties in entry order).

    ``packed`` is ``key * 2^32 + descending_code(value)``, sorted.
    """
    packed = _packed(keys, values)
    order = torch.empty_like(packed)
    torch.sort(packed, stable=True, out=(packed, order))  # in place: no second [N] buffer of sorted values
    return packed, order


def _binary(labels: torch.Tensor, keep: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``labels != 1`` (bool) when every kept label is 0 or 1, else ``None``; always ``None`` off the CPU.

    Reading the answer waits for the device, which a CPU tensor does not: elsewhere the general path
    runs, with the same runs and pairs.
    """
    if labels.device.type != "cpu":
        return None
    negative = labels != 1
    odd = negative.logical_and(labels != 0)
    if bool((odd if keep is None else odd.logical_and_(keep)).any()):
        return None
    return negative


def sort_runs(
    keys: torch.Tensor, labels: torch.Tensor, batch: int, keep: Optional[torch.Tensor] = None, bound: int = _KEYS
) -> Runs:
    """Sort the entries by key, then by label from high to low (one sort), and describe the runs.

    ``keep`` marks the entries whose labels count (``None``: all); ``bound`` is above every key. With
    labels 0 and 1 (on the CPU) and keys below ``2^30``, the label is one bit under the key and the
    sort an int32 one: torch's radix sort makes as many passes as the dtype has bytes, half of int64's.
    """
    n = keys.numel()
    negative = _binary(labels, keep) if 2 * bound <= 2**31 else None
    # Row 0 the key, row 1 the packed (key, label) value of each sorted position, written in place.
    order = keys.new_empty(n)
    if negative is not None:
        marks = keys.new_empty((2, n), dtype=torch.int32)
        torch.sort(torch.add(negative, keys, alpha=2).to(torch.int32), stable=True, out=(marks[1], order))
        torch.bitwise_right_shift(marks[1], 1, out=marks[0])
    else:
        marks = keys.new_empty((2, n))
        torch.sort(_packed(keys, labels), stable=True, out=(marks[1], order))
        torch.index_select(keys, 0, order, out=marks[0])
    # A run starts where the key changes, a tie where the packed value does (and both at position 0).
    # The latest start at or before each position is where the running maximum of the marks was last
    # reached: cummax gives the last index of equal maxima (its kernels compare with >=; the pair
    # tests would fail otherwise), so both rows need one scan and no marked positions.
    start, tie_start = torch.cummax(_changes(marks, first=True), 1).indices.unbind()
    return Runs(
        order=order,
        start=start,
        tie_start=tie_start,
        higher=tie_start - start,
        # An empty batch keeps its (empty) columns: one column is no column only with rows.
        column=None if n == batch > 0 else torch.div(order, max(batch, 1), rounding_mode="floor"),
    )


def pairs(runs: Runs) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair (higher label, lower label) inside a run, as two ``[P]`` tensors of sorted positions.

    The entry at sorted position ``i`` pairs with the ``higher[i]`` entries of its run before its
    label tie: pair ``p`` of ``i``'s block is ``(start[i] + p - block_start[i], i)``. Memory is
    ``O(P)``; ``P`` is read from the device once, because it sizes the tensors.
    """
    count = int(runs.higher.sum())
    lower = torch.repeat_interleave(runs.higher, output_size=count)
    # start[i] - block_start[i] = tie_start[i] - block_end[i]: the part fixed per block, gathered once per pair.
    shift = runs.tie_start - runs.higher.cumsum(0)
    return shift.index_select(0, lower).add_(torch.arange(count, device=lower.device)), lower
