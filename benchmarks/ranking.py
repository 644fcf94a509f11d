"""`make bench`, ranking metrics: `MultiTaskRankingMetrics.update` against the loss it sits beside.

The target of issue 11: recording a block in the metric costs at most the forward and backward of
`MultiTaskLoss` on the same block (B = 65536, T = 16, float32, per-sample weights). The targets of
issue 17: the update with `auc_bins=4096` costs at most 1.5x the update without; with groups (4096
groups of 16 rows, gauc and NDCG@10) at most 10x the loss step; the synced state does not grow
with the number of updates (its bytes at T = 16 and T = 512 are reported). Both are timed
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
AUC_BINS = 4096
GROUP_ROWS = 16  # rows per group: 4096 groups in a block of 65536
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
    with_auc = MultiTaskRankingMetrics(names, auc_bins=AUC_BINS)
    grouped = MultiTaskRankingMetrics(names, auc_bins=AUC_BINS, ndcg_k=(10,))
    groups = torch.randperm(batch, generator=gen) // GROUP_ROWS  # shuffled: rows of a group anywhere

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
        "update_auc": lambda: with_auc.update(logits, labels, weights),
        "update_groups": lambda: grouped.update(logits, labels, weights, groups=groups),
    }


def synced_bytes(tasks: int, updates: int, window: bool) -> int:
    """Bytes of the one tensor ``compute()`` all-reduces, after ``updates`` updates of 1024 rows."""
    names = [f"task{i}" for i in range(tasks)]
    metric = MultiTaskRankingMetrics(names, auc_bins=AUC_BINS, ndcg_k=(10,), window=10_000 if window else None)
    gen = torch.Generator().manual_seed(1)
    for _ in range(updates):
        logits = torch.randn(1024, tasks, generator=gen)
        metric.update(logits, (torch.rand(1024, tasks, generator=gen) < 0.1).float(), groups=torch.arange(1024) // 16)
    return metric._pack().nbytes


def bench_ranking(rounds: int = 9) -> dict[str, dict[str, float]]:
    """Median wall-clock and CPU seconds per call of each candidate at :data:`SHAPE`."""
    candidates = _candidates(*SHAPE)
    measured = wall_and_cpu_medians(candidates, rounds)
    measured["bytes"] = {
        f"T={tasks}, window={window}, updates={updates}": float(synced_bytes(tasks, updates, window))
        for tasks in (16, 512)
        for window in (False, True)
        for updates in (1, 3)
    }
    return measured


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
    out += [
        "",
        f"AUC, PR-AUC (`auc_bins={AUC_BINS}`), gauc and NDCG@10 (`groups`: {batch // GROUP_ROWS} groups of",
        f"{GROUP_ROWS} rows, shuffled) on the same block with weights, against the update without them and the",
        "loss step:",
        "",
        "| update | time (µs) | / update without AUC, CPU time | / loss forward + backward, CPU time |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, label in (
        ("update", "without AUC"),
        ("update_auc", "auc_bins"),
        ("update_groups", "auc_bins, groups, ndcg_k"),
    ):
        out.append(
            f"| {label} | {wall[name] * 1e6:.0f} | {cpu[name] / cpu['update']:.2f} | {cpu[name] / cpu['loss']:.2f} |"
        )
    out += [
        "",
        f"Bytes of the tensor `compute()` all-reduces (`auc_bins={AUC_BINS}`, `ndcg_k=(10,)`; the window adds 10",
        "slots of every state); the same after 1 and 3 updates:",
        "",
        "| tasks | window | after 1 update | after 3 updates |",
        "| --- | --- | ---: | ---: |",
    ]
    sizes = measured["bytes"]
    for tasks in (16, 512):
        for window in (False, True):
            one, three = (sizes[f"T={tasks}, window={window}, updates={n}"] for n in (1, 3))
            out.append(f"| {tasks} | {'yes' if window else 'no'} | {one / 2**20:.2f} MiB | {three / 2**20:.2f} MiB |")
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
    auc = cpu["update_auc"] / cpu["update"]
    lines.append(
        f"{'PASS' if auc <= 1.5 else 'FAIL'}  ranking update with auc_bins=4096 / without, CPU time {auc:.2f} <= 1.5"
    )
    grouped = cpu["update_groups"] / cpu["loss"]
    verdict = "PASS" if grouped <= 10.0 else "FAIL"
    lines.append(f"{verdict}  ranking update with groups (gauc, NDCG@10) / loss, CPU time {grouped:.2f} <= 10")
    sizes = measured["bytes"]
    constant = all(
        sizes[f"T={t}, window={w}, updates=1"] == sizes[f"T={t}, window={w}, updates=3"]
        for t in (16, 512)
        for w in (False, True)
    )
    lines.append(f"{'PASS' if constant else 'FAIL'}  ranking synced state does not grow with updates")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    return section_main(argv, __doc__, bench_ranking, render_ranking, check_ranking)


if __name__ == "__main__":
    raise SystemExit(main())
