"""The few collectives the library needs, each a no-op on a single process."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: Optional[dist.ProcessGroup] = None) -> int:
    """Number of ranks in ``group`` (default: the default process group); 1 when there is none."""
    return dist.get_world_size(group) if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group`` (default: all) into a new tensor; ``tensor`` is never modified.

    Without a process group the copy is returned as it is, so single-process code needs no branch.
    """
    reduced = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
    return reduced
