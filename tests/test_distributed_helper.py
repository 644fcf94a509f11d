import pytest
import torch
import torch.distributed as dist


def _sum_of_ranks(rank, world_size):
    value = torch.tensor(float(rank + 1))
    dist.all_reduce(value)
    return {"rank": rank, "world_size": world_size, "sum": value.item()}


def _hang_on_rank_one(rank, world_size):
    if rank == 1:
        import time

        time.sleep(60)
    return rank


def _raise_on_rank_one(rank, world_size):
    if rank == 1:
        raise RuntimeError("rank one broke")
    return rank


def test_ranks_run_real_collectives(ranks):
    results = ranks(_sum_of_ranks, 3)
    assert results == [{"rank": r, "world_size": 3, "sum": 6.0} for r in range(3)]


def test_a_hung_rank_fails_fast(ranks):
    with pytest.raises(TimeoutError, match="still running after 5 s"):
        ranks(_hang_on_rank_one, 2, timeout=5)


def test_a_failing_rank_reports_its_traceback(ranks):
    with pytest.raises(AssertionError, match="rank one broke"):
        ranks(_raise_on_rank_one, 2)
