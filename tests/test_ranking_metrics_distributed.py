"""MultiTaskRankingMetrics on 2 and 3 real gloo ranks: one process's values, one collective, resumes.

Every batch is made from (phase, rank, step), so the test process rebuilds any rank's data and
compares with one process fed the concatenation, or with the per-rank windows the docs promise.
"""

import math
import warnings
from pathlib import Path

import pytest
import torch

from losses import MultiTaskRankingMetrics, sync_for_checkpoint
from losses.ranking_functional import ranking_compute
from tests.conftest import run_on_ranks
from tests.ranking_reference import reference_metrics
from tests.test_distributed import CountingCollectives

TASKS = ["click", "fav", "reply"]
RATES = [0.5, 0.25, 1.0]
WINDOW = 120  # divisible by 1, 2 and 3 ranks and by the 10 slots: a slot is 12 / W rows on W ranks
STEPS = {"A": 9, "B": 30}


def batch(phase, rank, step, size=None):
    """One float64 batch: sizes differ by rank and step (uneven), NaN labels under the mask.

    float64, so that comparisons can be tight: float32 transcendental functions round differently
    in vectorized and scalar loops, so a block split differently differs in the last float32 bit.
    """
    size = 4 + 3 * rank + step % 3 if size is None else size
    gen = torch.Generator().manual_seed(100_000 * ord(phase) + 1000 * rank + step)
    mask = torch.rand(size, 3, generator=gen) < 0.85
    labels = (torch.rand(size, 3, generator=gen) < 0.35).float()
    return {
        "logits": torch.randn(size, 3, generator=gen, dtype=torch.float64) * 2 - 1,
        "labels": labels.masked_fill(~mask, math.nan),
        "weights": torch.rand(size, generator=gen, dtype=torch.float64) + 0.5,
        "mask": mask,
    }


def batches(phase, ranks, equal=False):
    return [batch(phase, rank, step, 6 if equal else None) for rank in ranks for step in range(STEPS[phase])]


def reference(parts, prefix=""):
    data = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    return reference_metrics(TASKS, data["logits"], data["labels"], data["weights"], data["mask"], RATES, prefix)


