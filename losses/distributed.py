"""The few collectives the library needs, each a no-op on a single process.

Every function takes a ``group``: ``None`` is the default group (the whole world), as in
:mod:`torch.distributed`; a group from :func:`torch.distributed.new_group` restricts the
collective to its ranks, which are then the only ranks that may call it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

#: What ``torch.distributed.new_group`` returns: a group, or on a rank outside it a marker.
ProcessGroup = Any


def is_distributed() -> bool:
    """True when a default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def check_group(name: str, group: Optional[ProcessGroup]) -> Optional[ProcessGroup]:
    """Return ``group`` if it is ``None`` or what ``torch.distributed.new_group`` returns, else raise."""
    if group is None:
        return None
    if dist.is_available() and (isinstance(group, dist.ProcessGroup) or group is dist.GroupMember.NON_GROUP_MEMBER):
        return group
    raise TypeError(
        f"Expected `{name}` to be None (the default group) or a group from torch.distributed.new_group, "
        f"got {type(group).__name__}."
    )


def world_size(group: Optional[ProcessGroup] = None) -> int:
    """Number of ranks in ``group`` (default: the world); 1 when there is no process group.

    Raises a ``ValueError`` on a rank that is not in ``group``: torch's collectives silently do
    nothing there, which would give a wrong value instead of an error.
    """
    if not is_distributed():
        return 1
    size = dist.get_world_size(group)
    if size < 0:
        raise ValueError(
            f"Expected this rank ({dist.get_rank()}) to be in `process_group`: only the group's ranks may "
            "call a loss or reduction on it."
        )
    return size


def all_reduce_sum(tensor: torch.Tensor, group: Optional[ProcessGroup] = None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group`` into a new tensor; ``tensor`` itself is never modified.

    Without a process group the copy is returned as it is, so single-process code needs no branch.
    """
    reduced = tensor.detach().clone()
    if is_distributed():
        world_size(group)  # a rank outside the group gets an error, not an untouched copy
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
    return reduced


class GroupHandle:
    """A process group held by a module: ``deepcopy`` shares it, pickling leaves it behind.

    A group is a handle on the connections of the running processes: it cannot be pickled, and a
    copy of a module in the same process should talk to the same ranks. After unpickling,
    :meth:`get` raises until the owner is given a group again.
    """

    def __init__(self, group: Optional[ProcessGroup] = None, left_behind: bool = False) -> None:
        self.group = group
        self.left_behind = left_behind

    def get(self) -> Optional[ProcessGroup]:
        """The group (``None`` for the default one); an error if it was left behind by pickling."""
        if self.left_behind:
            raise RuntimeError(
                "Expected a `process_group`: this loss was pickled with one, which cannot be saved. "
                "Set `loss.process_group = group` after loading it."
            )
        return self.group

    def __deepcopy__(self, memo: dict[int, Any]) -> GroupHandle:
        return self

    def __reduce__(self) -> tuple[type[GroupHandle], tuple[None, bool]]:
        return GroupHandle, (None, self.group is not None or self.left_behind)


class HoldsProcessGroup:
    """The ``process_group`` attribute of a module whose collectives run on one group.

    Checked when set, and kept in a :class:`GroupHandle`, so that ``deepcopy`` shares the group and
    pickling leaves it behind.
    """

    _group: GroupHandle

    @property
    def process_group(self) -> Optional[ProcessGroup]:
        """The ranks this module's collectives run on (``None``: every rank)."""
        return self._group.group

    @process_group.setter
    def process_group(self, group: Optional[ProcessGroup]) -> None:
        self._group = GroupHandle(check_group("process_group", group))
