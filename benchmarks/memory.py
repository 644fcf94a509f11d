"""Peak memory allocated by one call, from the PyTorch profiler's memory timeline (CPU)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Optional

from torch.profiler import ProfilerActivity, profile


def peak_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Peak of bytes allocated and not yet freed during ``fn()``, or None if the profiler cannot tell."""
    fn()
    try:
        from torch.profiler._memory_profiler import Action  # private: may move between torch versions

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with profile(
                activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
            ) as prof:
                fn()
            timeline = prof._memory_profile().timeline
    except (ImportError, AttributeError, RuntimeError):
        return None
    live = peak = 0
    for _, action, _, size in timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak
