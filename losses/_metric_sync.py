"""The base of every metric in this library whose states are sums: one collective per sync,
float64 states whatever the module dtype, and checkpoints that count every record once.

How a sync works: all sum states are packed into one float64 vector, summed over the ranks of the
metric's ``process_group`` with one ``all_reduce``, and split back. While that collective is in
flight the metric does the work that does not need its result (a copy of its local sums, and what
:meth:`SumMetric._while_syncing` prepares). A ``dist_sync_fn`` given by the user takes
torchmetrics' own path with that function instead.

States are never inference tensors when ``update`` writes into them: a ``reset`` or ``forward``
under ``torch.inference_mode`` (Lightning's validation loop) leaves inference tensors, which refuse
in-place writes outside that mode, so the first ``update`` outside it replaces them by normal
copies (one clone per state, once).

How a checkpoint works. At each sync the metric remembers the global sums ``G`` it received and
its own local sums ``L`` at that moment; across the ranks, ``G`` is the sum of the ``L``. The
``state_dict`` holds ``G`` (``synced_sums``), the rank's records since then, ``D = local - L``
(``unsynced_sums``), the saving rank and a format number, and never runs a collective. A loader
counts ``G`` only on rank 0 and ``D`` only if its rank is the saving rank. So the global total,
``G`` plus every rank's ``D``, is counted at most once on any world size, and exactly once when the
ranks whose files are loaded hold all the ``D`` that are not zero (for example right after a sync).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors
from torchmetrics.utilities.exceptions import TorchMetricsUserError
from torchmetrics.utilities.prints import rank_zero_warn

#: The dtype of every sum state, whatever dtype the module around the metric is cast to.
SUM_DTYPE = torch.float64

#: Written into every checkpoint as ``sum_format``; version 0.1.0 of the library wrote none.
CHECKPOINT_FORMAT = 1

_CHECKPOINT_KEYS = ("synced_sums", "unsynced_sums", "saving_rank", "sum_format")


def _group_rank(group: Any) -> int:
    """This process's rank in ``group`` (the world if None); 0 without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return int(dist.get_rank(group))


def _group_size(group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(group))


