"""Checkpoints of the metrics resume exactly: rank 0 alone, per rank, and on another world size.

Each scenario records losses on W ranks, saves, loads on W' ranks (or one process without a
process group), records more, and compares ``compute()`` with the weighted mean of exactly the
records that must count, computed by hand.
"""

import math
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from losses import GlobalLoss, MultiTaskGlobalLoss, sync_for_checkpoint
from tests.conftest import run_on_ranks

TASKS = ["fav", "reply"]
KEYS = [*(f"loss/{t}" for t in TASKS), "loss"]
SCENARIOS = ("synced", "unsynced", "presave", "reset")


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.tower = nn.Linear(2, 1)
        self.loss = GlobalLoss()
        self.total = GlobalLoss(reduction="sum")
        self.per_task = MultiTaskGlobalLoss(TASKS)


def _records(phase, rank, count=3):
    """(per-task losses, weight) pairs; they differ by phase, rank and step."""
    gen = torch.Generator().manual_seed(1000 * len(phase) + 10 * rank + ord(phase[0]))
    out = []
    for step in range(count + rank):
        per_task = torch.rand(len(TASKS), generator=gen, dtype=torch.float64).tolist()
        out.append((per_task, 4 + 3 * rank + step))
    return out


def _feed(model, records):
    for per_task, weight in records:
        total = sum(per_task) / len(per_task)
        loss = torch.tensor(total, dtype=torch.float64)
        model.loss.update(loss, weight)
        model.total.update(loss, weight)
        values = {key: torch.tensor(v, dtype=torch.float64) for key, v in zip(KEYS, [*per_task, total], strict=True)}
        model.per_task.update(values, weight)


