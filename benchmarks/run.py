"""`make bench`: MultiTaskLoss against the ancestor's loop and the fused floor, and metric sync cost.

Every number is a ratio of medians measured in this one process with interleaved rounds, so the
machine's speed cancels out. Writes the tables to docs/performance.md (``--output``).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import torchmetrics

import losses
from benchmarks.memory import peak_bytes
from benchmarks.mixed import bench_mixed, check_mixed, render_mixed
from benchmarks.ranking import bench_ranking, check_ranking, render_ranking
from benchmarks.ranking_losses import bench_ranking_losses, check_ranking_losses, render_ranking_losses
from benchmarks.references import ancestor_loop, fused_floor
from benchmarks.timing import interleaved_medians
from losses import MultiTaskGlobalLoss, MultiTaskLoss

BATCHES = (512, 4096, 65536)
TASK_COUNTS = (1, 4, 16, 64)
SYNC_TASK_COUNTS = (1, 64, 512)


def _inputs(batch: int, tasks: int, seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    rates = torch.logspace(-0.5, -2.3, tasks)  # positive rates from about 30% down to 0.5%
    data = {
        "logits": torch.randn(batch, tasks, generator=gen).requires_grad_(),
        "labels": (torch.rand(batch, tasks, generator=gen) < rates).float(),
        "weights": torch.rand(batch, tasks, generator=gen) + 0.5,
        "mask": torch.rand(batch, tasks, generator=gen) < 0.8,
        "pos_weights": (1.0 / rates).sqrt().tolist(),
    }
    # Unlabelled entries hold NaN labels, as a data pipeline writes them: the mask must select
    # them out, a multiply by the mask would not (NaN * 0 is NaN).
    data["masked_labels"] = torch.where(data["mask"], data["labels"], float("nan"))
    return data


def _backward_step(logits: torch.Tensor, forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        logits.grad = None
        forward().backward()

    return step


def _candidates(batch: int, tasks: int, compiled: bool) -> dict[str, Callable[[], None]]:
    data = _inputs(batch, tasks)
    x, y, w, m = data["logits"], data["labels"], data["weights"], data["mask"]
    y_nan = data["masked_labels"]
    names = [f"task{i}" for i in range(tasks)]
    loss = MultiTaskLoss(names, pos_weights=data["pos_weights"])
    steps = {
        "loop": _backward_step(x, lambda: ancestor_loop(x, y, w, names, data["pos_weights"])["loss"]),
        "floor": _backward_step(x, lambda: fused_floor(x, y)),
        "ours": _backward_step(x, lambda: loss(x, y, w)["loss"]),
        "ours_mask": _backward_step(x, lambda: loss(x, y_nan, w, m)["loss"]),
    }
    if compiled:
        torch._dynamo.reset()  # each shape compiles afresh, within dynamo's recompile limit
        fast = torch.compile(loss, dynamic=False)
        steps["compiled"] = _backward_step(x, lambda: fast(x, y, w)["loss"])
        steps["compiled_mask"] = _backward_step(x, lambda: fast(x, y_nan, w, m)["loss"])
    return steps


def measure_memory(batch: int, tasks: int) -> dict[str, Optional[float]]:
    """Peak extra memory of floor, ours and ours with a mask, in units of one ``[B, T]`` float32 tensor."""
    steps = _candidates(batch, tasks, compiled=False)
    unit = batch * tasks * 4
    # Only allocations of at least a quarter unit count (a bool [B, T] mask is one quarter):
    # per-task sums, counts and scalars are O(T) bytes, not [B, T] tensors.
    peaks = {name: peak_bytes(steps[name], min_size=unit // 4) for name in ("floor", "ours", "ours_mask")}
    return {name: None if peak is None else peak / unit for name, peak in peaks.items()}


def bench_losses(compiled: bool, rounds: int) -> list[dict[str, Any]]:
    shapes = [(batch, tasks) for batch in BATCHES for tasks in TASK_COUNTS]
    # Memory first, in a process that has compiled nothing yet: the profiler's memory timeline
    # has been seen to lose allocations after many compiled runs.
    memory = {shape: measure_memory(*shape) for shape in shapes}
    rows = []
    for batch, tasks in shapes:
        seconds = interleaved_medians(_candidates(batch, tasks, compiled), rounds)
        rows.append({"B": batch, "T": tasks, "seconds": seconds, "memory": memory[(batch, tasks)]})
        print(
            f"  B={batch:>6} T={tasks:>3}: ours/floor {seconds['ours'] / seconds['floor']:.2f}, "
            f"loop/ours {seconds['loop'] / seconds['ours']:.1f}",
            flush=True,
        )
    return rows


def _sync_on_rank(
    rank: int, world_size: int, task_counts: tuple[int, ...], repeats: int
) -> dict[int, dict[str, float]]:
    import torch.distributed as dist

    results = {}
    for tasks in task_counts:
        metric = MultiTaskGlobalLoss([f"task{i}" for i in range(tasks)])
        losses_ = {key: torch.tensor(0.5) for key in metric.result_keys}
        # The same bytes as the metric's one packed sync: every sum state, float64.
        numbers = sum(getattr(metric, name).numel() for name in metric.sum_state_names)
        reference = torch.zeros(numbers, dtype=torch.float64)
        times: dict[str, list[float]] = {"update": [], "compute": [], "all_reduce": [], "by_hand": []}
        states = [getattr(metric, name) for name in metric.sum_state_names]
        keys = metric.result_keys
        for _ in range(repeats):
            dist.barrier()  # start each call together, so waiting for the other rank is not timed
            start = time.perf_counter()
            metric.update(losses_, weight=64)
            times["update"].append(time.perf_counter() - start)
            dist.barrier()
            start = time.perf_counter()
            metric.compute()  # syncs all states across ranks
            times["compute"].append(time.perf_counter() - start)
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(reference)  # the least a sync of these numbers can cost
            times["all_reduce"].append(time.perf_counter() - start)
            dist.barrier()
            start = time.perf_counter()
            _sync_by_hand(states, keys)
            times["by_hand"].append(time.perf_counter() - start)
        results[tasks] = {kind: statistics.median(values) for kind, values in times.items()}
    return results


def _sync_by_hand(states: list[torch.Tensor], keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The least a sync that returns this metric's result can do, written by hand with no metric
    around it: pack the states, one all_reduce, divide, one scalar tensor per key."""
    import torch.distributed as dist

    packed = torch.cat([state.reshape(-1) for state in states])
    dist.all_reduce(packed)
    return dict(zip(keys, (packed[:-2] / packed[-2]).unbind(), strict=False))


