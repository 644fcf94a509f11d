"""Train an MLP ranker on synthetic engagement data with MultiTaskLoss; compare its loss, NE, AUC and calibration
(from MultiTaskRankingMetrics) with those of the Bayes-optimal model, the one that generated the data.

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
from typing import Any, Optional

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
    parser.add_argument("--output", type=Path, default=Path("demo_training.png"), help="PNG of the training curves")
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


@dataclass(frozen=True)
class Ranked:
    """A metric of MultiTaskRankingMetrics that the demo shows: a pair of columns of the final table
    (trained beside Bayes-optimal) and, if logged, a panel of the plot (the training window beside the
    optimum)."""

    key: str  # the metric's name in the keys "<key>/<task>" and "window_<key>/<task>"
    header: str  # over the table's pair of columns
    title: str  # the panel's title
    label: str  # the panel's y-axis label
    digits: int  # decimals in the table
    logged: bool = True  # in the training log and the plot, over the window; else held out only


#: Histogram bins of the ranking metrics' AUC: on the demo's held-out rows within 2e-5 of the exact AUC.
AUC_BINS = 4096

#: The ranking metrics the demo shows; showing one more is one more row.
RANKED = (
    Ranked("ne", "NE", "normalized entropy", "NE (lower is better, 1 = base rate)", 4),
    Ranked("auc", "AUC", "ROC AUC", "AUC (higher is better, 0.5 = random)", 4),
    Ranked("calibration", "calibration", "calibration", "predicted / observed positives", 3),
    # Training rows are independent, without requests: the grouped AUC is held out only.
    Ranked("gauc", "gAUC", "grouped AUC", "mean AUC within requests", 4, logged=False),
)

#: Rows of a held-out request (one user's feed); the grouped AUC is the mean AUC within requests.
REQUEST_ROWS = 16


@dataclass
class Curve:
    """The logged values over training: the global loss per task (``loss/<task>``, ``loss``) and the
    window value of each ranking metric per engagement (``<metric>/<task>``)."""

    steps: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, step: int, *entries: dict[str, torch.Tensor]) -> None:
        self.steps.append(step)
        for entry in entries:
            for name, value in entry.items():
                self.values.setdefault(name, []).append(float(value))


@dataclass(frozen=True)
class Row:
    """One task of the final table, on held-out rows."""

    task: str
    positives: float  # share of labelled rows with a positive (feedback: any negative feedback)
    losses: tuple[float, float, float]  # the training objective of the trained, Bayes-optimal, base-rate model
    trained: dict[str, float]  # a value per RANKED key, of the trained model
    optimal: dict[str, float]  # the same, of the Bayes-optimal model


def _rank_and_world() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_initialized():  # one group for all the weightings trained in turn
            dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _pos_weights(model: EngagementModel, tasks: int) -> list[float]:
    # Up-weight rare positives by the square root of the negative-to-positive odds.
    return [round(math.sqrt((1 - rate) / rate), 2) for _, rate in ENGAGEMENTS[:tasks]]


def _negative_feedback_logit(logits: torch.Tensor) -> torch.Tensor:
    """The binary logit of any negative feedback from the feedback's class logits ``[B, C]``:
    log P(any class but "none") - log P("none")."""
    return torch.logsumexp(logits[:, 1:], dim=1) - logits[:, 0]


def _feedback_ne(logits: torch.Tensor, batch: Batch) -> float:
    """NE of the multi-class feedback task: its weighted cross-entropy over the entropy of the weighted
    class shares."""
    labelled = batch.mask[:, -1]
    classes, weights = batch.labels[labelled, -1].long(), batch.weights[labelled]
    shares = torch.bincount(classes, weights, minlength=len(FEEDBACK_CLASSES)) / weights.sum()
    entropy = -(shares * shares.clamp_min(1e-12).log()).sum()
    cross_entropy = (F.cross_entropy(logits[labelled], classes, reduction="none") * weights).sum() / weights.sum()
    return (cross_entropy / entropy).item()


def _ranking_metrics(tasks: list[str], logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
    """MultiTaskRankingMetrics of the logits of the probabilities ``[B, T + C]`` (the engagements, then the
    feedback's classes, whose binary event is any negative feedback) on ``batch``."""
    engagements = len(tasks) - 1
    binary = torch.cat([logits[:, :engagements], _negative_feedback_logit(logits[:, engagements:])[:, None]], 1)
    labels = torch.cat([batch.labels[:, :engagements], (batch.labels[:, engagements:] > 0).float()], 1)
    # sync_on_compute=False: rank 0 evaluates alone.
    metrics = MultiTaskRankingMetrics(tasks, auc_bins=AUC_BINS, sync_on_compute=False)
    metrics.update(binary, labels, batch.weights, batch.mask, groups=batch.groups)
    return metrics.compute()


def evaluate(ranker: Ranker, data: EngagementModel, rows: int, seed: int) -> list[Row]:
    """Per task on held-out rows: the positive share; the training objective of the trained, Bayes-optimal
    and base-rate models; the RANKED metrics of the trained and the Bayes-optimal model."""
    batch = data.sample(rows, torch.Generator().manual_seed(seed + 10_000), request_rows=REQUEST_ROWS)
    # Rank 0 evaluates alone, so a loss with normalize="global" (a collective) will not do.
    loss = MultiTaskLoss(ranker.specs)
    tasks = [spec.name for spec in ranker.specs]  # the engagements, then the feedback
    engagements = len(tasks) - 1
    log_pos_weight = loss.pos_weight[:engagements].log()
    # Under pos_weight p the loss-minimizing probability is p*q / (p*q + 1 - q) for the true q: the
    # true logit shifted by log p (the feedback's logits are not shifted). The best constant is the
    # base rate shifted the same way, and the class shares for the feedback.
    shift = torch.cat([log_pos_weight, torch.zeros(len(FEEDBACK_CLASSES))])
    rate = torch.nanmean(batch.labels[:, :engagements], dim=0)
    feedback = batch.labels[batch.mask[:, -1], -1].long()
    shares = torch.bincount(feedback, minlength=len(FEEDBACK_CLASSES)).float() / feedback.numel()
    constant = torch.cat([torch.log(rate / (1 - rate)), shares.log()]) + shift
    positives = torch.cat([rate, 1 - shares[:1]])
    inputs = (batch.labels, batch.weights, batch.mask)
    with torch.no_grad():
        logits = ranker.tower(batch.features)
        losses = [loss(x, *inputs) for x in (logits, batch.true_logits + shift, constant.expand_as(logits))]
        # The ranking metrics judge probabilities: the trained logits lose the log(pos_weight) shift
        # the loss taught them. Both models go through the same library metric.
        probability_logits = {"trained": logits - shift, "optimal": batch.true_logits}
        ranked = {model: _ranking_metrics(tasks, x, batch) for model, x in probability_logits.items()}
        # The feedback's NE is that of its own multi-class objective, not of the binary event.
        feedback_ne = {model: _feedback_ne(x[:, engagements:], batch) for model, x in probability_logits.items()}
    table = []
    for t, task in enumerate(tasks):
        values = {
            model: {metric.key: ranked[model][f"{metric.key}/{task}"].item() for metric in RANKED}
            for model in probability_logits
        }
        if task == FEEDBACK:
            for model, ne in feedback_ne.items():
                values[model]["ne"] = ne
        trained, optimal, base = (result[f"loss/{task}"].item() for result in losses)
        table.append(Row(task, positives[t].item(), (trained, optimal, base), values["trained"], values["optimal"]))
    return table


def _panel_grid(panels: int) -> tuple[int, int]:
    return (1, panels) if panels <= 3 else (math.ceil(panels / 2), 2)


def figure(curve: Curve, rows: list[Row], title: str) -> Any:
    """The training curves as a ``matplotlib`` figure: a panel for the loss and one per logged RANKED metric,
    each task in its own colour, solid over training, dashed at the Bayes-optimal model's held-out value."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    panels = [("loss", "loss per task", "training objective"), *((m.key, m.title, m.label) for m in RANKED if m.logged)]
    grid = _panel_grid(len(panels))
    fig, axes = plt.subplots(*grid, figsize=(5.4 * grid[1], 3.5 * grid[0] + 1.0), sharex=True, squeeze=False)
    # The logged "loss" is the plain mean of the task losses (black); its optimum is the mean of theirs.
    colours = {**{row.task: f"C{t}" for t, row in enumerate(rows)}, "loss": "black"}
    optimum = {metric.key: {row.task: row.optimal[metric.key] for row in rows} for metric in RANKED}
    optimum["loss"] = {row.task: row.losses[1] for row in rows}
    optimum["loss"]["loss"] = sum(row.losses[1] for row in rows) / len(rows)
    for ax, (key, panel_title, label) in zip(axes.flat[: len(panels)], panels, strict=True):
        for task, colour in colours.items():
            name = "loss" if key == task == "loss" else f"{key}/{task}"
            if name not in curve.values:
                continue
            width = 2.2 if task == "loss" else 1.5
            ax.plot(curve.steps, curve.values[name], color=colour, linewidth=width)
            ax.axhline(optimum[key][task], color=colour, linestyle="--", linewidth=width * 0.7, alpha=0.8)
        ax.set_title(panel_title, fontsize=11)
        ax.set_ylabel(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=9)
    for ax in axes.flat[len(panels) :]:
        fig.delaxes(ax)
    for ax in axes[-1]:
        ax.set_xlabel("training step", fontsize=10)
    fig.suptitle(title, fontsize=12)
    tasks = [Line2D([], [], color=colour, linewidth=2) for colour in colours.values()]
    names = [task if task != "loss" else "mean of the tasks" for task in colours]
    fig.legend(tasks, names, loc="lower center", bbox_to_anchor=(0.5, 0.04), ncol=len(names), fontsize=9, frameon=False)
    styles = [Line2D([], [], color="grey", linewidth=1.6, linestyle=style) for style in ("-", "--")]
    kinds = ["trained model, over the last logging window", "Bayes-optimal model (the generating one), held out"]
    fig.legend(styles, kinds, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.9 / (3.5 * grid[0] + 1.0), 1, 1))
    return fig


def plot(curve: Curve, rows: list[Row], title: str, path: Path) -> Optional[Path]:
    """Save :func:`figure` as a PNG at ``path``; ``None`` without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = figure(curve, rows, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def train(args: argparse.Namespace, weighting: str = "equal") -> list[Row]:
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
    ranking = MultiTaskRankingMetrics(engagements, window=args.log_every * args.batch_size * world, auc_bins=AUC_BINS)
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
            curve.add(
                step,
                window,
                {f"{m.key}/{t}": ranked[f"window_{m.key}/{t}"] for m in RANKED if m.logged for t in engagements},
            )
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
            line += (
                "\n"
                + " " * 13
                + "AUC "
                + ", ".join(f"{name} {ranked[f'window_auc/{name}'].item():.3f}" for name in engagements)
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
        title = (
            f"Multi-task ranker on synthetic engagements, {args.steps} steps x {args.batch_size} rows x {world} "
            f"rank(s), weighting {weighting}"
        )
        path = plot(curve, rows, title, output)
        print(f"training curves: {path.resolve()}" if path else "training curves: matplotlib not installed, no plot")
    if world > 1:
        dist.barrier()  # the other ranks wait for rank 0's evaluation
    return rows


def gap_closed(trained: float, optimal: float, base: float) -> float:
    """The share of the way from the base-rate loss to the optimal loss that the trained model went."""
    return (base - trained) / (base - optimal) if base > optimal else float("nan")


def print_table(rows: list[Row]) -> None:
    print("\nheld-out loss per task (the training objective: pos_weights, sample weights, mask)")
    print(f"{'task':<8} {'positives':>9} {'trained':>9} {'optimal':>9} {'base rate':>10} {'gap closed':>11}")
    for row in rows:
        trained, optimal, base = row.losses
        closed = gap_closed(*row.losses)
        print(f"{row.task:<8} {row.positives:>9.1%} {trained:>9.4f} {optimal:>9.4f} {base:>10.4f} {closed:>10.0%}")
    print("optimal: the generating model's own loss (Bayes-optimal); base rate: the best constant prediction")
    print("\nheld-out ranking metrics per task (MultiTaskRankingMetrics), of the trained and the Bayes-optimal model")
    print((" " * 8 + "".join(f" {metric.header:^17}" for metric in RANKED)).rstrip())
    print(f"{'task':<8}" + f" {'trained':>8} {'optimal':>8}" * len(RANKED))
    for row in rows:
        print(
            f"{row.task:<8}"
            + "".join(
                f" {row.trained[metric.key]:>8.{metric.digits}f} {row.optimal[metric.key]:>8.{metric.digits}f}"
                for metric in RANKED
            )
        )
    classes = " / ".join(name for name, _ in FEEDBACK_CLASSES)
    print("NE: log loss of the probabilities over that of the positive rate (1 = base rate; lower is better);")
    print("calibration: predicted over observed positives (of the final model; the training log's window")
    print("values average the models of the last steps)")
    print(f"AUC: over all held-out rows; gAUC: the mean AUC within requests of {REQUEST_ROWS} rows (one user's feed,")
    print("whose rows share half their feature variance), weighted by their labelled weight, over the requests")
    print("that hold a positive and a negative; what tells a user's items apart, without what tells users apart")
    print(f"{FEEDBACK}: multi-class ({classes}); positives, AUC, calibration and gAUC are those of any negative")
    print("feedback (the binary event), NE is the cross-entropy over the entropy of the class shares")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    tables = {weighting: train(args, weighting) for weighting in args.weighting}
    if len(tables) > 1 and all(tables.values()):  # rank 0
        print_comparison({name: {row.task: gap_closed(*row.losses) for row in rows} for name, rows in tables.items()})
    if dist.is_initialized():
        dist.barrier()  # all ranks tear down together
        dist.destroy_process_group()
    return 0
