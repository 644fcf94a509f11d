"""Train an MLP ranker on synthetic engagement data with MultiTaskLoss; compare with the best possible loss.

The head mixes task kinds, as a real ranker's does: binary engagements (pos_weights for the rare
ones) and a multi-class negative-feedback task (none / see-less / report), all in one ``[B, D]``
block of logits and one loss (see ``docs/task_specs.rst``).

Run ``python -m demo --help``. Under ``torchrun --nproc-per-node=2 -m demo`` every rank trains on
its own shard (DDP, gloo) and the log shows each rank's local loss beside the global one.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from demo.data import ENGAGEMENTS, FEEDBACK, FEEDBACK_CLASSES, Batch, EngagementModel
from demo.weighting import WEIGHTINGS, for_logging, print_comparison, weighting_names, weights_text
from losses import MultiTaskGlobalLoss, MultiTaskLoss, MultiTaskRankingMetrics, Task, TaskWeighting


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    parser.add_argument("--batch-size", type=int, default=512, help="rows per step on each rank (default 512)")
    parser.add_argument(
        "--tasks",
        type=int,
        default=5,
        choices=range(1, len(ENGAGEMENTS) + 1),
        metavar="1-5",
        help=f"number of binary tasks, from {', '.join(name for name, _ in ENGAGEMENTS)} (default 5); the "
        f"multi-class {FEEDBACK} task comes on top",
    )
    parser.add_argument("--features", type=int, default=16, help="dense features per row (default 16)")
    parser.add_argument("--log-every", type=int, default=100, help="steps between global loss logs (default 100)")
    parser.add_argument("--holdout", type=int, default=100_000, help="held-out rows for the final table")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the model (default 0)")
    parser.add_argument("--output", type=Path, default=Path("demo_loss_curve.png"), help="loss-curve PNG path")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--weighting",
        type=weighting_names,
        default=["equal"],
        metavar="NAME[,NAME...]",
        help=f"task weighting, from {', '.join(WEIGHTINGS)}; several (comma-separated) train one model each "
        "and compare them (default equal)",
    )
    return parser.parse_args(argv)


def task_specs(tasks: int, pos_weights: list[float]) -> list[Task]:
    """The ranker's tasks: the first ``tasks`` engagements (binary), then the multi-class feedback."""
    binary = [Task(name, pos_weight=weight) for (name, _), weight in zip(ENGAGEMENTS[:tasks], pos_weights, strict=True)]
    return [*binary, Task(FEEDBACK, kind="multiclass", num_classes=len(FEEDBACK_CLASSES))]


class Ranker(nn.Module):
    """An MLP tower with one head block (a logit per engagement, one per feedback class), holding its loss
    so that DDP and .to() carry it along."""

    def __init__(
        self,
        features: int,
        specs: list[Task],
        distributed: bool,
        weighting: Optional[TaskWeighting] = None,
    ) -> None:
        super().__init__()
        self.specs = specs
        columns = sum(spec.columns for spec in specs)
        self.tower = nn.Sequential(
            nn.Linear(features, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, columns)
        )
        # With ranks holding different labelled counts, "global" keeps the DDP gradient exact.
        # A weighting inside the loss is inside the model DDP wraps: the same weights on every rank.
        self.loss = MultiTaskLoss(specs, normalize="global" if distributed else "local", weighting=weighting)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.tower(batch.features)
        return logits, self.loss(logits, batch.labels, batch.weights, batch.mask)


@dataclass
class Curve:
    steps: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        self.steps.append(step)
        for name, value in losses.items():
            self.values.setdefault(name, []).append(float(value))


def _rank_and_world() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_initialized():  # one group for all the weightings trained in turn
            dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _pos_weights(model: EngagementModel, tasks: int) -> list[float]:
    # Up-weight rare positives by the square root of the negative-to-positive odds.
    return [round(math.sqrt((1 - rate) / rate), 2) for _, rate in ENGAGEMENTS[:tasks]]


def _feedback_scores(logits: torch.Tensor, batch: Batch) -> tuple[float, float]:
    """NE and calibration of the feedback task: its weighted cross-entropy over the entropy of the
    weighted class shares, and the predicted over the observed share of negative feedback (any class
    but "none")."""
    labelled = batch.mask[:, -1]
    classes, weights = batch.labels[labelled, -1].long(), batch.weights[labelled]
    shares = torch.bincount(classes, weights, minlength=len(FEEDBACK_CLASSES)) / weights.sum()
    entropy = -(shares * shares.clamp_min(1e-12).log()).sum()
    cross_entropy = (F.cross_entropy(logits[labelled], classes, reduction="none") * weights).sum() / weights.sum()
    predicted = ((1 - torch.softmax(logits[labelled], dim=1)[:, 0]) * weights).sum() / weights.sum()
    return (cross_entropy / entropy).item(), (predicted / (1 - shares[0])).item()