def values_on(name: str, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` detached, in float64 on ``device`` (the states' device), for ``update``.

    A meta tensor holds no values, so it can only go into states on the meta device; into real
    states it is a ``ValueError`` naming the argument, not torch's "Cannot copy out of meta tensor".
    """
    if tensor.is_meta and device.type != "meta":
        raise ValueError(
            f"Expected `{name}` to hold values, got a tensor on the meta device while the metric's states "
            f"are on {device}. Pass a real tensor, or move the metric to the meta device too (metric.to('meta'), "
            "for example with the model) to trace shapes: it then records and computes meta tensors."
        )
    return tensor.detach().to(device=device, dtype=SUM_DTYPE)


def _keep_dtype(fn: Callable[[torch.Tensor], torch.Tensor], tensor: torch.Tensor) -> torch.Tensor:
    """``fn(tensor)`` if it keeps the dtype, else ``tensor`` moved to the device ``fn`` chose.

    ``fn`` is what ``nn.Module._apply`` passes: ``.to(dtype)`` on the model, ``.half()``, a
    precision plugin's cast. The cast copy is thrown away, so no precision is lost.
    """
    moved = fn(tensor)
    if moved.dtype == tensor.dtype:
        return moved
    return tensor.to(device=moved.device)


class SumMetric(Metric):
    """A torchmetrics ``Metric`` whose states are all float64 sums, declared with :meth:`add_sum_state`.

    Subclasses register their sums in ``__init__`` with ``add_sum_state``, add into them in place in
    ``update`` (without reading a value on the host), and implement ``compute`` as usual. The base
    gives them the one-collective sync, float64 states under any dtype cast, and checkpoints that
    resume exactly on any number of ranks (see the module docstring and docs/logging.rst).
    """

    full_state_update = False

    def __init__(self, **metric_kwargs: Any) -> None:
        super().__init__(**metric_kwargs)
        self._sum_names: list[str] = []
        self._sum_shapes: list[torch.Size] = []
        self._sum_sizes: list[int] = []
        # G and L of the module docstring: packed global sums at the last sync and this rank's
        # packed sums at that moment; None when there was no sync since construction, reset or load.
        self._synced_sums: Optional[torch.Tensor] = None
        self._local_at_sync: Optional[torch.Tensor] = None
        self._loaded = False  # states came from a checkpoint since construction or reset

    # ----------------------------------------------------------------------------------- states

    def add_sum_state(self, name: str, shape: Union[int, Sequence[int]] = ()) -> None:
        """Register a float64 state of ``shape`` that starts at zero and is summed over the ranks."""
        size = torch.Size((shape,) if isinstance(shape, int) else tuple(shape))
        Metric.add_state(self, name, torch.zeros(size, dtype=SUM_DTYPE), dist_reduce_fx="sum", persistent=True)
        self._sum_names.append(name)
        self._sum_shapes.append(size)
        self._sum_sizes.append(size.numel())
        self._forget_sync()

    def add_state(self, name: str, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            f"Expected the states of {type(self).__name__} to be registered with `add_sum_state`, "
            f"got `add_state({name!r}, ...)`: every state of a SumMetric is a float64 sum."
        )

    @property
    def sum_state_names(self) -> tuple[str, ...]:
        """The names of the sum states, in the order they are packed."""
        return tuple(self._sum_names)

    # States are plain instance attributes (torchmetrics keeps them out of nn.Module's registries),
    # so they are read from and written to __dict__ directly: the sync path touches every state
    # twice, and nn.Module.__setattr__ costs more than the tensor work here.

    def _states(self) -> dict[str, torch.Tensor]:
        return {name: self.__dict__[name] for name in self._sum_names}

    def _pack(self, states: Optional[dict[str, Any]] = None) -> torch.Tensor:
        """All sum states (of ``states`` if given, else the current ones) as one new float64 vector."""
        source = self._states() if states is None else states
        if not self._sum_names:
            return torch.zeros(0, dtype=SUM_DTYPE, device=self.device)
        return torch.cat([source[name].reshape(-1) for name in self._sum_names])

    def _unpack(self, packed: torch.Tensor) -> None:
        """Set every sum state to a view of one packed vector (callers pass a tensor of their own)."""
        pieces = packed.split_with_sizes(self._sum_sizes)
        for name, shape, piece in zip(self._sum_names, self._sum_shapes, pieces, strict=True):
            self.__dict__[name] = piece.view(shape)

    def _local_sums(self) -> torch.Tensor:
        """This rank's own packed sums, also while the states hold synced values."""
        if self._is_synced and self._cache is not None:
            return self._pack(self._cache)
        return self._pack()

    def _forget_sync(self) -> None:
        self._synced_sums = None
        self._local_at_sync = None

    def _remember_sync(self, synced: torch.Tensor, local: torch.Tensor) -> None:
        # Plain attributes, set without nn.Module.__setattr__: this runs in every sync.
        self.__dict__["_synced_sums"] = synced
        self.__dict__["_local_at_sync"] = local

    # ----------------------------------------------------------------------------------- update

    def _wrap_update(self, update: Callable[..., None]) -> Callable[..., None]:
        wrapped = super()._wrap_update(update)

        @functools.wraps(update)
        def update_normal_states(*args: Any, **kwargs: Any) -> None:
            if not torch.is_inference_mode_enabled():
                self._leave_inference_tensors()
            # A batch value of an earlier forward() is not the value of this update's batch.
            self.__dict__["_forward_cache"] = None
            wrapped(*args, **kwargs)

        return update_normal_states

    def _leave_inference_tensors(self) -> None:
        # States made under torch.inference_mode (a reset, or torchmetrics' forward, which rebuilds
        # them) are inference tensors: in-place writes to them are refused outside that mode, and a
        # clone made outside it is a normal tensor.
        states = self.__dict__
        for name in self._sum_names:
            if states[name].is_inference():
                states[name] = states[name].clone()

    # ------------------------------------------------------------------------------------- sync

    def sync(
        self,
        dist_sync_fn: Optional[Callable[..., Any]] = None,
        process_group: Any = None,
        should_sync: bool = True,
        distributed_available: Optional[Callable[[], bool]] = None,
    ) -> None:
        # torchmetrics' sync, without its copy of every state: a sync here sets new tensors and
        # never writes into the local ones, so those are kept as they are for unsync().
        if self._is_synced and should_sync:
            raise TorchMetricsUserError(f"{type(self).__name__} is already synced; call unsync() first.")
        available = distributed_available or self.distributed_available_fn
        if not should_sync or not (callable(available) and available()):
            return
        self.__dict__["_cache"] = self._states()
        self._sync_dist(dist_sync_fn or gather_all_tensors, process_group=process_group)
        self.__dict__["_is_synced"] = True

    def unsync(self, should_unsync: bool = True) -> None:
        if not should_unsync:
            return
        if not self._is_synced or self._cache is None:
            raise TorchMetricsUserError(f"{type(self).__name__} is not synced; there is nothing to unsync.")
        self.__dict__.update(self._cache)
        self.__dict__["_cache"] = None
        self.__dict__["_is_synced"] = False

    def _wrap_compute(self, compute: Callable[..., Any]) -> Callable[..., Any]:
        # torchmetrics' wrapper squeezes and clones every tensor of the result, which for a dict of
        # T + 1 values costs more than the sync. Here compute() reads states that no update()
        # writes into afterwards (the synced copies, or a copy made here), so its result needs no
        # clone. A bare tensor result is squeezed to a scalar if it holds one value, as in
        # torchmetrics; dicts and lists are returned as compute() built them.
        @functools.wraps(compute)
        def compute_with_sync(*args: Any, **kwargs: Any) -> Any:
            if not self.update_called and not self._loaded:
                rank_zero_warn(
                    f"{type(self).__name__}.compute() runs on a rank with no update() or load since it was "
                    "built or reset.",
                    UserWarning,
                )
            cached: Any = self._computed
            if cached is not None:
                return cached
            # States on the meta device hold no values: there is nothing to sum across ranks.
            self.sync(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync and self.device.type != "meta")
            try:
                if self._is_synced:
                    value = compute(*args, **kwargs)
                else:
                    local = self._states()
                    self._unpack(self._pack())
                    try:
                        value = compute(*args, **kwargs)
                    finally:
                        self.__dict__.update(local)
            finally:
                self.unsync(should_unsync=self._is_synced and self._should_unsync)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.squeeze()
            if self.compute_with_cache:
                self.__dict__["_computed"] = value
            return value

        return compute_with_sync

    def _sync_dist(self, dist_sync_fn: Callable[..., Any] = gather_all_tensors, process_group: Any = None) -> None:
        if dist_sync_fn is gather_all_tensors:
            synced = self._pack()
            work = dist.all_reduce(
                synced, op=dist.ReduceOp.SUM, group=process_group or self.process_group, async_op=True
            )
            # Work before the collective would delay every rank; this work needs no result of it,
            # so it runs while the numbers travel.
            local = self._pack()
            self._while_syncing()
            if work is not None:  # None on a rank outside the group, which dist.all_reduce skips
                work.wait()
            self._unpack(synced.clone())
        else:
            # The user's own transport: torchmetrics gathers every state with it and sums.
            local = self._pack()
            super()._sync_dist(dist_sync_fn, process_group=process_group)
            synced = self._pack()
        self._remember_sync(synced, local)

    def _while_syncing(self) -> None:
        """Work for ``compute()`` that needs no synced value, done while the packed ``all_reduce`` runs.

        Nothing by default; a subclass may prepare its result here (see ``losses._dict_metric``).
        """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # torchmetrics' forward resets the states to compute the batch value (and, with
        # dist_sync_on_step, syncs that batch alone): neither is a sync of the running sums.
        remembered = (self._synced_sums, self._local_at_sync)
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._synced_sums, self._local_at_sync = remembered

    def reset(self) -> None:
        super().reset()
        self._forget_sync()
        self._loaded = False

    # ------------------------------------------------------------------------------------ dtype

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], exclude_state: Sequence[str] = ()) -> nn.Module:
        computed, step_value = self._computed, self._forward_cache
        this = super()._apply(fn, exclude_state=(*exclude_state, *self._sum_names))
        for name in self._sum_names:
            setattr(self, name, _keep_dtype(fn, getattr(self, name)))
            default = self._defaults[name]
            assert isinstance(default, torch.Tensor)
            self._defaults[name] = _keep_dtype(fn, default)
        if self._synced_sums is not None and self._local_at_sync is not None:
            self._synced_sums = _keep_dtype(fn, self._synced_sums)
            self._local_at_sync = _keep_dtype(fn, self._local_at_sync)
        # Cached results are float64 too; torchmetrics would cast them with the module.
        self._computed = _map_tensors(computed, lambda t: _keep_dtype(fn, t))
        self._forward_cache = _map_tensors(step_value, lambda t: _keep_dtype(fn, t))
        return this

    # ------------------------------------------------------------------------------- checkpoint

    def state_dict(  # type: ignore[override]
        self, destination: Optional[dict[str, Any]] = None, prefix: str = "", keep_vars: bool = False
    ) -> dict[str, Any]:
        # nn.Module's own state_dict (children, buffers), then our entries instead of torchmetrics'
        # raw local states. No collective here: rank 0 may call this alone.
        out: dict[str, Any] = nn.Module.state_dict(self, destination=destination, prefix=prefix, keep_vars=keep_vars)  # type: ignore[arg-type]
        if not any(self._persistent[name] for name in self._sum_names):
            return out
        local = self._local_sums()
        synced = torch.zeros_like(local) if self._synced_sums is None else self._synced_sums
        since_sync = local if self._local_at_sync is None else local - self._local_at_sync
        out[prefix + "synced_sums"] = synced.detach().clone()
        out[prefix + "unsynced_sums"] = since_sync.detach().clone()
        out[prefix + "saving_rank"] = torch.tensor(_group_rank(self.process_group))
        out[prefix + "sum_format"] = torch.tensor(CHECKPOINT_FORMAT)
        return out

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        if prefix + "sum_format" in state_dict:
            self._load_sums(state_dict, prefix)
        elif any(prefix + name in state_dict for name in self._sum_names):
            self._load_local_sums_of_version_0_1(state_dict, prefix)
        elif strict and any(self._persistent[name] for name in self._sum_names):
            missing_keys.extend(prefix + key for key in _CHECKPOINT_KEYS)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _load_sums(self, state_dict: dict[str, Any], prefix: str) -> None:
        entries = {key: state_dict.pop(prefix + key, None) for key in _CHECKPOINT_KEYS}
        missing = [prefix + key for key, value in entries.items() if value is None]
        if missing:
            raise ValueError(f"Expected the checkpoint of {type(self).__name__} to hold {missing} as well.")
        version = int(entries["sum_format"])
        if version != CHECKPOINT_FORMAT:
            raise ValueError(
                f"Expected `{prefix}sum_format` to be {CHECKPOINT_FORMAT}, got {version}: "
                "this checkpoint was written by a newer version of losses."
            )
        expected = sum(shape.numel() for shape in self._sum_shapes)
        for key in ("synced_sums", "unsynced_sums"):
            if tuple(entries[key].shape) != (expected,):
                layout = dict(zip(self._sum_names, (tuple(s) for s in self._sum_shapes), strict=True))
                raise ValueError(
                    f"Expected `{prefix}{key}` to hold {expected} numbers (the states {layout}), "
                    f"got shape {tuple(entries[key].shape)}."
                )
        rank = _group_rank(self.process_group)
        local = self._pack().new_zeros(expected)
        if rank == 0:
            local += entries["synced_sums"].to(local)
        if rank == int(entries["saving_rank"]):
            local += entries["unsynced_sums"].to(local)
        self._restart_from(local)

    def _load_local_sums_of_version_0_1(self, state_dict: dict[str, Any], prefix: str) -> None:
        sums = {name: state_dict.pop(prefix + name, None) for name in self._sum_names}
        current = self._pack()
        loaded = {
            name: (torch.zeros(shape, dtype=SUM_DTYPE) if value is None else value).to(current).reshape(shape)
            for (name, value), shape in zip(sums.items(), self._sum_shapes, strict=True)
        }
        size = _group_size(self.process_group)
        rank = _group_rank(self.process_group)
        if size > 1 and rank == 0:
            warnings.warn(
                "Loaded metric sums written by losses 0.1.0, which saved one rank's local sums only. "
                f"They are counted once, on rank 0 of {size}; whatever the other ranks had recorded "
                "before that save is not in the file. To resume exactly from now on, save new "
                "checkpoints with this version (see 'Checkpoints' in docs/logging.rst).",
                UserWarning,
                stacklevel=4,
            )
        packed = self._pack(loaded)
        self._restart_from(packed if rank == 0 else torch.zeros_like(packed))

    def _restart_from(self, local: torch.Tensor) -> None:
        self._unpack(local.clone())
        self._forget_sync()
        self._loaded = True
        self._computed = None
        self._cache = None
        self._is_synced = False


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor in a tensor, dict, list or tuple (cached metric results)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {key: _map_tensors(item, fn) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(item, fn) for item in value)
    return value


def sync_sum_metrics(metrics: Iterable[SumMetric]) -> None:
    """Sync ``metrics`` on every rank, one ``all_reduce`` per process group and device.

    Each metric then remembers the global sums of this moment, so a checkpoint written next by any
    single rank holds everything recorded so far on every rank. Metrics built with
    ``sync_on_compute=False`` are left alone (their values are per rank by choice); a metric with
    its own ``dist_sync_fn`` syncs through it. Every rank must call this, with the same metrics in
    the same order; without a process group it does nothing.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    batches: dict[tuple[int, torch.device], tuple[Any, list[SumMetric]]] = {}
    for metric in metrics:
        if not metric.sync_on_compute or metric._is_synced:
            continue
        if metric.dist_sync_fn is not None:
            metric.sync(dist_sync_fn=metric.dist_sync_fn)
            metric.unsync()
            continue
        key = (id(metric.process_group), metric.device)
        batches.setdefault(key, (metric.process_group, []))[1].append(metric)
    for group, members in batches.values():
        locals_ = [metric._pack() for metric in members]
        synced = torch.cat(locals_)
        dist.all_reduce(synced, op=dist.ReduceOp.SUM, group=group)
        pieces = torch.split(synced, [local.numel() for local in locals_])
        for metric, local, piece in zip(members, locals_, pieces, strict=True):
            metric._remember_sync(piece.clone(), local)
