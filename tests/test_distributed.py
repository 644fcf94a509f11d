"""Behaviour across real gloo ranks: metrics, get_global_loss_detached and DDP gradients."""

import math
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import MetricCollection

from losses import GlobalLoss, MultiTaskGlobalLoss, MultiTaskLoss, get_global_loss_detached

TASKS = ["fav", "reply", "click"]


def _rank_updates(rank):
    """Rank ``rank``'s (loss, batch size, per-task losses) updates: ranks differ in count and batch size."""
    gen = torch.Generator().manual_seed(100 + rank)
    updates = []
    for step in range(rank + 2):
        per_task = torch.rand(len(TASKS), generator=gen, dtype=torch.float64)
        updates.append((per_task.mean().item(), 8 * (rank + 1) + step, per_task.tolist()))
    return updates


def _metrics_on_ranks(rank, world_size):
    global_loss, global_sum = GlobalLoss(), GlobalLoss(reduction="sum")
    per_task = MultiTaskGlobalLoss(TASKS)
    for loss, batch, task_losses in _rank_updates(rank):
        global_loss.update(torch.tensor(loss, dtype=torch.float64), batch)
        global_sum.update(torch.tensor(loss, dtype=torch.float64), batch)
        losses = {f"loss/{t}": torch.tensor(v, dtype=torch.float64) for t, v in zip(TASKS, task_losses, strict=True)}
        losses["loss"] = torch.tensor(loss, dtype=torch.float64)
        per_task.update(losses, weight=batch)

    local = torch.tensor(float(rank + 1), requires_grad=True) * 2
    before = local.detach().clone()
    mean = get_global_loss_detached(local)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        total = get_global_loss_detached(local, reduction="sum")

    on_step = GlobalLoss(dist_sync_on_step=True)
    step_value = on_step(torch.tensor(float(rank)), weight=rank + 1)
    return {
        "mean": global_loss.compute().item(),
        "sum": global_sum.compute().item(),
        "per_task": {k: v.item() for k, v in per_task.compute().items()},
        "detached_mean": mean.item(),
        "detached_sum": total.item(),
        "input_unchanged": torch.equal(local.detach(), before) and local.requires_grad,
        "step_value": step_value.item(),
        "local_after_step": on_step.compute().item(),
    }


@pytest.mark.parametrize("world_size", [2, 3])
def test_metrics_and_detached_loss_match_hand_computation(ranks, world_size):
    results = ranks(_metrics_on_ranks, world_size)
    updates = [u for rank in range(world_size) for u in _rank_updates(rank)]
    total_weight = sum(batch for _, batch, _ in updates)
    weighted = math.fsum(loss * batch for loss, batch, _ in updates)
    per_task = {
        f"loss/{task}": math.fsum(t[i] * b for _, b, t in updates) / total_weight for i, task in enumerate(TASKS)
    }
    per_task["loss"] = weighted / total_weight
    locals_ = [2.0 * (rank + 1) for rank in range(world_size)]
    step_expected = sum(r * (r + 1) for r in range(world_size)) / sum(r + 1 for r in range(world_size))
    for result in results:
        assert result["mean"] == pytest.approx(weighted / total_weight, rel=1e-12)
        assert result["sum"] == pytest.approx(weighted, rel=1e-12)
        assert result["per_task"] == pytest.approx(per_task, rel=1e-12)
        assert list(result["per_task"]) == [*(f"loss/{t}" for t in TASKS), "loss"]
        assert result["detached_mean"] == pytest.approx(sum(locals_) / world_size)
        assert result["detached_sum"] == pytest.approx(sum(locals_))
        assert result["input_unchanged"]
        # forward() with dist_sync_on_step gives the batch value over all ranks...
        assert result["step_value"] == pytest.approx(step_expected)
        # ...while compute() afterwards still syncs the accumulated states (here the same batch).
        assert result["local_after_step"] == pytest.approx(step_expected)


