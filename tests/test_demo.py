"""The demo runs end to end, on one process and under torchrun on two, and reports a sensible table."""

import re
import struct
import sys
from pathlib import Path

import matplotlib
import pytest
import torch

from tests.conftest import Launch

TIMEOUT = 180
ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
WEIGHTINGS = ["equal", "uncertainty", "dwa", "rlw", "gls"]

# Each started in the background when these tests are collected (see Launch).
DEMO = [sys.executable, "-m", "demo", "--no-progress", "--output", "{out}/curve.png"]
TRAINING = Launch([*DEMO, "--steps", "300", "--holdout", "20000"], ENV, TIMEOUT)
UNDER_TORCHRUN = Launch(
    [*TORCHRUN, *DEMO[1:], "--steps", "100", "--log-every", "50", "--holdout", "5000", "--tasks", "3"], ENV, TIMEOUT
)
SHORT = ["--steps", "40", "--log-every", "20", "--holdout", "2000", "--tasks", "3"]
WEIGHTING_COMPARISON = Launch([*DEMO, *SHORT, "--weighting", ",".join(WEIGHTINGS)], ENV, TIMEOUT)


def _table(output):
    """Per task of the loss table: positives (%), held-out loss of the trained, optimal and base-rate model."""
    rows = re.findall(r"^(\w+)\s+([\d.]+)%\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+-?\d+%$", output, flags=re.MULTILINE)
    return {name: tuple(float(v) for v in values) for name, *values in rows}


def _ranking_table(output):
    """Per task of the ranking table: {metric: (trained, Bayes-optimal)}, the metrics named by its header."""
    lines = output.split("held-out ranking metrics per task")[1].splitlines()
    metrics, columns = lines[1].split(), lines[2].split()
    assert columns == ["task"] + ["trained", "optimal"] * len(metrics)
    table = {}
    for line in lines[3:]:
        if not re.match(r"^\w+(\s+[\d.]+)+$", line):
            break
        name, *values = line.split()
        table[name] = {metric: (float(values[2 * i]), float(values[2 * i + 1])) for i, metric in enumerate(metrics)}
    return table


