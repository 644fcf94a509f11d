"""`make bench`, ranking metrics: `MultiTaskRankingMetrics.update` against the loss it sits beside.

The target of issue 11: recording a block in the metric costs at most the forward and backward of
`MultiTaskLoss` on the same block (B = 65536, T = 16, float32, per-sample weights). Both are timed
in this one process with interleaved rounds, so the machine's speed cancels out of the ratio; the
target is checked on CPU time (all threads of this process), which other processes on a shared
machine do not inflate, and the wall-clock ratio is shown beside it.
Run alone with ``python -m benchmarks.ranking``; ``benchmarks.run`` adds the section to
docs/performance.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

from benchmarks.timing import section_main, wall_and_cpu_medians
from losses import MultiTaskLoss, MultiTaskRankingMetrics

SHAPE = (65536, 16)
#: Each update target, the loss step it is compared with, and what the row says.
PAIRS = (
    ("update", "loss", "weights"),
    ("update_mask", "loss_mask", "weights, mask (80% labelled)"),
    ("update_all", "loss_mask", "weights, mask, window, neg_sampling_rates"),
)


def _candidates(batch: int, tasks: int) -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(0)
    rates = torch.logspace(-0.5, -2.3, tasks)  # positive rates from about 30% down to 0.5%
    logits = torch.randn(batch, tasks, generator=gen).requires_grad_()
    labels = (torch.rand(batch, tasks, generator=gen) < rates).float()
    weights = torch.rand(batch, tasks, generator=gen) + 0.5
    mask = torch.rand(batch, tasks, generator=gen) < 0.8
    names = [f"task{i}" for i in range(tasks)]
    loss = MultiTaskLoss(names, pos_weights=(1.0 / rates).sqrt().tolist())
    plain = MultiTaskRankingMetrics(names)
    full = MultiTaskRankingMetrics(names, window=10 * batch, neg_sampling_rates=[0.5] * tasks)

    def loss_step(with_mask: bool) -> Callable[[], None]:
        def step() -> None:
            logits.grad = None
            loss(logits, labels, weights, mask if with_mask else None)["loss"].backward()

        return step

    # The metric sees the logits that require grad, as in training: it detaches them itself.
    return {
        "loss": loss_step(False),
        "loss_mask": loss_step(True),
        "update": lambda: plain.update(logits, labels, weights),
        "update_mask": lambda: plain.update(logits, labels, weights, mask),
        "update_all": lambda: full.update(logits, labels, weights, mask),
    }


def bench_ranking(rounds: int = 9) -> dict[str, dict[str, float]]:
    """Median wall-clock and CPU seconds per call of each candidate at :data:`SHAPE`."""
    candidates = _candidates(*SHAPE)
    return wall_and_cpu_medians(candidates, rounds)


def render_ranking(measured: dict[str, dict[str, float]]) -> str:
    batch, tasks = SHAPE
    out = [
        "",
        "## Ranking metrics",
        "",
        f"`MultiTaskRankingMetrics.update` (B = {batch}, T = {tasks}, float32) against the forward and backward",
        "of `MultiTaskLoss` with pos_weights on the same block and the same inputs: the cost of logging NE,",
        "RCE, log loss, calibration and CTR beside the loss. Median time per call over interleaved rounds;",
        "CPU time counts every thread of the process and not the time other processes take the cores.",
        "",
        "| inputs | update (µs) | loss forward + backward (µs) | update / loss | update / loss, CPU time |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    wall, cpu = measured["wall"], measured["cpu"]
    for update, loss, label in PAIRS:
        out.append(
            f"| {label} | {wall[update] * 1e6:.0f} | {wall[loss] * 1e6:.0f} | "
            f"{wall[update] / wall[loss]:.2f} | {cpu[update] / cpu[loss]:.2f} |"
        )
    return "\n".join(out) + "\n"


def check_ranking(measured: dict[str, dict[str, float]]) -> list[str]:
    """The target of issue 11, a PASS or FAIL line per row: update / loss <= 1 in CPU time."""
    lines = []
    cpu = measured["cpu"]
    for update, loss, label in PAIRS:
        ratio = cpu[update] / cpu[loss]
        lines.append(
            f"{'PASS' if ratio <= 1.0 else 'FAIL'}  ranking update / loss ({label}), CPU time {ratio:.2f} <= 1"
        )
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    return section_main(argv, __doc__, bench_ranking, render_ranking, check_ranking)


if __name__ == "__main__":
    raise SystemExit(main())
