"""A process group other than the world: 3 real gloo ranks, DDP on the subgroup {0, 1}.

One spawn runs every scenario (spawning costs seconds); the tests below each check one part of
what the ranks returned, against values worked out by hand.
"""

import copy
import math
import pickle
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from losses import MultiTaskLoss, get_global_loss_detached
from tests.conftest import run_on_ranks

TASKS = ["fav", "reply"]
LOG2 = math.log(2.0)

# Rank 0 labels 1 entry of "fav" and 2 of "reply"; rank 1 labels 3 of "fav" and none of "reply".
MASKS = {
    0: [[True, True], [False, True], [False, False], [False, False]],
    1: [[True, False], [True, False], [True, False], [False, False]],
}


def _shard(rank, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    labels = (torch.rand(8, len(TASKS), generator=gen) < 0.5).double()
    mask = torch.rand(8, len(TASKS), generator=gen) < 0.6
    mask[:4, 1] = True  # rank 0 labels many more "reply" entries than rank 1
    mask[4:, 1] = torch.tensor([True, False, False, False])
    rows = slice(0, 4) if rank == 0 else slice(4, 8)
    return x[rows], labels[rows], mask[rows], (x, labels, mask)


class _Ranker(nn.Module):
    def __init__(self, process_group=None):
        super().__init__()
        torch.manual_seed(0)
        self.tower = nn.Linear(5, len(TASKS)).double()
        self.loss = MultiTaskLoss(TASKS, normalize="global", process_group=process_group).double()

    def forward(self, x, labels, mask):
        return self.loss(self.tower(x), labels, mask=mask)


def _on_three_ranks(rank, world_size):
    group = dist.new_group([0, 1])  # every rank must take part in creating the group
    result = {}
    if rank in (0, 1):
        # Zero logits: every labelled entry costs log 2, so the exact global mean is log 2.
        loss = MultiTaskLoss(TASKS, normalize="global", process_group=group).double()
        out = loss(torch.zeros(4, 2, dtype=torch.float64), torch.zeros(4, 2), mask=torch.tensor(MASKS[rank]))
        result["own"] = {key: value.item() for key, value in out.items()}
        result["averaged"] = get_global_loss_detached(out["loss"], process_group=group).item()
        result["copy_shares_group"] = copy.deepcopy(loss).process_group is group
        result["state_dict"] = sorted(loss.state_dict())
        restored = pickle.loads(pickle.dumps(loss))
        try:
            restored(torch.zeros(4, 2, dtype=torch.float64), torch.zeros(4, 2))
        except RuntimeError as err:
            result["unpickled_error"] = str(err)

        half = torch.tensor(40000.0 if rank == 0 else 36000.0, dtype=torch.float16)
        result["half_mean"] = get_global_loss_detached(half, process_group=group)

        x, labels, mask, _ = _shard(rank)
        model = DistributedDataParallel(_Ranker(group), process_group=group)
        model(x, labels, mask)["loss"].backward()
        result["grads"] = [p.grad.clone() for p in model.module.tower.parameters()]
    else:
        # Rank 2 is outside the group: calling the loss or the reduction on it is a named error.
        loss = MultiTaskLoss(TASKS, normalize="global", process_group=group)
        for name, call in (
            ("loss", lambda: loss(torch.zeros(4, 2), torch.zeros(4, 2))),
            ("detached", lambda: get_global_loss_detached(torch.tensor(1.0), process_group=group)),
        ):
            try:
                call()
            except ValueError as err:
                result[f"outside_{name}"] = str(err)
    # World-wide, every rank: float32 values whose sum overflows but whose mean does not.
    result["world_mean"] = get_global_loss_detached(torch.tensor(3e38), process_group=None).item()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result["world_sum"] = get_global_loss_detached(torch.tensor(float(rank + 1)), reduction="sum").item()
        # Integer and bool losses are reduced in float32: a uint8 sum wrapped around, a bool one was a logical or.
        result["world_uint8_sum"] = get_global_loss_detached(torch.tensor(200, dtype=torch.uint8), reduction="sum")
        result["world_bool_sum"] = get_global_loss_detached(torch.tensor(True), reduction="sum")
    return result


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(_on_three_ranks, 3, timeout=120)


def test_global_normalization_counts_over_the_group_only(results):
    # Rank r's task loss is W * (its sum) / (the group's count), with W = 2, not 3.
    expected = {
        0: {"loss/fav": 2 * 1 * LOG2 / 4, "loss/reply": 2 * 2 * LOG2 / 2},
        1: {"loss/fav": 2 * 3 * LOG2 / 4, "loss/reply": 0.0},
    }
    for rank in (0, 1):
        own = results[rank]["own"]
        for key, value in expected[rank].items():
            assert own[key] == pytest.approx(value, rel=1e-12, abs=1e-15)
        assert own["loss"] == pytest.approx((own["loss/fav"] + own["loss/reply"]) / 2, rel=1e-12)
        # The average over the group is the exact mean over its global batch: log 2 for each task.
        assert results[rank]["averaged"] == pytest.approx(LOG2, rel=1e-12)


def test_ddp_on_the_subgroup_gives_the_single_process_gradient(results):
    _, _, _, (x, labels, mask) = _shard(0)
    model = _Ranker()
    model(x, labels, mask)["loss"].backward()
    for rank in (0, 1):
        for ours, ref in zip(results[rank]["grads"], model.tower.parameters(), strict=True):
            torch.testing.assert_close(ours, ref.grad, rtol=1e-10, atol=1e-12)


def test_a_rank_outside_the_group_gets_a_named_error(results):
    for name in ("loss", "detached"):
        assert "Expected this rank (2) to be in `process_group`" in results[2][f"outside_{name}"]


def test_half_precision_mean_is_reduced_in_float32(results):
    for rank in (0, 1):
        value = results[rank]["half_mean"]
        assert value.dtype == torch.float32
        assert value.item() == 38000.0


def test_mean_divides_before_summing(results):
    for result in results:
        assert result["world_mean"] == pytest.approx(3e38, rel=1e-6)
        assert result["world_sum"] == 6.0


def test_integer_and_bool_losses_are_summed_in_float32(results):
    for result in results:
        assert result["world_uint8_sum"].dtype == result["world_bool_sum"].dtype == torch.float32
        assert result["world_uint8_sum"].item() == 600.0
        assert result["world_bool_sum"].item() == 3.0


def test_the_group_is_shared_by_deepcopy_and_left_out_of_state_dict_and_pickle(results):
    for rank in (0, 1):
        assert results[rank]["copy_shares_group"]
        assert results[rank]["state_dict"] == ["pos_weight", "task_weight"]
        assert "Set `loss.process_group = group` after loading it" in results[rank]["unpickled_error"]


class TestSingleProcess:
    def test_a_group_of_the_wrong_type_is_a_named_error(self):
        with pytest.raises(TypeError, match="`process_group` to be None .* got list"):
            MultiTaskLoss(TASKS, process_group=[0, 1])
        with pytest.raises(TypeError, match="`process_group` to be None .* got str"):
            get_global_loss_detached(torch.tensor(1.0), process_group="world")

    def test_without_a_process_group_nothing_changes(self):
        loss = MultiTaskLoss(TASKS, normalize="global")
        assert loss.process_group is None
        clone = pickle.loads(pickle.dumps(loss))
        out = clone(torch.zeros(2, 2), torch.zeros(2, 2))
        assert out["loss"].item() == pytest.approx(LOG2)

    def test_half_precision_comes_back_in_float32(self):
        out = get_global_loss_detached(torch.tensor(60000.0, dtype=torch.float16))
        assert out.dtype == torch.float32
        assert out.item() == 60000.0