def bench_sync(repeats: int) -> Optional[dict[int, dict[str, float]]]:
    from tests.conftest import run_on_ranks  # the same gloo rank runner the tests use

    per_rank = run_on_ranks(_sync_on_rank, 2, SYNC_TASK_COUNTS, repeats, timeout=300)
    return {
        tasks: {
            kind: max(rank[tasks][kind] for rank in per_rank) for kind in ("update", "compute", "all_reduce", "by_hand")
        }
        for tasks in SYNC_TASK_COUNTS
    }


def check_sync(sync: dict[int, dict[str, float]]) -> list[str]:
    """The sync target of the metrics issue: compute with sync within 1.5x one all_reduce of its bytes."""
    lines = []
    for tasks, cost in sync.items():
        ratio = cost["compute"] / cost["all_reduce"]
        lines.append(
            f"{'PASS' if ratio <= 1.5 else 'FAIL'}  T={tasks}: compute with sync / all_reduce {ratio:.2f} <= 1.5"
        )
    return lines


def main_sync_only(output: Path) -> int:
    """``--only-sync``: the metric sync table and its target, written to ``output``."""
    sync = bench_sync(repeats=200)
    assert sync is not None
    text = render([], sync, compiled=False).split("## MultiTaskGlobalLoss", 1)[1]
    targets = check_sync(sync)
    text = "## MultiTaskGlobalLoss" + text + "\n## Targets\n\n" + "\n".join(f"- {line}" for line in targets) + "\n"
    print(text)
    output.write_text(text)
    return 0 if all(line.startswith("PASS") for line in targets) else 1


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {torch.get_num_threads()} threads; Python {platform.python_version()}, torch {torch.__version__}, "
        f"torchmetrics {torchmetrics.__version__}, losses {losses.__version__}; "
        f"{datetime.date.today().isoformat()}"
    )