def evaluate(ranker: Ranker, data: EngagementModel, rows: int, seed: int) -> list[tuple[str, float, ...]]:
    """Per task: positive rate; held-out loss of the trained, Bayes-optimal and base-rate models;
    NE of the trained and the Bayes-optimal model, and the trained model's calibration."""
    batch = data.sample(rows, torch.Generator().manual_seed(seed + 10_000))
    # Rank 0 evaluates alone, so a loss with normalize="global" (a collective) will not do.
    loss = MultiTaskLoss(ranker.specs)
    binary = [spec.name for spec in ranker.specs if spec.kind == "binary"]
    engagements = len(binary)
    log_pos_weight = loss.pos_weight[:engagements].log()
    # Under pos_weight p the loss-minimizing probability is p*q / (p*q + 1 - q) for the true q: the
    # true logit shifted by log p (the feedback's logits are not shifted). The best constant is the
    # base rate shifted the same way, and the class shares for the feedback.
    shift = torch.cat([log_pos_weight, torch.zeros(len(FEEDBACK_CLASSES))])
    rate = torch.nanmean(batch.labels[:, :engagements], dim=0)
    feedback = batch.labels[batch.mask[:, -1], -1].long()
    shares = torch.bincount(feedback, minlength=len(FEEDBACK_CLASSES)).float() / feedback.numel()
    constant = torch.cat([torch.log(rate / (1 - rate)), shares.log()]) + shift
    with torch.no_grad():
        logits = ranker.tower(batch.features)
        trained = loss(logits, batch.labels, batch.weights, batch.mask)
        optimal = loss(batch.true_logits + shift, batch.labels, batch.weights, batch.mask)
        base = loss(constant.expand_as(batch.true_logits), batch.labels, batch.weights, batch.mask)
        # NE and calibration judge probabilities, so the trained logits lose the log(pos_weight)
        # shift the loss taught them. sync_on_compute=False: rank 0 evaluates alone. The ranking
        # metrics are binary: the feedback task gets its own NE and calibration.
        inputs = (batch.labels[:, :engagements], batch.weights, batch.mask[:, :engagements])
        ranking = {
            "trained": MultiTaskRankingMetrics(binary, sync_on_compute=False),
            "optimal": MultiTaskRankingMetrics(binary, sync_on_compute=False),
        }
        ranking["trained"].update(logits[:, :engagements] - log_pos_weight, *inputs)
        ranking["optimal"].update(batch.true_logits[:, :engagements], *inputs)
        ne = {model: metric.compute() for model, metric in ranking.items()}
        feedback_ne, feedback_calibration = _feedback_scores(logits[:, engagements:], batch)
        feedback_ne_optimal, _ = _feedback_scores(batch.true_logits[:, engagements:], batch)
    rows_ = [
        (
            name,
            rate[t].item(),
            trained[f"loss/{name}"].item(),
            optimal[f"loss/{name}"].item(),
            base[f"loss/{name}"].item(),
            ne["trained"][f"ne/{name}"].item(),
            ne["optimal"][f"ne/{name}"].item(),
            ne["trained"][f"calibration/{name}"].item(),
        )
        for t, name in enumerate(binary)
    ]
    rows_.append(
        (
            FEEDBACK,
            1 - shares[0].item(),
            trained[f"loss/{FEEDBACK}"].item(),
            optimal[f"loss/{FEEDBACK}"].item(),
            base[f"loss/{FEEDBACK}"].item(),
            feedback_ne,
            feedback_ne_optimal,
            feedback_calibration,
        )
    )
    return rows_


