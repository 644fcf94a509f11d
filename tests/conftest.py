"""Shared test helpers: real gloo ranks on this machine's CPU, and commands with a time limit."""

from __future__ import annotations

import gc
import io
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: Seconds a whole multi-process run may take before every rank is killed and the test fails.
RANKS_TIMEOUT = 120.0
#: Seconds a pool's ranks may take to start and join their group (under pytest-timeout's 300 s).
#: Five ranks importing torch at once on a 2-core machine that other jobs load took 120 s.
POOL_START_TIMEOUT = 240.0

# torch.compile's inductor compiles in a pool of worker processes (a torch import each) by default;
# for the suite's small graphs warming that pool costs more than it saves: in-process compiling took
# test_multi_task.py's compile tests from 33 s to 18 s of wall time on the loaded 2-core machine,
# for the same CPU time. Read when inductor is first imported, so set before any test compiles.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- Warm ranks ------------------------------------------------------------------------------------
# Spawning a rank costs a fresh Python and a torch import, seconds per rank on 2 cores, which the
# multi-process tests paid once per test. A pool per world size is spawned once per session, joins
# one gloo group once, and runs every test's function in turn. A case that fails, hangs or crashes
# kills its pool (its peers may be stuck in a collective the case left); the next case spawns a
# new one, so a failure costs one respawn and never leaks into another test.


def _dumps(value: Any) -> bytes:
    # torch.save, not the pipe's pickler: torch.multiprocessing makes that pickler move tensors
    # through shared memory, which ties the receiver to the sender's lifetime.
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _loads(payload: bytes) -> Any:
    return torch.load(io.BytesIO(payload), weights_only=False)