def _png_size(path):
    """Width and height of a PNG, from its header."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def _logged_ranking(output):
    """Per logged step: {task: (window RCE, window calibration, window AUC)} from the training log."""
    logged = {}
    for step, *lines in re.findall(
        r"^step\s+(\d+): global loss .*\n\s+RCE (.*) \| calibration (.*)\n\s+AUC (.*)$", output, flags=re.MULTILINE
    ):
        values = [dict(item.rsplit(" ", 1) for item in line.split(", ")) for line in lines]
        logged[int(step)] = {name: tuple(float(entries[name]) for entries in values) for name in values[0]}
    return logged


def test_demo_trains_towards_the_optimal_loss():
    output = TRAINING.output()
    plot = Path(TRAINING.out_dir) / "curve.png"
    table = _table(output)
    # The binary engagements, then the multi-class negative feedback (none / see-less / report).
    assert list(table) == ["click", "fav", "repost", "reply", "share", "feedback"]
    for name, (_, trained, optimal, base) in table.items():
        assert optimal < trained < base, name
    assert 5.0 < table["feedback"][0] < 15.0  # about 10% of impressions get negative feedback
    assert "step   300: global loss" in output
    assert re.search(r"^step   300: global loss .*, share [\d.]+, feedback [\d.]+\)$", output, re.MULTILINE)
    ranking = _ranking_table(output)
    assert list(ranking) == list(table)
    for name, metrics in ranking.items():
        assert list(metrics) == ["NE", "AUC", "calibration", "gAUC"]
        # Better than the base rate (NE 1), not better than the generating model, roughly calibrated;
        # the generating model calibrated up to the noise of about 50 positives (share).
        ne, ne_optimal = metrics["NE"]
        assert ne_optimal < ne < 1.0, name
        # The trained model ranks about as well as the generating one on the same rows, not better
        # (up to the noise of the rare tasks' few positives).
        auc, auc_optimal = metrics["AUC"]
        assert 0.6 < auc_optimal < 0.95, name
        assert auc_optimal - 0.03 < auc < auc_optimal + 0.005, name
        calibration, calibration_optimal = metrics["calibration"]
        assert 0.6 < calibration < 1.6, name
        assert 0.7 < calibration_optimal < 1.3, name
        # Within a request, whose rows share half their feature variance, items are harder to tell
        # apart than across all rows; the trained model again about as good as the generating one.
        gauc, gauc_optimal = metrics["gAUC"]
        assert 0.55 < gauc_optimal < auc_optimal - 0.02, name
        assert gauc_optimal - 0.05 < gauc < gauc_optimal + 0.01, name
    logged = _logged_ranking(output)
    assert sorted(logged) == [100, 200, 300]
    for name, (rce, calibration, auc) in logged[300].items():
        assert 0.0 < rce < 100.0, name
        assert 0.6 < calibration < 1.6, name
        assert ranking[name]["AUC"][1] - 0.1 < auc < 0.95, name
    assert f"training curves: {plot.resolve()}" in output
    width, height = _png_size(plot)
    assert width >= 1000
    assert height >= 400
    assert plot.stat().st_size > 30_000


def test_demo_under_torchrun_shows_local_and_global_losses():
    output = UNDER_TORCHRUN.output()
    lines = re.findall(r"step\s+(\d+): global loss ([\d.]+) \| rank (\d) local ([\d.]+)", output)
    assert {(step, rank) for step, _, rank, _ in lines} == {("50", "0"), ("50", "1"), ("100", "0"), ("100", "1")}
    for step in ("50", "100"):
        at_step = [(float(g), float(local)) for s, g, _, local in lines if s == step]
        # Equal batch sizes: the global loss is the mean of the two ranks' own means.
        assert at_step[0][0] == pytest.approx((at_step[0][1] + at_step[1][1]) / 2, abs=2e-4)
    assert list(_table(output)) == ["click", "fav", "repost", "feedback"]
    assert list(_ranking_table(output)) == ["click", "fav", "repost", "feedback"]
    # One line of global RCE and calibration per logged step, printed once (rank 0).
    assert sorted(_logged_ranking(output)) == [50, 100]
    assert output.count("| calibration ") == 2
    assert len(re.findall(r"^\s+AUC click [\d.]+, fav [\d.]+, repost [\d.]+$", output, re.MULTILINE)) == 2


def test_demo_compares_task_weightings():
    names = WEIGHTINGS
    output = WEIGHTING_COMPARISON.output()
    assert [line.split(", weighting ")[1] for line in output.splitlines() if ", weighting " in line] == names
    # The weightings log the weights they applied; equal weighting has none to log.
    assert output.count("| weights click ") == 2 * (len(names) - 1)
    comparison = output.split("held-out gap closed per task, by weighting")[1].splitlines()
    assert comparison[1].split() == ["task", *names]
    gaps = {row.split()[0]: [float(v.rstrip("%")) for v in row.split()[1:]] for row in comparison[2:7]}
    assert list(gaps) == ["click", "fav", "repost", "feedback", "mean"]
    # Each column is the "gap closed" of that weighting's own table (rounded there to whole percents).
    own = [float(v) for v in re.findall(r"^click\s+[\d.]+%(?:\s+[\d.]+){3}\s+(\d+)%", output, re.MULTILINE)]
    assert own == pytest.approx(gaps["click"], abs=0.5)
    assert all(0 < gap <= 100 for row in gaps.values() for gap in row)


def test_figure_has_a_panel_per_metric_with_the_optimum_as_reference():
    matplotlib.use("Agg")  # before pyplot loads: no display
    import matplotlib.pyplot as plt

    from demo.train import RANKED, Curve, Row, figure

    tasks = ["click", "share", "feedback"]
    logged = [metric for metric in RANKED if metric.logged]  # the held-out-only ones get no panel
    assert [metric.key for metric in logged] == ["ne", "auc", "calibration"]
    curve = Curve()
    for step in (100, 200, 300):
        losses = {f"loss/{task}": torch.tensor(0.5 - step / 1000) for task in tasks}
        ranked = {f"{metric.key}/{task}": torch.tensor(0.8) for metric in logged for task in tasks[:2]}
        curve.add(step, {**losses, "loss": torch.tensor(0.4)}, ranked)
    rows = [
        Row(task, 0.1, (0.5, 0.3 + t / 10, 0.7), {m.key: 0.9 for m in RANKED}, {m.key: 0.8 - t / 10 for m in RANKED})
        for t, task in enumerate(tasks)
    ]
    fig = figure(curve, rows, "title")
    assert len(fig.axes) == 4
    loss_panel, *ranked_panels = fig.axes
    # Solid: a curve per task and the mean; dashed: each one's optimum (the mean's is the mean optimum).
    dashed = [line for line in loss_panel.get_lines() if line.get_linestyle() == "--"]
    assert sorted(line.get_ydata()[0] for line in dashed) == pytest.approx([0.3, 0.4, 0.4, 0.5])
    assert loss_panel.get_title() == "loss per task"
    for ax, metric in zip(ranked_panels, logged, strict=True):
        solid = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
        dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        # The feedback has no training curve of its binary event: only the engagements are drawn.
        assert len(solid) == len(dashed) == 2
        assert [line.get_ydata()[0] for line in dashed] == pytest.approx([0.8, 0.7])
        assert ax.get_title() == metric.title
        assert ax.get_ylabel() == metric.label
    # Two rows of two panels sharing the steps: the bottom row labels them.
    assert [ax.get_xlabel() for ax in fig.axes] == ["", "", "training step", "training step"]
    legends = [[text.get_text() for text in legend.get_texts()] for legend in fig.legends]
    assert legends[0] == [*tasks, "mean of the tasks"]
    assert legends[1] == [
        "trained model, over the last logging window",
        "Bayes-optimal model (the generating one), held out",
    ]
    plt.close(fig)


def test_held_out_requests_share_half_the_feature_variance_and_keep_each_row_as_in_training():
    from demo.data import ENGAGEMENTS, EngagementModel

    data = EngagementModel(tasks=5, features=16, seed=0)
    plain = data.sample(1000, torch.Generator().manual_seed(1))
    single = data.sample(1000, torch.Generator().manual_seed(1), request_rows=1)
    # Rows of their own: the training stream as before, every row its own group.
    assert torch.equal(plain.features, single.features)
    assert torch.equal(single.groups, torch.arange(1000))
    requests = data.sample(64_000, torch.Generator().manual_seed(2), request_rows=16)
    assert torch.equal(requests.groups, torch.arange(64_000) // 16)
    x = requests.features.view(4000, 16, 16)
    # Each feature still has unit variance (so each row's Bayes-optimal model is unchanged); two rows
    # of one request share half of it.
    assert x.var().item() == pytest.approx(1.0, abs=0.02)
    assert (x[:, 0] * x[:, 1]).mean().item() == pytest.approx(0.5, abs=0.02)
    rates = torch.nanmean(requests.labels[:, :2], dim=0)
    assert rates.tolist() == pytest.approx([rate for _, rate in ENGAGEMENTS[:2]], abs=0.01)