def render(rows: list[dict[str, Any]], sync: Optional[dict[int, dict[str, float]]], compiled: bool) -> str:
    out = [
        "# Performance",
        "",
        f"Measured by `make bench` on {_machine()}.",
        "",
        "Forward and backward of the loss, float32, eager unless stated. Each cell is a ratio of the median",
        "time per call over interleaved rounds in one process. `ours` is `MultiTaskLoss` with pos_weights and",
        "per-sample weights; `loop` is the ancestor's per-task loop with the same inputs; `floor` is one",
        "unweighted `binary_cross_entropy_with_logits` over the `[B, T]` block (mean, backward), which",
        "gives no per-task values, weights or masks. `mask` adds a mask with 80% of entries labelled, the",
        "unlabelled entries holding NaN labels.",
        "",
    ]
    header = "| B | T | floor (µs) | ours / floor | loop / ours | mask / floor |"
    rule = "| ---: | ---: | ---: | ---: | ---: | ---: |"
    if compiled:
        header += " compiled / floor | compiled mask / floor |"
        rule += " ---: | ---: |"
    out += [header, rule]
    for row in rows:
        s = row["seconds"]
        line = (
            f"| {row['B']} | {row['T']} | {s['floor'] * 1e6:.0f} | {s['ours'] / s['floor']:.2f} | "
            f"{s['loop'] / s['ours']:.1f} | {s['ours_mask'] / s['floor']:.2f} |"
        )
        if compiled:
            line += f" {s['compiled'] / s['floor']:.2f} | {s['compiled_mask'] / s['floor']:.2f} |"
        out.append(line)
    out += [
        "",
        "Reading the table: below about 100k entries a call costs tens of microseconds whatever it",
        "computes, so the ratios there measure per-call overhead (Python, dispatch, one autograd node",
        "against torch's C++ one) more than arithmetic; `torch.compile` adds its own per-call runtime",
        "and pays off only for large blocks. With one task and no mask, `MultiTaskLoss` calls torch's fused",
        "BCE directly.",
        "",
        "Passes over the `[B, T]` block (one element-wise kernel or reduction reading or writing it; the",
        "floor's are torch's own). Without a mask, forward: 6 for the element loss (`1 + (p - 1) y`,",
        "`log sigmoid(x)`, their product, `1 - y`, times `x`, the difference), 1 weight multiply, 1 per-task",
        "column sum; backward: 5 (`sigmoid(x)`, the `lerp` with `p`, `- y (...)`, times the per-task",
        "factor, times the weight). A mask adds 5 to the forward: its bytes negated (a pass over one byte",
        "per entry), widened to an all-ones bit mask and converted to floats for the labelled counts (each",
        "writes a full block), the counts' column sum, and a bitwise `and` with the bit mask that zeroes",
        "the unlabelled entries' losses whatever they hold (a NaN label, a NaN logit); and 1 to the",
        "backward, the same `and` on the gradient. A bitwise `and` costs about a multiply, where the",
        "`masked_fill` or `where` it replaces costs about ten, and a bool-to-float conversion about four",
        "times a byte-to-float one. So the forward is 13 passes with a mask against 8 without, the",
        "backward 6 against 5. From 2^21 entries (65536 x 64 here) the kernel runs over",
        "blocks of 2^17 entries with two working buffers of the block's shape, allocated once per call,",
        "and forms the gradient in the forward from the same first pass (`sigmoid(x)` times `1 + (p - 1)",
        "y`, `- p y`, times the weight, the `and`): 12 passes forward and 1 backward (times the per-task",
        "factor) without a mask, 17 and 1 with one (the bit mask is written once per block over a spent",
        "buffer, from the mask's bytes in one pass). About as many passes, but one fresh `[B, T]` buffer",
        "per call (the gradient) instead of six: on this machine a fresh buffer of megabytes costs about",
        "as much as a pass over it, its pages faulted in anew when glibc has handed them back, and the",
        "blocks stay in the cache. Below 2^21 entries blocks do not pay for their Python cost. Narrow",
        "blocks (at most 8 columns from 32768 entries, at most 16 from 262144; contiguous, `[B, T]`",
        "weights) run as `[B / R, R T]` tiles of the same memory with the `[T]` vectors repeated `R`",
        "times: a per-task operand along a short last dimension runs one short loop per row, several",
        "times slower.",
        "",
        "## Peak memory",
        "",
        "Peak bytes allocated during one forward and backward beyond the inputs, in units of one `[B, T]`",
        "float32 tensor, counting allocations of at least a quarter unit (a bool `[B, T]` mask is one",
        "quarter; per-task sums and scalars, O(T) bytes, are left out). The gradient of the logits (one",
        "unit) is included in every column.",
        "",
        "| B | T | floor | ours | ours with mask |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        mem = row["memory"]
        out.append(
            f"| {row['B']} | {row['T']} | {_fmt(mem['floor'])} | {_fmt(mem['ours'])} | {_fmt(mem['ours_mask'])} |"
        )
    if sync is not None:
        out += [
            "",
            "## MultiTaskGlobalLoss on 2 gloo ranks",
            "",
            "Median time per call on the slower rank, the ranks starting each call together: `update`",
            "records one dict of losses; `compute` syncs all states across the ranks (one all_reduce of",
            "them packed into one float64 tensor), divides, and returns T + 1 scalar tensors (made while the",
            "all_reduce is in flight; that hides them only where a core is free for the collective's",
            "threads); `all_reduce` is one plain all_reduce of the same T + 3 float64 numbers: the least a",
            "sync can cost. Target: compute / all_reduce <= 1.5. `by hand` is the same sync written",
            "without a metric (pack, one all_reduce, divide, one scalar tensor per key): on a machine where",
            "the ranks and gloo's threads share the cores, any work next to a collective slows it, so",
            "`compute / by hand` is the metric's own overhead.",
            "",
            "| T | update (µs) | compute with sync (µs) | one all_reduce (µs) | by hand (µs) "
            "| compute / all_reduce | compute / by hand |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for tasks, cost in sync.items():
            out.append(
                f"| {tasks} | {cost['update'] * 1e6:.0f} | {cost['compute'] * 1e6:.0f} | "
                f"{cost['all_reduce'] * 1e6:.0f} | {cost['by_hand'] * 1e6:.0f} | "
                f"{cost['compute'] / cost['all_reduce']:.1f} | {cost['compute'] / cost['by_hand']:.2f} |"
            )
    return "\n".join(out) + "\n"


def plot(rows: list[dict[str, Any]], compiled: bool, path: Path) -> Optional[Path]:
    """Time per call relative to the floor, by shape, as a PNG (if matplotlib is installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series = {"per-task loop": "loop", "MultiTaskLoss": "ours", "with mask": "ours_mask"}
    if compiled:
        series["torch.compile"] = "compiled"
    labels = [f"{row['B']}x{row['T']}" for row in rows]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(11, 4))
    for index, (name, key) in enumerate(series.items()):
        ratios = [row["seconds"][key] / row["seconds"]["floor"] for row in rows]
        ax.bar([i + (index - (len(series) - 1) / 2) * width for i in range(len(rows))], ratios, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(2.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), labels, rotation=45, fontsize=8)
    ax.set_xlabel("B x T")
    ax.set_ylabel("time / floor (log scale)")
    ax.set_title("Forward + backward time relative to one unweighted fused BCE call (dashed: the 2x target)")
    fig.legend(loc="lower center", fontsize=8, ncol=len(series), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def check_targets(rows: list[dict[str, Any]], compiled: bool) -> list[str]:
    """The targets of the speed issue, each as a PASS or FAIL line."""
    by_shape = {(row["B"], row["T"]): row["seconds"] for row in rows}
    lines = []

    def check(label: str, ok: bool) -> None:
        lines.append(f"{'PASS' if ok else 'FAIL'}  {label}")

    for (batch, tasks), speedup, floor in (((4096, 64), 5.0, 2.0), ((65536, 16), 2.5, 2.0)):
        s = by_shape[(batch, tasks)]
        check(
            f"B={batch}, T={tasks}: loop/ours {s['loop'] / s['ours']:.1f} >= {speedup}",
            s["loop"] / s["ours"] >= speedup,
        )
        check(
            f"B={batch}, T={tasks}: ours/floor {s['ours'] / s['floor']:.2f} <= {floor}", s["ours"] / s["floor"] <= floor
        )
    slowest = min(rows, key=lambda row: row["seconds"]["loop"] / row["seconds"]["ours"])
    ratio = slowest["seconds"]["loop"] / slowest["seconds"]["ours"]
    check(
        f"never slower than the loop: worst loop/ours {ratio:.2f} at B={slowest['B']}, T={slowest['T']}", ratio >= 1.0
    )
    if compiled:
        for row in rows:
            if row["B"] == 65536 and row["T"] >= 16:
                r = row["seconds"]["compiled"] / row["seconds"]["floor"]
                check(f"compiled B=65536, T={row['T']}: compiled/floor {r:.2f} <= 1.2", r <= 1.2)
    for row in rows:
        if row["B"] * row["T"] >= 65536:
            r = row["seconds"]["ours_mask"] / row["seconds"]["floor"]
            check(f"B={row['B']}, T={row['T']}: mask/floor {r:.2f} <= 2.0 (NaN labels at unlabelled entries)", r <= 2.0)
    worst = max((row["memory"]["ours"] or 0.0) for row in rows)
    worst_mask = max((row["memory"]["ours_mask"] or 0.0) for row in rows)
    check(f"peak extra memory {worst:.2f} <= 3 [B, T] tensors", worst <= 3.0)
    check(f"peak extra memory with a mask {worst_mask:.2f} <= 3 [B, T] tensors", worst_mask <= 3.0)
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("docs/performance.md"), help="markdown file to write")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds (default 9)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    parser.add_argument("--no-sync", action="store_true", help="skip the 2-rank metric sync benchmark")
    parser.add_argument("--only-sync", action="store_true", help="run the 2-rank metric sync benchmark alone")
    parser.add_argument("--no-ranking", action="store_true", help="skip the ranking metrics benchmark")
    parser.add_argument("--no-mixed", action="store_true", help="skip the mixed task kinds benchmark")
    parser.add_argument("--no-ranking-losses", action="store_true", help="skip the ranking losses benchmark")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    compiled = not args.no_compile
    if args.only_sync:
        return main_sync_only(args.output)
    print("MultiTaskLoss forward + backward:", flush=True)
    rows = bench_losses(compiled, args.rounds)
    sync = None if args.no_sync else bench_sync(repeats=200)
    text = render(rows, sync, compiled)
    figure = plot(rows, compiled, args.output.parent / "_static" / "performance.png")
    if figure is not None:
        text = text.replace("\n| B | T |", "\n![time relative to the floor](_static/performance.png)\n\n| B | T |", 1)
    targets = check_targets(rows, compiled)
    if sync is not None:
        targets += check_sync(sync)
    if not args.no_ranking:
        ranking = bench_ranking(args.rounds)
        text += render_ranking(ranking)
        targets += check_ranking(ranking)
    if not args.no_mixed:
        mixed = bench_mixed(args.rounds)
        text += render_mixed(mixed)
        targets += check_mixed(mixed)
    if not args.no_ranking_losses:
        ranking_losses = bench_ranking_losses(args.rounds)
        text += render_ranking_losses(ranking_losses)
        targets += check_ranking_losses(ranking_losses)
    text += "\n## Targets\n\n" + "\n".join(f"- {line}" for line in targets) + "\n"
    print(text)
    args.output.write_text(text)
    print(f"written to {args.output}")
    return 0 if all(line.startswith("PASS") for line in targets) else 1


if __name__ == "__main__":
    raise SystemExit(main())