def plot(curve: Curve, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in curve.values.items():
        ax.plot(curve.steps, values, label=name, linewidth=2.5 if name == "loss" else 1.2)
    ax.set_title("MultiTaskLoss on synthetic engagements: global loss per logging window", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (log scale)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def train(args: argparse.Namespace, weighting: str = "equal") -> list[tuple[str, float, ...]]:
    """Train one model with ``weighting``; rank 0 returns the final table's rows, other ranks none."""
    rank, world = _rank_and_world()
    torch.manual_seed(args.seed)  # the same initial model on every rank
    data = EngagementModel(args.tasks, args.features, seed=args.seed)
    specs = task_specs(args.tasks, _pos_weights(data, args.tasks))
    tasks = [spec.name for spec in specs]
    engagements = tasks[: args.tasks]  # the binary tasks: the ranking metrics' and the log's
    ranker = Ranker(args.features, specs, distributed=world > 1, weighting=WEIGHTINGS[weighting](tasks))
    # [ddp-start]
    model: nn.Module = DistributedDataParallel(ranker) if world > 1 else ranker
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    global_loss = MultiTaskGlobalLoss(tasks)  # synced across ranks by torchmetrics
    local_loss = MultiTaskGlobalLoss(tasks, sync_on_compute=False)  # this rank's own window
    # Never reset: its window_* values cover about the last logging period of the global batch.
    ranking = MultiTaskRankingMetrics(engagements, window=args.log_every * args.batch_size * world)
    log_pos_weight = ranker.loss.pos_weight[: args.tasks].log()  # the shift pos_weight puts on the logits
    # Under normalize="global" a rank's training loss is its share of the global mean, not its own
    # mean; this plain loss gives the rank's own mean for display.
    own_mean = MultiTaskLoss(specs)
    gen = torch.Generator().manual_seed(args.seed + 1 + rank)  # each rank draws its own shard
    curve = Curve()
    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.steps, desc="training", unit="step")
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = data.sample(args.batch_size, gen)
        logits, losses = model(batch)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        global_loss.update(for_logging(losses, tasks), weight=args.batch_size)  # the task losses and their mean
        # [ddp-end]
        head = slice(0, args.tasks)  # the engagements' columns of the logits, labels and mask
        ranking.update(
            logits.detach()[:, head] - log_pos_weight, batch.labels[:, head], batch.weights, batch.mask[:, head]
        )
        if world > 1:
            local_loss.update(own_mean(logits.detach(), batch.labels, batch.weights, batch.mask), args.batch_size)
        if step % args.log_every == 0 or step == args.steps:
            window = global_loss.compute()
            global_loss.reset()
            ranked = ranking.compute()  # every rank: it syncs
            curve.add(step, window)
            line = f"step {step:>5}: global loss {window['loss'].item():.4f}"
            applied = weights_text(losses, tasks)
            if world > 1:
                line += f" | rank {rank} local {local_loss.compute()['loss'].item():.4f}"
                local_loss.reset()
                # Every rank reports its own line; gather them so rank 0 prints them together.
                lines: list[Optional[str]] = [None] * world
                dist.all_gather_object(lines, line)
                line = "\n".join(str(entry) for entry in lines)
            else:
                line += " (" + ", ".join(f"{name} {window[f'loss/{name}'].item():.3f}" for name in tasks) + ")"
            line += applied
            line += (
                "\n"
                + " " * 13
                + "RCE "
                + ", ".join(f"{name} {ranked[f'window_rce/{name}'].item():.1f}" for name in engagements)
            )
            line += " | calibration " + ", ".join(
                f"{name} {ranked[f'window_calibration/{name}'].item():.2f}" for name in engagements
            )
            if rank == 0:
                (progress.write if progress else print)(line)
        if progress:
            progress.update(1)
    if progress:
        progress.close()
    # DDP's reducer must be gone before its process group is: gloo can abort otherwise.
    del model, optimizer
    gc.collect()
    rows = []
    if rank == 0:
        elapsed = time.perf_counter() - started
        print(
            f"\ntrained {args.steps} steps x {args.batch_size} rows x {world} rank(s) in {elapsed:.1f} s, "
            f"weighting {weighting}"
        )
        rows = evaluate(ranker, data, args.holdout, args.seed)
        print_table(rows)
        output = args.output if len(args.weighting) == 1 else args.output.with_stem(f"{args.output.stem}_{weighting}")
        path = plot(curve, output)
        print(f"loss curve: {path.resolve()}" if path else "loss curve: matplotlib not installed, no plot")
    if world > 1:
        dist.barrier()  # the other ranks wait for rank 0's evaluation
    return rows


def gap_closed(trained: float, optimal: float, base: float) -> float:
    """The share of the way from the base-rate loss to the optimal loss that the trained model went."""
    return (base - trained) / (base - optimal) if base > optimal else float("nan")


def print_table(rows: list[tuple[str, float, ...]]) -> None:
    print("\nheld-out loss per task (the training objective: pos_weights, sample weights, mask), and NE")
    print(
        f"{'task':<8} {'positives':>9} {'trained':>9} {'optimal':>9} {'base rate':>10} {'gap closed':>11} "
        f"{'NE':>7} {'NE opt.':>7} {'calibr.':>7}"
    )
    for name, rate, trained, optimal, base, ne, ne_optimal, calibration in rows:
        closed = gap_closed(trained, optimal, base)
        print(
            f"{name:<8} {rate:>9.1%} {trained:>9.4f} {optimal:>9.4f} {base:>10.4f} {closed:>10.0%} "
            f"{ne:>7.4f} {ne_optimal:>7.4f} {calibration:>7.3f}"
        )
    print("optimal: the generating model's own loss (Bayes-optimal); base rate: the best constant prediction")
    classes = " / ".join(name for name, _ in FEEDBACK_CLASSES)
    print(f"{FEEDBACK}: multi-class ({classes}): positives = any negative feedback, NE = cross-entropy over the")
    print("entropy of the class shares, calibr. = predicted over observed negative feedback")
    print("NE: log loss of the probabilities over that of the positive rate (1 = base rate; lower is better),")
    print("for the trained model and the Bayes-optimal one; calibr.: predicted over observed positives")
    print("(of the final model; the training log's window values average the models of the last steps)")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    tables = {weighting: train(args, weighting) for weighting in args.weighting}
    if len(tables) > 1 and all(tables.values()):  # rank 0
        print_comparison({name: {row[0]: gap_closed(*row[2:5]) for row in rows} for name, rows in tables.items()})
    if dist.is_initialized():
        dist.barrier()  # all ranks tear down together
        dist.destroy_process_group()
    return 0
