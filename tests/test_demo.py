"""The demo runs end to end, on one process and under torchrun on two, and reports a sensible table."""

import re
import sys
from pathlib import Path

import pytest

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
    rows = re.findall(r"^(\w+)\s+([\d.]+)%\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+", output, flags=re.MULTILINE)
    return {name: tuple(float(v) for v in values) for name, *values in rows}


def _ranking_columns(output):
    """Per task of the final table: NE of the trained model, of the Bayes-optimal one, calibration."""
    rows = re.findall(
        r"^(\w+)\s+[\d.]+%(?:\s+[\d.]+){3}\s+\d+%\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", output, re.MULTILINE
    )
    return {name: tuple(float(v) for v in values) for name, *values in rows}


def _logged_ranking(output):
    """Per logged step: {task: (window RCE, window calibration)} from the training log."""
    logged = {}
    for step, rce, calibration in re.findall(
        r"^step\s+(\d+): global loss .*\n\s+RCE (.*) \| calibration (.*)$", output, flags=re.MULTILINE
    ):
        rces = dict(item.rsplit(" ", 1) for item in rce.split(", "))
        calibrations = dict(item.rsplit(" ", 1) for item in calibration.split(", "))
        logged[int(step)] = {name: (float(rces[name]), float(calibrations[name])) for name in rces}
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
    ranking = _ranking_columns(output)
    assert list(ranking) == list(table)
    for name, (ne, ne_optimal, calibration) in ranking.items():
        # Better than the base rate (NE 1), not better than the generating model, roughly calibrated.
        assert ne_optimal < ne < 1.0, name
        assert 0.6 < calibration < 1.6, name
    logged = _logged_ranking(output)
    assert sorted(logged) == [100, 200, 300]
    for name, (rce, calibration) in logged[300].items():
        assert 0.0 < rce < 100.0, name
        assert 0.6 < calibration < 1.6, name
    if "matplotlib not installed" not in output:
        assert plot.stat().st_size > 10_000


def test_demo_under_torchrun_shows_local_and_global_losses():
    output = UNDER_TORCHRUN.output()
    lines = re.findall(r"step\s+(\d+): global loss ([\d.]+) \| rank (\d) local ([\d.]+)", output)
    assert {(step, rank) for step, _, rank, _ in lines} == {("50", "0"), ("50", "1"), ("100", "0"), ("100", "1")}
    for step in ("50", "100"):
        at_step = [(float(g), float(local)) for s, g, _, local in lines if s == step]
        # Equal batch sizes: the global loss is the mean of the two ranks' own means.
        assert at_step[0][0] == pytest.approx((at_step[0][1] + at_step[1][1]) / 2, abs=2e-4)
    assert list(_table(output)) == ["click", "fav", "repost", "feedback"]
    assert list(_ranking_columns(output)) == ["click", "fav", "repost", "feedback"]
    # One line of global RCE and calibration per logged step, printed once (rank 0).
    assert sorted(_logged_ranking(output)) == [50, 100]
    assert output.count("| calibration ") == 2


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