def _compute(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchmetrics' "compute before update" on empty ranks
        out = {"loss": model.loss.compute().item(), "total": model.total.compute().item()}
        out.update({f"per_task/{k}": v.item() for k, v in model.per_task.compute().items()})
    return out


def _expected(records):
    weight = sum(w for _, w in records)
    totals = [sum(p) / len(p) for p, _ in records]
    out = {
        "loss": math.fsum(t * w for t, (_, w) in zip(totals, records, strict=True)) / weight,
        "total": math.fsum(t * w for t, (_, w) in zip(totals, records, strict=True)),
    }
    for i, task in enumerate(TASKS):
        out[f"per_task/loss/{task}"] = math.fsum(p[i] * w for p, w in records) / weight
    out["per_task/loss"] = out["loss"]
    return out


def _save(rank, world_size, out_dir):
    """Every scenario on this world; rank r writes ``<scenario>/rank<r>.pt``."""
    out = Path(out_dir)
    for scenario in SCENARIOS:
        (out / scenario).mkdir(parents=True, exist_ok=True)
        model = _Model()
        _feed(model, _records("A", rank))
        _compute(model)  # a sync on every rank: the usual log-then-save order
        if scenario == "reset":
            for metric in (model.loss, model.total, model.per_task):
                metric.reset()
        if scenario != "synced":
            _feed(model, _records("B", rank))
        if scenario == "presave":
            sync_for_checkpoint(model)
        torch.save(model.state_dict(), out / scenario / f"rank{rank}.pt")
    return True


def _load(rank, world_size, saved_dir, scenario, policy, extra=True):
    model = _Model()
    directory = Path(saved_dir) / scenario
    own = directory / f"rank{rank}.pt"
    path = own if policy == "own" and own.exists() else directory / "rank0.pt"
    model.load_state_dict(torch.load(path, weights_only=True))
    if extra:
        _feed(model, _records("C", rank))
    return _compute(model)


LOADS_ON_TWO = [
    (2, "synced", "rank0"),
    (2, "synced", "own"),
    (2, "unsynced", "rank0"),
    (2, "unsynced", "own"),
    (2, "presave", "rank0"),
    (2, "reset", "rank0"),
    (3, "synced", "own"),
    (3, "synced", "rank0"),
    (1, "synced", "rank0"),
    (1, "unsynced", "rank0"),
]
LOADS_ON_THREE = [
    (2, "synced", "own"),
    (2, "synced", "rank0"),
    (2, "unsynced", "own"),
]


def _load_many(rank, world_size, saved, loads):
    return {load: _load(rank, world_size, saved[load[0]], load[1], load[2]) for load in loads}


def _rank0_saves_alone(rank, world_size, out_dir):
    """Rank 0 calls state_dict() while rank 1 runs no collective: a collective in it would hang."""
    path = Path(out_dir) / "alone.pt"
    model = _Model()
    _feed(model, _records("A", rank))
    if rank == 0:
        torch.save(model.state_dict(), path)
    else:
        deadline = time.monotonic() + 20
        while not path.exists():
            assert time.monotonic() < deadline, "rank 0's state_dict() did not return"
            time.sleep(0.05)
    return path.exists()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoints written by 1 process (no process group), 2 ranks and 3 ranks."""
    dirs = {world: tmp_path_factory.mktemp(f"world{world}") for world in (1, 2, 3)}
    _save(0, 1, dirs[1])
    run_on_ranks(_save, 2, str(dirs[2]), timeout=60)
    run_on_ranks(_save, 3, str(dirs[3]), timeout=60)
    return {world: str(path) for world, path in dirs.items()}


def _records_of(phase, ranks):
    return [r for rank in ranks for r in _records(phase, rank)]


def _expected_after_load(saved_world, scenario, policy, new_world):
    """What must count after the load: the exact global history, or what the rule keeps of it."""
    before = _records_of("A", range(saved_world))
    since_sync = _records_of("B", range(saved_world))
    loaded_ranks = range(min(saved_world, new_world)) if policy == "own" else [0]
    kept_since_sync = _records_of("B", loaded_ranks)
    history = {
        "synced": before,  # saved right after compute(): exact everywhere
        "presave": before + since_sync,  # sync_for_checkpoint() before the save: exact everywhere
        "unsynced": before + kept_since_sync,  # records since the sync count where their rank loads
        "reset": kept_since_sync,  # reset() dropped the synced sums too
    }[scenario]
    return _expected(history + _records_of("C", range(new_world)))


def _assert_values(results, expected):
    for result in results:
        assert result == pytest.approx(expected, rel=1e-12)


def test_checkpoints_on_two_ranks_from_one_two_and_three(saved):
    results = run_on_ranks(_load_many, 2, saved, LOADS_ON_TWO, timeout=60)
    for load in LOADS_ON_TWO:
        saved_world, scenario, policy = load
        _assert_values([r[load] for r in results], _expected_after_load(saved_world, scenario, policy, 2))


def test_checkpoints_on_three_ranks_from_two(saved):
    results = run_on_ranks(_load_many, 3, saved, LOADS_ON_THREE, timeout=60)
    for load in LOADS_ON_THREE:
        saved_world, scenario, policy = load
        _assert_values([r[load] for r in results], _expected_after_load(saved_world, scenario, policy, 3))


@pytest.mark.parametrize(
    ("saved_world", "scenario"), [(2, "synced"), (3, "synced"), (2, "presave"), (2, "unsynced"), (1, "unsynced")]
)
def test_checkpoints_on_one_process_without_a_process_group(saved, saved_world, scenario):
    result = _load(0, 1, saved[saved_world], scenario, "rank0")
    _assert_values([result], _expected_after_load(saved_world, scenario, "rank0", 1))


def test_unsynced_records_of_other_ranks_are_lost_not_doubled(saved):
    # The rule's cost, written down: a rank-0 file saved without a sync lacks rank 1's records
    # since the last sync, and nothing is ever counted twice.
    result = _load(0, 1, saved[2], "unsynced", "rank0", extra=False)
    assert result == pytest.approx(_expected(_records_of("A", [0, 1]) + _records_of("B", [0])), rel=1e-12)
    assert result != pytest.approx(_expected(_records_of("A", [0, 1]) + _records_of("B", [0, 1])), rel=1e-6)


def test_rank0_alone_calls_state_dict_without_hanging(tmp_path):
    assert run_on_ranks(_rank0_saves_alone, 2, str(tmp_path), timeout=40) == [True, True]


def test_state_dict_holds_the_synced_sums_and_the_records_since(saved):
    state = torch.load(Path(saved[2]) / "unsynced" / "rank1.pt", weights_only=True)
    assert int(state["loss.saving_rank"]) == 1
    assert int(state["loss.sum_format"]) == 1
    before, since = _records_of("A", [0, 1]), _records("B", 1)
    synced, unsynced = state["loss.synced_sums"], state["loss.unsynced_sums"]
    # [weighted_sum, total_weight, invalid_weights]
    assert synced[1].item() == sum(w for _, w in before)
    assert unsynced[1].item() == sum(w for _, w in since)
    assert synced[2].item() == unsynced[2].item() == 0


# Version 0.1.0 wrote torchmetrics' plain states: one rank's local sums, no other key. These are
# the exact entries that version's `GlobalLoss` and `MultiTaskGlobalLoss(["fav", "reply"])` wrote
# after update(0.5, 3), update(1.5, 1) and update({fav: 0.25, reply: 0.5, loss: 0.375}, 4).
def _state_of_version_0_1():
    f64 = torch.float64
    return {
        "tower.weight": torch.zeros(1, 2),
        "tower.bias": torch.zeros(1),
        "loss.weighted_sum": torch.tensor(3.0, dtype=f64),
        "loss.total_weight": torch.tensor(4.0, dtype=f64),
        "total.weighted_sum": torch.tensor(3.0, dtype=f64),
        "total.total_weight": torch.tensor(4.0, dtype=f64),
        "per_task.weighted_sums": torch.tensor([1.0, 2.0, 1.5], dtype=f64),
        "per_task.total_weight": torch.tensor(4.0, dtype=f64),
    }


def _load_version_0_1(rank, world_size):
    model = _Model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own: a warning shows once per place
        model.load_state_dict(_state_of_version_0_1())
    messages = [str(w.message) for w in caught if "losses 0.1.0" in str(w.message)]
    return {"values": _compute(model), "warnings": messages}


def test_version_0_1_checkpoints_load_on_one_process_as_before():
    model = _Model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.load_state_dict(_state_of_version_0_1())
    values = _compute(model)
    assert values["loss"] == 0.75
    assert values["total"] == 3.0
    assert values["per_task/loss/fav"] == 0.25
    assert values["per_task/loss/reply"] == 0.5


def test_version_0_1_checkpoints_count_once_on_several_ranks_with_one_warning():
    results = run_on_ranks(_load_version_0_1, 2, timeout=60)
    for result in results:
        # Rank 0 holds the old sums, rank 1 starts from zero: the global value is the old one.
        assert result["values"]["loss"] == 0.75
        assert result["values"]["total"] == 3.0
        assert result["values"]["per_task/loss/reply"] == 0.5
    warned = results[0]["warnings"]
    assert len(warned) == 1  # one for the three metrics, on rank 0 only
    assert "counted once, on rank 0 of 2" in warned[0]
    assert "save new checkpoints with this version" in warned[0]
    assert results[1]["warnings"] == []
