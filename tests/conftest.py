"""Shared test helpers: real gloo ranks on this machine's CPU, and commands with a time limit."""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: Seconds a whole multi-process run may take before every rank is killed and the test fails.
RANKS_TIMEOUT = 120.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(rank: int, world_size: int, port: int, out_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    # One thread per rank: 2 cores are shared by all ranks, and oversubscription makes gloo slow.
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    out = Path(out_dir)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=RANKS_TIMEOUT / 2),
        )
        result = fn(rank, world_size, *args)
        torch.save(result, out / f"rank{rank}.pt")
        # Tear down together: a rank that destroys its group while a peer still talks to it, or
        # while DDP objects still hold communication threads, can abort in gloo's destructors.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = RANKS_TIMEOUT) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; return each rank's result.

    ``fn`` must be importable (defined at module level). A rank that raises fails the test with its
    traceback; ranks still running after ``timeout`` seconds are killed and the test fails, so a
    hung collective cannot stall CI.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(
            _rank_main,
            args=(world_size, free_port(), out_dir, fn, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{world_size} ranks of {fn.__name__} still running after {timeout:.0f} s")
        except mp.ProcessRaisedException as err:
            errors = sorted(Path(out_dir).glob("rank*.err"))
            details = "\n".join(f"--- {path.stem} ---\n{path.read_text()}" for path in errors)
            raise AssertionError(f"a rank of {fn.__name__} failed:\n{details or err}") from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


@pytest.fixture
def ranks() -> Callable[..., list[Any]]:
    """The :func:`run_on_ranks` runner, as a fixture for tests that need several processes."""
    return run_on_ranks


def run_command(command: list[str], env: dict[str, str], timeout: float) -> str:
    """Run ``command`` in its own process group; return its output, or fail with it.

    The whole group is killed after ``timeout`` seconds, children (launched ranks) included.
    """
    process = subprocess.Popen(
        command,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{command} still running after {timeout:.0f} s:\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]
    return output


@pytest.fixture
def command() -> Callable[[list[str], dict[str, str], float], str]:
    """The :func:`run_command` runner, as a fixture."""
    return run_command
