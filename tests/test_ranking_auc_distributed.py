"""AUC, PR-AUC, gauc and NDCG on 2 and 3 real gloo ranks: one process's values, one collective, resumes.

Every batch is made from (phase, rank, step); groups are per update, so one process fed every
rank's batches as separate updates holds the same sums (histograms and group sums alike).
"""

import math
import warnings
from pathlib import Path

import pytest
import torch

from losses import MultiTaskRankingMetrics
from tests.conftest import run_on_ranks
from tests.test_distributed import CountingCollectives

TASKS = ["click", "fav"]
RATES = [1.0, 0.5]
OPTIONS = {"neg_sampling_rates": RATES, "auc_bins": 512, "ndcg_k": (3, 10), "window": 120}
STEPS = {"A": 6, "B": 12}


def batch(phase, rank, step):
    """Uneven sizes by rank and step; groups of about 5 rows with large ids; NaN labels under the mask."""
    size = 12 + 7 * rank + 3 * (step % 3)
    gen = torch.Generator().manual_seed(100_000 * ord(phase) + 1000 * rank + step)
    logits = torch.randn(size, 2, generator=gen, dtype=torch.float64) * 2 - 3
    mask = torch.rand(size, 2, generator=gen) < 0.85
    labels = (torch.rand(size, 2, generator=gen) < torch.sigmoid(logits.float() + 1)).float()
    return {
        "logits": logits,
        "labels": labels.masked_fill(~mask, math.nan),
        "weights": torch.rand(size, generator=gen, dtype=torch.float64) + 0.5,
        "mask": mask,
        "groups": torch.randint(0, size // 5 + 1, (size,), generator=gen) * 1_000_003 + 2**40,
    }


def one_process(parts, window=None):
    metric = MultiTaskRankingMetrics(TASKS, **{**OPTIONS, "window": window})
    for part in parts:
        metric.update(**part)
    return _values(metric)


def _values(metric):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return {key: value.item() for key, value in metric.compute().items()}


def assert_close(actual, wanted, rel=1e-9):
    for key, value in wanted.items():
        assert actual[key] == pytest.approx(value, rel=rel, abs=rel, nan_ok=True), key


def _run(rank, world_size):
    metric = MultiTaskRankingMetrics(TASKS, **{**OPTIONS, "window": 10**6})  # a window that forgets nothing
    with CountingCollectives() as counter:
        for step in range(STEPS["A"]):
            metric.update(**batch("A", rank, step))
        updates = list(counter.calls)
        values = _values(metric)
        computed = list(counter.calls)
    return {"updates": updates, "compute": computed, "values": values, "synced_bytes": metric._pack().nbytes}


@pytest.mark.parametrize("world_size", [2, 3])
def test_uneven_ranks_equal_one_process_in_one_collective(ranks, world_size):
    results = ranks(_run, world_size)
    parts = [batch("A", rank, step) for rank in range(world_size) for step in range(STEPS["A"])]
    wanted = one_process(parts)
    assert not math.isnan(wanted["gauc/fav"])
    assert not math.isnan(wanted["ndcg@3/click"])
    for result in results:
        assert result["updates"] == []
        assert result["compute"] == ["all_reduce"]  # sums, histograms, group sums and their rings
        assert_close(result["values"], wanted)
        assert_close({key.removeprefix("window_"): value for key, value in result["values"].items()}, wanted)
        # 11 copies (lifetime and 10 slots) of 4 x 2 sums, 2 x 2 x 512 bins, 6 x 2 group sums
        assert result["synced_bytes"] == 11 * (8 + 2048 + 12) * 8


def _save(rank, world_size, out_dir):
    metric = MultiTaskRankingMetrics(TASKS, **OPTIONS)
    for step in range(STEPS["A"]):
        metric.update(**batch("A", rank, step))
    values = _values(metric)
    if rank == 0:
        torch.save(metric.state_dict(), Path(out_dir) / "metric.pt")
    return values


def _resume(rank, world_size, out_dir):
    metric = MultiTaskRankingMetrics(TASKS, **OPTIONS)
    metric.load_state_dict(torch.load(Path(out_dir) / "metric.pt", weights_only=False))
    right_after = _values(metric)
    for step in range(STEPS["B"]):
        metric.update(**batch("B", rank, step))
    return {"right_after": right_after, "end": _values(metric)}


@pytest.mark.parametrize(("saved_world", "resumed_world"), [(2, 3), (3, 2)])
def test_resume_on_another_world_size_with_histograms_and_window(tmp_path, saved_world, resumed_world):
    at_save = run_on_ranks(_save, saved_world, str(tmp_path))[0]
    after = run_on_ranks(_resume, resumed_world, str(tmp_path))
    phase_a = [batch("A", rank, step) for rank in range(saved_world) for step in range(STEPS["A"])]
    phase_b = [batch("B", rank, step) for rank in range(resumed_world) for step in range(STEPS["B"])]
    lifetime = {key: value for key, value in one_process(phase_a + phase_b).items() if not key.startswith("window_")}
    # 12 steps of 12 to 35 rows move every ring (slots of 4 to 6 rows) through all its slots: the
    # window then holds each new rank's last 10 updates.
    last = [batch("B", rank, step) for rank in range(resumed_world) for step in range(STEPS["B"] - 10, STEPS["B"])]
    window = {"window_" + key: value for key, value in one_process(last).items()}
    for result in after:
        assert result["right_after"] == pytest.approx(at_save, nan_ok=True)
        assert_close(result["end"], lifetime)
        assert_close(result["end"], window)