def per_rank_windows(phase, world, start=None, equal=False):
    """The window the docs promise on ``world`` ranks: every rank's own ring of the same slot size.

    A one-process metric with window ``WINDOW / world`` has the slot size of one of ``world``
    ranks; ``start`` is the ring position the ranks resumed at.
    """
    total = None
    for rank in range(world):
        alone = MultiTaskRankingMetrics(TASKS, window=WINDOW // world, neg_sampling_rates=RATES)
        if start is not None:
            alone.set_extra_state(start)
        for step in range(STEPS[phase]):
            alone.update(**batch(phase, rank, step, 6 if equal else None))
        ring = alone.window_sums.sum(0)
        total = ring if total is None else total + ring
    return {key: value.item() for key, value in ranking_compute(total, TASKS, prefix="window_", warn=False).items()}


def assert_close(actual, wanted, rel=1e-10):
    for key, value in wanted.items():
        assert actual[key] == pytest.approx(value, rel=rel, abs=rel, nan_ok=True), key


def _values(metric):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return {key: value.item() for key, value in metric.compute().items()}


def _uneven_run(rank, world_size, equal):
    metric = MultiTaskRankingMetrics(TASKS, window=WINDOW, neg_sampling_rates=RATES)
    with CountingCollectives() as counter:
        for step in range(STEPS["A"]):
            metric.update(**batch("A", rank, step, 6 if equal else None))
        updates = list(counter.calls)
        values = _values(metric)
        computed = list(counter.calls)
    forward_metric = MultiTaskRankingMetrics(TASKS, neg_sampling_rates=RATES, dist_sync_on_step=True)
    step_value = {key: value.item() for key, value in forward_metric(**batch("A", rank, 0)).items()}
    return {"updates": updates, "compute": computed, "values": values, "step": step_value}


@pytest.mark.parametrize("world_size", [2, 3])
def test_uneven_ranks_give_one_process_values_in_one_collective(ranks, world_size):
    results = ranks(_uneven_run, world_size, False)
    wanted = reference(batches("A", range(world_size)))
    windows = per_rank_windows("A", world_size)
    step = reference([batch("A", rank, 0) for rank in range(world_size)])
    for result in results:
        assert result["updates"] == []
        assert result["compute"] == ["all_reduce"]  # sums and window ring in one collective
        assert_close(result["values"], wanted)
        assert_close(result["values"], windows)
        assert_close(result["step"], step)  # forward with dist_sync_on_step: the global batch


def test_equal_batches_window_equals_one_process_on_the_concatenated_steps(ranks):
    results = ranks(_uneven_run, 2, True)
    alone = MultiTaskRankingMetrics(TASKS, window=WINDOW, neg_sampling_rates=RATES)
    for step in range(STEPS["A"]):
        parts = [batch("A", rank, step, 6) for rank in range(2)]
        alone.update(**{key: torch.cat([part[key] for part in parts]) for key in parts[0]})
    wanted = _values(alone)
    for result in results:
        assert_close(result["values"], wanted)


def _save(rank, world_size, out_dir):
    """Phase A on ``world_size`` ranks, a compute on every rank (the log-then-save habit), rank 0 saves."""
    metric = MultiTaskRankingMetrics(TASKS, window=WINDOW, neg_sampling_rates=RATES)
    for step in range(STEPS["A"]):
        metric.update(**batch("A", rank, step))
    values = _values(metric)
    if rank == 0:
        torch.save(metric.state_dict(), Path(out_dir) / "metric.pt")
    return values


def _resume(rank, world_size, out_dir):
    """Every rank loads rank 0's file, then records phase B."""
    metric = MultiTaskRankingMetrics(TASKS, window=WINDOW, neg_sampling_rates=RATES)
    state = torch.load(Path(out_dir) / "metric.pt", weights_only=False)
    metric.load_state_dict(state)
    position = metric.get_extra_state()
    right_after = _values(metric)
    for step in range(STEPS["B"]):
        metric.update(**batch("B", rank, step))
    return {"position": position, "saved": state["_extra_state"], "right_after": right_after, "end": _values(metric)}


def _in_process(fn, world_size, *args):
    assert world_size == 1
    return [fn(0, 1, *args)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Rank 0's checkpoint after phase A on 1 process (no process group), 2 ranks and 3 ranks."""
    out = {}
    for world in (1, 2, 3):
        path = tmp_path_factory.mktemp(f"ranking{world}")
        values = (_in_process if world == 1 else run_on_ranks)(_save, world, str(path))
        out[world] = (str(path), values[0])
    return out


@pytest.mark.parametrize(("saved_world", "resumed_world"), [(2, 3), (3, 2), (2, 1), (1, 2)])
def test_resume_on_another_world_size_counts_everything_once(saved, saved_world, resumed_world):
    path, at_save = saved[saved_world]
    after = (_in_process if resumed_world == 1 else run_on_ranks)(_resume, resumed_world, path)
    lifetime = reference(batches("A", range(saved_world)) + batches("B", range(resumed_world)))
    for result in after:
        # The saving rank's ring position, on every rank.
        assert result["position"] == result["saved"]
        # Right after the load: exactly the values at the save, the window included.
        assert result["right_after"] == pytest.approx(at_save, nan_ok=True)
        assert_close(result["end"], lifetime)
        # 30 steps move every ring through all its slots: the window is then phase B alone,
        # each rank's ring of the new world size, started at the saved position.
        assert_close(result["end"], per_rank_windows("B", resumed_world, start=after[0]["saved"]))


def _save_mid_epoch(rank, world_size, out_dir):
    """Phase A, then no compute: sync_for_checkpoint on every rank before rank 0 saves (a mid-epoch save)."""
    model = torch.nn.Module()
    model.ranking = MultiTaskRankingMetrics(TASKS, window=WINDOW, neg_sampling_rates=RATES)
    for step in range(STEPS["A"]):
        model.ranking.update(**batch("A", rank, step))
    sync_for_checkpoint(model)
    if rank == 0:
        torch.save(model.ranking.state_dict(), Path(out_dir) / "metric.pt")


def test_a_save_without_compute_resumes_exactly_after_sync_for_checkpoint(tmp_path):
    run_on_ranks(_save_mid_epoch, 2, str(tmp_path))
    after = run_on_ranks(_resume, 3, str(tmp_path))
    phase_a = batches("A", range(2))
    for result in after:
        assert_close(result["right_after"], {**reference(phase_a), **per_rank_windows("A", 2)})
        assert_close(result["end"], reference(phase_a + batches("B", range(3))))