def _fresh_state(environ: dict[str, str], cwd: str) -> None:
    """Put back what a fresh rank process starts with, so that no case sees the one before."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environ)
    torch.seed()  # a fresh process draws a random seed too
    random.seed()
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)
    torch.set_grad_enabled(True)
    torch.autograd.set_detect_anomaly(False)
    torch.use_deterministic_algorithms(False)
    for name in _GLOBAL_MODULE_HOOKS:
        getattr(torch.nn.modules.module, name).clear()


#: The registries of torch.nn.modules.module's global hooks (register_module_forward_hook, ...).
_GLOBAL_MODULE_HOOKS = tuple(
    name
    for name in dir(torch.nn.modules.module)
    if name.startswith("_global_")
    and name.endswith("hooks")
    and isinstance(getattr(torch.nn.modules.module, name), dict)
)


def _run_case(
    rank: int, world_size: int, fn: Callable[..., Any], args: tuple, environ: dict[str, str], cwd: str
) -> bytes:
    _fresh_state(environ, cwd)
    groups = set(dist.distributed_c10d._world.pg_map)
    with warnings.catch_warnings():  # restores the filters and resets Python's "shown once" records
        reply = _dumps(("ok", fn(rank, world_size, *args)))
    # Finish together: a rank that frees DDP objects or a subgroup while a peer still talks to
    # it can abort in gloo's destructors.
    gc.collect()
    dist.barrier()
    for group in set(dist.distributed_c10d._world.pg_map) - groups:
        dist.destroy_process_group(group)
    return reply


def _worker_main(rank: int, world_size: int, port: int, conn: Connection) -> None:
    # One thread per rank: 2 cores are shared by all ranks, and oversubscription makes gloo slow.
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    import losses  # noqa: F401  (every case needs it: import it while the pool warms up)

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        # Long enough for the slowest rank to arrive; a hung case is killed at its own timeout.
        timeout=timedelta(seconds=POOL_START_TIMEOUT),
    )
    conn.send_bytes(_dumps(("ok", None)))
    environ, cwd = dict(os.environ), os.getcwd()
    while True:
        try:
            message = conn.recv_bytes()
        except EOFError:  # the test session is gone
            return
        try:
            fn, args = _loads(message)
            reply = _run_case(rank, world_size, fn, args, environ, cwd)
        except BaseException:
            conn.send_bytes(_dumps(("error", traceback.format_exc())))
            return  # the pool is killed and rebuilt: peers may wait in a collective this rank left
        conn.send_bytes(reply)


class _RankPool:
    """``world_size`` spawned ranks in one gloo group, running one function after another.

    Building one starts the processes and returns: they import torch and join their group in the
    background, while the session runs other tests; the first :meth:`run` waits for them.
    """

    def __init__(self, world_size: int) -> None:
        context = mp.get_context("spawn")
        port = free_port()
        self.world_size = world_size
        self.connections: list[Connection] = []
        self.processes: list[Any] = []
        for rank in range(world_size):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_worker_main,
                args=(rank, world_size, port, theirs),
                daemon=True,
                name=f"rank{rank}of{world_size}",
            )
            process.start()
            theirs.close()
            self.connections.append(ours)
            self.processes.append(process)
        self.ready = False

    def run(self, fn: Callable[..., Any], args: tuple, timeout: float) -> list[Any]:
        if not self.ready:
            # Counted from the first wait, not from the spawn: a pool warmed at collection may
            # have shared the cores with a long run of other tests before anyone needed it.
            self._replies("starting the process group", time.monotonic() + POOL_START_TIMEOUT, POOL_START_TIMEOUT)
            self.ready = True
        payload = _dumps((fn, args))
        deadline = time.monotonic() + timeout
        for conn in self.connections:
            conn.send_bytes(payload)
        return self._replies(fn.__name__, deadline, timeout)

    def _replies(self, what: str, deadline: float, timeout: float) -> list[Any]:
        """Every rank's reply, in rank order; a rank's error, exit or the deadline fails the whole run."""
        replies: dict[int, Any] = {}
        errors: dict[int, str] = {}
        while len(replies) + len(errors) < self.world_size:
            pending = {
                conn: rank for rank, conn in enumerate(self.connections) if rank not in replies and rank not in errors
            }
            sentinels = {self.processes[rank].sentinel: rank for rank in pending.values()}
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.world_size} ranks of {what} still running after {timeout:.0f} s")
            # After a first error, only a moment for the other ranks' own tracebacks.
            ready = wait([*pending, *sentinels], timeout=min(remaining, 0.5) if errors else remaining)
            if not ready and errors:
                break
            for handle in ready:
                rank = pending.get(handle, sentinels.get(handle))  # type: ignore[arg-type]
                if rank in replies or rank in errors:
                    continue
                try:
                    status, value = _loads(self.connections[rank].recv_bytes())
                    (replies if status == "ok" else errors)[rank] = value
                except EOFError:  # it died without a word (a crash, os._exit, a signal)
                    self.processes[rank].join(timeout=1)
                    errors[rank] = f"rank {rank} exited with code {self.processes[rank].exitcode}"
        if errors:
            details = "\n".join(f"--- rank{rank} ---\n{text}" for rank, text in sorted(errors.items()))
            raise AssertionError(f"a rank of {what} failed:\n{details}")
        return [replies[rank] for rank in range(self.world_size)]

    def alive(self) -> bool:
        return all(process.is_alive() for process in self.processes)

    def kill(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
        for process in self.processes:
            process.join()
        for conn in self.connections:
            conn.close()


#: The warm pool of each world size, kept for the session.
_POOLS: dict[int, _RankPool] = {}


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = RANKS_TIMEOUT) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return each rank's result.

    ``fn`` must be importable (defined at module level). The ranks are warm processes kept for the
    session, one pool per world size, already in the default process group; each call starts from
    a fresh process's state (seeds, default dtype, threads, grad mode, global module hooks,
    warning filters, environment, working directory), and process groups ``fn`` creates are
    destroyed after it. A rank that raises fails the test with its traceback; ranks still running
    after ``timeout`` seconds (spawning a pool is not counted) are killed and the test fails, so a
    hung collective cannot stall CI. Either way the pool is rebuilt for the next call.
    """
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive():
        if pool is not None:
            pool.kill()
        pool = _POOLS[world_size] = _RankPool(world_size)
    try:
        return pool.run(fn, args, timeout)
    except BaseException:  # a failure, a timeout, pytest-timeout or Ctrl-C: the ranks' state is unknown
        pool.kill()
        # The next call's pool warms up while this failure is reported (not after a failed start:
        # that would only fail again).
        _POOLS[world_size] = _RankPool(world_size) if pool.ready else pool
        raise


