"""The demo runs end to end, on one process and under torchrun on two, and reports a sensible table."""

import re
import sys

import pytest

TIMEOUT = 180
ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def _table(output):
    rows = re.findall(r"^(\w+)\s+([\d.]+)%\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+", output, flags=re.MULTILINE)
    return {name: tuple(float(v) for v in values) for name, *values in rows}


def test_demo_trains_towards_the_optimal_loss(tmp_path, command):
    plot = tmp_path / "curve.png"
    output = command(
        [sys.executable, "-m", "demo", "--steps", "300", "--holdout", "20000", "--no-progress", "--output", str(plot)],
        ENV,
        TIMEOUT,
    )
    table = _table(output)
    assert list(table) == ["click", "fav", "repost", "reply", "share"]
    for name, (_, trained, optimal, base) in table.items():
        assert optimal < trained < base, name
    assert "step   300: global loss" in output
    if "matplotlib not installed" not in output:
        assert plot.stat().st_size > 10_000


def test_demo_under_torchrun_shows_local_and_global_losses(tmp_path, command):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    output = command(
        [
            *torchrun,
            "-m",
            "demo",
            "--steps",
            "100",
            "--log-every",
            "50",
            "--holdout",
            "5000",
            "--tasks",
            "3",
            "--no-progress",
            "--output",
            str(tmp_path / "curve.png"),
        ],
        ENV,
        TIMEOUT,
    )
    lines = re.findall(r"step\s+(\d+): global loss ([\d.]+) \| rank (\d) local ([\d.]+)", output)
    assert {(step, rank) for step, _, rank, _ in lines} == {("50", "0"), ("50", "1"), ("100", "0"), ("100", "1")}
    for step in ("50", "100"):
        at_step = [(float(g), float(local)) for s, g, _, local in lines if s == step]
        # Equal batch sizes: the global loss is the mean of the two ranks' own means.
        assert at_step[0][0] == pytest.approx((at_step[0][1] + at_step[1][1]) / 2, abs=2e-4)
    assert list(_table(output)) == ["click", "fav", "repost"]
