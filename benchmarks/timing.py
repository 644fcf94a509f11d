"""Interleaved timing: every candidate runs in each round, so drift on a shared machine hits all alike."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any, Optional

import torch


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


def cpu_medians(candidates: dict[str, Callable[[], object]], rounds: int, calls: int = 5) -> dict[str, float]:
    """Median CPU seconds (``time.process_time``) per call of each candidate over interleaved rounds.

    CPU time is what a target can be held to on a shared machine: other jobs stretch wall-clock
    time, not the CPU time of this process.
    """
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.process_time()
            for _ in range(calls):
                fn()
            samples[name].append((time.process_time() - start) / calls)
    return {name: statistics.median(values) for name, values in samples.items()}


def wall_and_cpu_medians(candidates: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict[str, float]]:
    """``{"wall": ..., "cpu": ...}``: the median seconds per call of each candidate, both ways."""
    return {"wall": interleaved_medians(candidates, rounds), "cpu": cpu_medians(candidates, rounds)}


def section_main(
    argv: Optional[list[str]],
    description: Optional[str],
    bench: Callable[[int], Any],
    render: Callable[[Any], str],
    check: Callable[[Any], list[str]],
) -> int:
    """Command line of one benchmark section: measure, print its table and targets; exit 1 on a FAIL."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds (default 9)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    measured = bench(args.rounds)
    lines = check(measured)
    print(render(measured) + "\n" + "\n".join(lines))
    return 0 if all(line.startswith("PASS") for line in lines) else 1