#: The world sizes the suite's multi-process tests use; their pools start when such a test is collected.
WARM_WORLD_SIZES = (2, 3)


def _uses_ranks(item: pytest.Item) -> bool:
    module = getattr(item, "module", None)
    return "ranks" in getattr(item, "fixturenames", ()) or getattr(module, "run_on_ranks", None) is run_on_ranks


@pytest.fixture
def ranks() -> Callable[..., list[Any]]:
    """The :func:`run_on_ranks` runner, as a fixture for tests that need several processes."""
    return run_on_ranks


# --- Launches ---------------------------------------------------------------------------------------
# The few end-to-end tests run a command (the demo, the Lightning app) that spends seconds importing
# torch and launching ranks. Declared at module level as a Launch, it starts in the background as
# soon as its test is collected and runs beside the single-process tests, on the core they leave
# free; the test then reads its output. One launch runs at a time, in the order the tests come.


class Launch:
    """``command`` run in its own process group, in the background, with ``timeout`` seconds to finish.

    ``{out}`` in the command is replaced by :attr:`out_dir`, a fresh directory for its files, made
    when the command starts.
    """

    def __init__(self, command: list[str], env: dict[str, str], timeout: float) -> None:
        self.command = command
        self.env = {**os.environ, **env}
        self.out_dir = Path()
        self.timeout = timeout
        self.finished = threading.Event()
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        self._output = ""
        self._timed_out = False

    def start(self) -> None:
        """Start the command unless it is running or done (the test's own call starts it at once)."""
        with self._lock:
            if self._process is not None:
                return
            self.out_dir = Path(tempfile.mkdtemp(prefix="launch-"))
            _STARTED_LAUNCHES.append(self)
            self._process = subprocess.Popen(
                [part.replace("{out}", str(self.out_dir)) for part in self.command],
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        assert self._process is not None
        try:
            self._output, _ = self._process.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self._output, _ = self._process.communicate()
            self._timed_out = True
        finally:
            self.finished.set()

    def output(self) -> str:
        """The command's output once it has finished; the test fails on a timeout or an exit code."""
        self.start()
        self.finished.wait()
        assert self._process is not None
        if self._timed_out:
            pytest.fail(f"{self.command} still running after {self.timeout:.0f} s:\n{self._output[-3000:]}")
        assert self._process.returncode == 0, self._output[-3000:]
        return self._output

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGKILL)


#: Every launch that started, for the end of the session to stop and clean up.
_STARTED_LAUNCHES: list[Launch] = []


def _launch_one_after_another(launches: list[Launch]) -> None:
    for launch in launches:
        launch.start()
        launch.finished.wait()


def _collected_launches(items: list[pytest.Item]) -> list[Launch]:
    """The Launch objects of the modules of ``items``, in the order the tests come."""
    launches: dict[int, Launch] = {}
    for item in items:
        module = getattr(item, "module", None)
        for value in vars(module).values() if module is not None else ():
            if isinstance(value, Launch):
                launches.setdefault(id(value), value)
    return list(launches.values())


# --- Session hooks ----------------------------------------------------------------------------------
def pytest_collection_finish(session: pytest.Session) -> None:
    # Warm both pools and start the launches while the single-process tests run.
    if any(_uses_ranks(item) for item in session.items):
        for world_size in WARM_WORLD_SIZES:
            if world_size not in _POOLS:
                _POOLS[world_size] = _RankPool(world_size)
    launches = _collected_launches(session.items)
    threading.Thread(target=_launch_one_after_another, args=(launches,), daemon=True).start()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Killed, not shut down: nothing in a rank needs saving, and a clean gloo teardown costs seconds.
    while _POOLS:
        _POOLS.popitem()[1].kill()
    for launch in _STARTED_LAUNCHES:
        launch.kill()
        shutil.rmtree(launch.out_dir, ignore_errors=True)
