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


def _leave_state_behind(rank, world_size):
    """Change everything a case could leak into the next one on the same warm rank."""
    import os
    import warnings

    torch.manual_seed(1234)
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(2)
    torch.set_grad_enabled(False)
    torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    os.environ["LOSSES_TEST_LEAK"] = "1"
    os.chdir("/")
    warnings.simplefilter("error")
    dist.new_group([0, 1])
    return os.getpid()


def _fresh_state(rank, world_size):
    import os
    import warnings

    return {
        "pid": os.getpid(),
        "first_draw": torch.rand(1).item(),
        "dtype": torch.get_default_dtype(),
        "threads": torch.get_num_threads(),
        "grad": torch.is_grad_enabled(),
        "hooks": len(torch.nn.modules.module._global_forward_hooks),
        "env": "LOSSES_TEST_LEAK" in os.environ,
        "cwd_is_root": os.getcwd() == "/",
        "error_filter": any(f[0] == "error" and f[2] is Warning for f in warnings.filters),
        "groups": len(dist.distributed_c10d._world.pg_map),
    }


def test_a_warm_rank_starts_each_case_from_a_fresh_state(ranks):
    before = ranks(_fresh_state, 2)
    pids = ranks(_leave_state_behind, 2)
    after = ranks(_fresh_state, 2)
    # The same processes ran all three cases: the pool was reused...
    assert [r["pid"] for r in before] == pids == [r["pid"] for r in after]
    for rank in range(2):
        # ...and nothing the middle case changed reached the last one.
        assert after[rank]["first_draw"] != torch.rand(1, generator=torch.Generator().manual_seed(1234)).item()
        assert after[rank]["dtype"] == torch.float32
        assert after[rank]["threads"] == 1
        assert after[rank]["grad"] is True
        assert after[rank]["hooks"] == 0
        assert after[rank]["env"] is False
        assert after[rank]["cwd_is_root"] is False
        assert after[rank]["error_filter"] is False
        assert after[rank]["groups"] == before[rank]["groups"]  # the subgroup was destroyed


def test_a_hung_rank_fails_fast(ranks):
    with pytest.raises(TimeoutError, match="still running after 5 s"):
        ranks(_hang_on_rank_one, 2, timeout=5)


def test_a_failing_rank_reports_its_traceback(ranks):
    with pytest.raises(AssertionError, match="rank one broke"):
        ranks(_raise_on_rank_one, 2)


def _exit_on_rank_one(rank, world_size):
    if rank == 1:
        import os

        os._exit(3)
    dist.barrier()
    return rank


def test_a_rank_that_dies_without_a_word_is_reported_and_the_pool_replaced(ranks):
    with pytest.raises(AssertionError, match="rank 1 exited with code 3"):
        ranks(_exit_on_rank_one, 2, timeout=60)
    # The next call runs on a new pool.
    assert ranks(_sum_of_ranks, 2) == [{"rank": r, "world_size": 2, "sum": 3.0} for r in range(2)]