def _global_batch(batch=24, features=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, features, generator=gen, dtype=torch.float64)
    labels = (torch.rand(batch, len(TASKS), generator=gen) < 0.4).double()
    weights = torch.rand(batch, len(TASKS), generator=gen, dtype=torch.float64) + 0.5
    # Rank 0's rows are almost all labelled, rank 1's are sparse: counts differ by rank and task.
    density = torch.where(torch.arange(batch) < batch // 3, 0.95, 0.3).unsqueeze(1)
    mask = torch.rand(batch, len(TASKS), generator=gen, dtype=torch.float64) < density
    return x, labels, weights, mask


class _Ranker(nn.Module):
    def __init__(self, **loss_kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.tower = nn.Linear(6, len(TASKS)).double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.loss = MultiTaskLoss(TASKS, pos_weights=[1.0, 3.0, 0.5], **loss_kwargs).double()

    def forward(self, x, labels, weights, mask):
        return self.loss(self.tower(x), labels, weights, mask)


def _shard_bounds(batch, world_size, equal):
    if equal:
        step = batch // world_size
        return [(r * step, (r + 1) * step) for r in range(world_size)]
    # Unequal shards: rank 0 holds a third of the rows, the rest share the remainder.
    first = batch // 3
    rest = (batch - first) // (world_size - 1)
    bounds = [(0, first)]
    for r in range(1, world_size):
        bounds.append((first + (r - 1) * rest, batch if r == world_size - 1 else first + r * rest))
    return bounds


def _single_process_reference(use_mask, **loss_kwargs):
    x, labels, weights, mask = _global_batch()
    model = _Ranker(**loss_kwargs)
    out = model(x, labels, weights, mask if use_mask else None)
    out["loss"].backward()
    return out["loss"].item(), [p.grad.clone() for p in model.tower.parameters()]


def _ddp_step(rank, world_size, equal_shards, use_mask, loss_kwargs):
    x, labels, weights, mask = _global_batch()
    start, stop = _shard_bounds(x.shape[0], world_size, equal_shards)[rank]
    model = DistributedDataParallel(_Ranker(**loss_kwargs))
    out = model(x[start:stop], labels[start:stop], weights[start:stop], mask[start:stop] if use_mask else None)
    out["loss"].backward()
    return {
        "grads": [p.grad.clone() for p in model.module.tower.parameters()],
        "logged": get_global_loss_detached(out["loss"]).item(),
        "pos_weight": model.module.loss.pos_weight.clone(),
    }


def _assert_grads(results, grads, factor=1.0):
    """Every rank's DDP gradients, times ``factor``, equal the single-process gradients."""
    for result in results:
        for ours, ref in zip(result["grads"], grads, strict=True):
            torch.testing.assert_close(ours * factor, ref, rtol=1e-10, atol=1e-12)


def test_ddp_mean_gradients_equal_single_process_gradients(ranks):
    results = ranks(_ddp_step, 2, True, False, {})
    loss, grads = _single_process_reference(use_mask=False)
    _assert_grads(results, grads)
    for result in results:
        assert result["logged"] == pytest.approx(loss, rel=1e-12)
        torch.testing.assert_close(result["pos_weight"], torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64))


def test_ddp_sum_gradients_are_single_process_gradients_over_world_size(ranks):
    kwargs = {"task_loss_reduction": "sum"}
    results = ranks(_ddp_step, 2, True, False, kwargs)
    _, grads = _single_process_reference(use_mask=False, **kwargs)
    _assert_grads(results, grads, factor=2.0)


def test_global_normalization_gives_exact_gradients_when_ranks_differ(ranks):
    results = ranks(_ddp_step, 2, False, True, {"normalize": "global"})
    loss, grads = _single_process_reference(use_mask=True)
    _assert_grads(results, grads)
    for result in results:
        assert result["logged"] == pytest.approx(loss, rel=1e-12)


def test_local_normalization_is_biased_when_ranks_differ(ranks):
    results = ranks(_ddp_step, 2, False, True, {"normalize": "local"})
    loss, grads = _single_process_reference(use_mask=True)
    difference = max((ours - ref).abs().max().item() for ours, ref in zip(results[0]["grads"], grads, strict=True))
    assert difference > 1e-3
    assert results[0]["logged"] != pytest.approx(loss, rel=1e-3)


def test_global_normalization_on_three_ranks(ranks):
    results = ranks(_ddp_step, 3, False, True, {"normalize": "global"})
    _, grads = _single_process_reference(use_mask=True)
    _assert_grads(results, grads)


#: Every collective of torch.distributed a metric sync could use; the tests wrap them all.
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "gather_object",
    "scatter",
    "all_to_all",
)


class CountingCollectives:
    """Wraps torch.distributed's collectives (the real ones still run) and records each call's name."""

    def __init__(self):
        self.calls = []
        self._real = {}

    def __enter__(self):
        for name in COLLECTIVES:
            real = getattr(dist, name)
            self._real[name] = real

            def counting(*args, _name=name, _real=real, **kwargs):
                self.calls.append(_name)
                return _real(*args, **kwargs)

            setattr(dist, name, counting)
        return self

    def __exit__(self, *exc):
        for name, real in self._real.items():
            setattr(dist, name, real)


def _collectives_per_compute(rank, world_size, num_tasks):
    metric = MultiTaskGlobalLoss([f"t{i}" for i in range(num_tasks)])
    single = GlobalLoss()
    with CountingCollectives() as counter:
        metric.update({key: torch.tensor(1.0) for key in metric.result_keys}, weight=rank + 1)
        single.update(torch.tensor(float(rank)), weight=rank + 1)
        after_updates = list(counter.calls)
        values = metric.compute()
        after_compute = list(counter.calls)
        single_value = single.compute()
        metric.compute()  # cached: no second sync
        state = metric.state_dict()
    # After compute() the states are this rank's own again, and updates keep adding to them.
    local_weight = metric.total_weight.item()
    metric.update({key: torch.tensor(3.0) for key in metric.result_keys}, weight=1)
    after_update = metric.compute()
    return {
        "local_weight": local_weight,
        "after_update": after_update["loss"].item(),
        # The first result was built in fresh tensors: the second compute did not write into it.
        "first_after_second": values["loss"].item(),
        "all_entries": sorted({value.item() for value in after_update.values()}),
        "updates": after_updates,
        "compute": after_compute,
        "all": counter.calls,
        "loss": values["loss"].item(),
        "single": single_value.item(),
        "state_keys": sorted(state),
    }


