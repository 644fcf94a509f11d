"""The demo's ``--weighting`` choices, and the table that compares them."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Optional

import torch

from losses.weighting import (
    DynamicWeightAverage,
    GeometricLossStrategy,
    RandomLossWeighting,
    TaskWeighting,
    UncertaintyWeighting,
)

#: How the task losses become the training loss; "equal" is MultiTaskLoss's own mean over tasks.
WEIGHTINGS: dict[str, Callable[[list[str]], Optional[TaskWeighting]]] = {
    "equal": lambda tasks: None,
    "uncertainty": UncertaintyWeighting,
    "dwa": lambda tasks: DynamicWeightAverage(tasks, window=100),
    "rlw": RandomLossWeighting,
    "gls": GeometricLossStrategy,
}


def weighting_names(text: str) -> list[str]:
    """``--weighting`` parser: one name, or several separated by commas (one model trained per name)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in WEIGHTINGS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected names from {', '.join(WEIGHTINGS)}, got {text!r}")
    return list(dict.fromkeys(names))


def for_logging(losses: dict[str, torch.Tensor], tasks: Sequence[str]) -> dict[str, torch.Tensor]:
    """The task losses with their plain mean as ``"loss"``, whatever the weighting: runs compare on one scale."""
    entries = {f"loss/{task}": losses[f"loss/{task}"] for task in tasks}
    entries["loss"] = torch.stack(list(entries.values())).mean()
    return entries


def weights_text(losses: dict[str, torch.Tensor], tasks: Sequence[str]) -> str:
    """The weights a weighting applied on this step, for the log ("" without one)."""
    if f"weight/{tasks[0]}" not in losses:
        return ""
    return " | weights " + ", ".join(f"{task} {losses[f'weight/{task}'].item():.2f}" for task in tasks)


def print_comparison(gaps: dict[str, dict[str, float]]) -> None:
    """Per task, the share of the held-out gap from the base rate to the optimum each weighting closed."""
    tasks = list(next(iter(gaps.values())))
    print("\nheld-out gap closed per task, by weighting (the same data, model and seed)")
    print(f"{'task':<8} " + " ".join(f"{name:>11}" for name in gaps))
    for task in tasks:
        print(f"{task:<8} " + " ".join(f"{gaps[name][task]:>11.1%}" for name in gaps))
    print(f"{'mean':<8} " + " ".join(f"{sum(gap.values()) / len(gap):>11.1%}" for gap in gaps.values()))
