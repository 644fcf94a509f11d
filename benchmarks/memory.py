"""Peak memory allocated by one call, from the PyTorch profiler's memory timeline (CPU)."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Optional

from torch.profiler import ProfilerActivity, profile


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    # The profiler's C++ side prints start/stop lines straight to file descriptor 2.
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_bytes(fn: Callable[[], object], min_size: int = 1, repeats: int = 3) -> Optional[int]:
    """Peak bytes held by allocations of at least ``min_size`` bytes made during ``fn()``.

    The largest of ``repeats`` profiled calls: the peak of one call is deterministic, and an event
    the profiler loses can only make it look smaller. None if the profiler cannot tell.
    """
    fn()
    try:
        from torch.profiler._memory_profiler import Action  # private: may move between torch versions
    except ImportError:
        return None
    peaks = []
    for _ in range(repeats):
        try:
            with warnings.catch_warnings(), _native_stderr_silenced():
                warnings.simplefilter("ignore")
                activities = [ProfilerActivity.CPU]
                with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
                    fn()
                timeline = prof._memory_profile().timeline
        except (AttributeError, RuntimeError):
            return None
        live = peak = 0
        for _, action, _, size in timeline:
            if size < min_size:
                continue
            if action == Action.CREATE:
                live += size
            elif action == Action.DESTROY:
                live -= size
            peak = max(peak, live)
        peaks.append(peak)
    return max(peaks)