@pytest.mark.parametrize("num_tasks", [1, 500])
def test_a_sync_is_exactly_one_all_reduce_for_one_task_or_five_hundred(ranks, num_tasks):
    results = ranks(_collectives_per_compute, 2, num_tasks)
    for result in results:
        assert result["updates"] == []
        assert result["compute"] == ["all_reduce"]
        # The second metric's compute is one more; the cached compute and state_dict() add none.
        assert result["all"] == ["all_reduce", "all_reduce"]
        assert result["loss"] == 1.0
        assert result["single"] == pytest.approx(2 / 3)
    for rank, result in enumerate(results):
        assert result["local_weight"] == rank + 1
        # Weights 1 and 2 of 1.0, then weight 1 of 3.0 on each rank.
        assert result["after_update"] == pytest.approx(9 / 5, rel=1e-15)
        assert result["all_entries"] == [pytest.approx(9 / 5, rel=1e-15)]
        assert result["first_after_second"] == 1.0


def _sync_options(rank, world_size):
    """Every torchmetrics sync option on 3 ranks, each with the collectives it ran."""
    out = {}
    pair = dist.new_group([0, 1])  # every rank takes part in creating a group
    loss = torch.tensor(float(rank + 1), dtype=torch.float64)

    # process_group: ranks 0 and 1 sync among themselves; rank 2 is not in the group.
    if rank < 2:
        metric = GlobalLoss(process_group=pair)
        metric.update(loss, weight=rank + 1)
        with CountingCollectives() as counter:
            out["pair"] = (metric.compute().item(), list(counter.calls))
            out["pair_rank"] = int(metric.state_dict()["saving_rank"])
    dist.barrier()

    # sync_on_compute=False: this rank's value, no collective.
    local = GlobalLoss(sync_on_compute=False)
    local.update(loss, weight=2)
    with CountingCollectives() as counter:
        out["local"] = (local.compute().item(), list(counter.calls))

    # dist_sync_on_step=True: forward gives the batch value of all ranks in one all_reduce, and
    # does not replace the sums that compute() synced (what a checkpoint carries).
    on_step = MultiTaskGlobalLoss(["fav"], dist_sync_on_step=True)
    first = {"loss/fav": loss, "loss": loss}
    on_step.update(first, weight=1)
    on_step.compute()
    with CountingCollectives() as counter:
        step = on_step({"loss/fav": 10 * loss, "loss": 10 * loss}, weight=1)
        out["on_step"] = (step["loss"].item(), list(counter.calls))
    state = on_step.state_dict()
    out["on_step_state"] = (state["synced_sums"].tolist(), state["unsynced_sums"].tolist())

    # A user's dist_sync_fn: torchmetrics' own path, with that function.
    used = []

    def gather(tensor, group=None):
        used.append(tuple(tensor.shape))
        gathered = [torch.zeros_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, tensor, group=group)
        return gathered

    custom = GlobalLoss(dist_sync_fn=gather)
    custom.update(loss, weight=rank + 1)
    out["custom"] = custom.compute().item()
    out["custom_calls"] = len(used)
    out["custom_synced"] = custom.state_dict()["synced_sums"].tolist()

    # MetricCollection: one all_reduce per metric it computes.
    collection = MetricCollection({"mean": GlobalLoss(), "sum": GlobalLoss(reduction="sum")})
    collection.update(loss, weight=rank + 1)
    with CountingCollectives() as counter:
        values = collection.compute()
        out["collection"] = ({k: v.item() for k, v in values.items()}, list(counter.calls))
    return out


def test_sync_options_process_group_local_on_step_custom_fn_and_collection(ranks):
    results = ranks(_sync_options, 3)
    weighted = [(r + 1) * (r + 1) for r in range(3)]  # loss r + 1 with weight r + 1
    for rank, result in enumerate(results):
        if rank < 2:
            assert result["pair"] == (pytest.approx((1 * 1 + 2 * 2) / 3), ["all_reduce"])
            assert result["pair_rank"] == rank
        else:
            assert "pair" not in result
        assert result["local"] == (float(rank + 1), [])
        assert result["on_step"] == (pytest.approx(10 * (1 + 2 + 3) / 3), ["all_reduce"])
        synced, unsynced = result["on_step_state"]
        # [loss/fav, loss, total_weight, invalid_weights]: the compute's global sums, then this
        # rank's forward batch as the only record since that sync.
        assert synced == [6.0, 6.0, 3.0, 0.0]
        assert unsynced == [10.0 * (rank + 1), 10.0 * (rank + 1), 1.0, 0.0]
        assert result["custom"] == pytest.approx(sum(weighted) / 6)
        assert result["custom_calls"] == 3  # one gather per state
        assert result["custom_synced"] == [sum(weighted), 6.0, 0.0]
        values, calls = result["collection"]
        assert values == {"mean": pytest.approx(sum(weighted) / 6), "sum": pytest.approx(sum(weighted))}
        assert calls == ["all_reduce", "all_reduce"]
