"""Interleaved timing: every candidate runs in each round, so drift on a shared machine hits all alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def per_call_seconds(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def calls_for(fn: Callable[[], object], budget: float = 0.02) -> int:
    """How many calls make one timing sample last about ``budget`` seconds."""
    fn()
    once = per_call_seconds(fn, 1)
    return max(1, min(2000, int(budget / max(once, 1e-7))))


def interleaved_medians(candidates: dict[str, Callable[[], object]], rounds: int = 9) -> dict[str, float]:
    """Median seconds per call of each candidate over ``rounds`` interleaved rounds."""
    calls = {name: calls_for(fn) for name, fn in candidates.items()}
    for fn in candidates.values():  # warm caches and the allocator
        per_call_seconds(fn, 2)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            samples[name].append(per_call_seconds(fn, calls[name]))
    return {name: statistics.median(values) for name, values in samples.items()}
