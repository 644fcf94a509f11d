"""The base of every sum metric whose ``compute()`` returns a dict: one result vector, and entries.

A :class:`DictSumMetric` declares its result keys once, at construction, and computes one float64
vector with one value per key (:meth:`DictSumMetric.compute_values`). The base turns that vector
into the dict ``compute()`` returns, and makes the metric a read-only mapping from each key to a
small metric of that entry, so that Lightning's ``self.log_dict(metric)`` logs every entry with one
sync per epoch.

Why the result is built here: a dict of ``K`` scalar tensors costs ``K`` tensor objects, about a
third of a microsecond each on a CPU, which for 500 tasks is more than the sync. The base splits
a fresh result vector into its ``K`` scalars while the packed ``all_reduce`` is in flight, then
copies the computed values into it in one op.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any, Optional

import torch
from torch import nn
from torchmetrics import Metric

from losses._metric_sync import SUM_DTYPE, SumMetric


class DictSumMetric(SumMetric):
    """A :class:`~losses._metric_sync.SumMetric` whose ``compute()`` is a dict of float64 scalars.

    Subclasses call :meth:`set_result_keys` in ``__init__`` and implement :meth:`compute_values`
    (a float64 vector, one value per key, in key order) instead of ``compute``. After ``update``,
    they may return the batch's values from :meth:`update_step_values` for Lightning's ``on_step``.
    """

    result_keys: tuple[str, ...]

    def __init__(self, **metric_kwargs: Any) -> None:
        super().__init__(**metric_kwargs)
        self.result_keys = ()
        self._key_index: dict[str, int] = {}
        self._entries: tuple[_Entry, ...] = ()
        # A result vector split into its scalars during the last sync's collective, for compute().
        self._prepared: Optional[tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = None

    def set_result_keys(self, keys: Sequence[str]) -> None:
        """Declare the keys of ``compute()``'s dict, in order, and build one entry metric per key."""
        self.result_keys = tuple(keys)
        self._key_index = {key: index for index, key in enumerate(self.result_keys)}
        self._entries = tuple(_Entry(self, key, index) for index, key in enumerate(self.result_keys))
        # Submodules, so that Lightning finds them among the module's metrics when they are logged.
        self.entries = nn.ModuleList(self._entries)

    def compute_values(self) -> torch.Tensor:
        """The values of every result key, in order, as one float64 vector on the states' device."""
        raise NotImplementedError(f"{type(self).__name__} does not implement `compute_values`.")

    def update_step_values(self) -> Optional[torch.Tensor]:
        """The values of the last ``update``'s batch alone, as :meth:`compute_values` orders them.

        What the entries give Lightning's ``on_step`` logging after ``update`` (``forward`` sets its
        own). ``None`` by default: nothing is logged on step.
        """
        return None

    # ----------------------------------------------------------------------------------- result

    def compute(self) -> dict[str, torch.Tensor]:
        """The dict of every result key to its float64 scalar, over all updates on all ranks."""
        _refuse_whole_lightning_logging(self)
        prepared = self._prepared
        self.__dict__["_prepared"] = None
        return self.result_dict(self.compute_values(), prepared)

    def result_dict(
        self, values: torch.Tensor, prepared: Optional[tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = None
    ) -> dict[str, torch.Tensor]:
        """``values`` as the dict of ``compute()``: fresh float64 scalars, keyed in order."""
        if values.shape != (len(self.result_keys),):
            raise RuntimeError(
                f"Expected {type(self).__name__}.compute_values() to give {len(self.result_keys)} values, "
                f"got shape {tuple(values.shape)}."
            )
        if prepared is None or prepared[0].device != values.device:
            prepared = _split_vector(len(self.result_keys), values.device)
        vector, scalars = prepared
        vector.copy_(values)
        return dict(zip(self.result_keys, scalars, strict=True))

    def _while_syncing(self) -> None:
        self.__dict__["_prepared"] = _split_vector(len(self.result_keys), self.device)

    def _step_value(self, key: str, index: int) -> Optional[torch.Tensor]:
        forward_value: Any = self._forward_cache  # forward() stores the dict of the batch values
        if isinstance(forward_value, dict):
            return forward_value.get(key)
        values = self.update_step_values()
        return None if values is None else values[index]

    # ------------------------------------------------------------------- a mapping of entries

    # A read-only mapping of entry metrics, for `self.log_dict(metric)`.
    def keys(self) -> tuple[str, ...]:
        return self.result_keys

    def values(self) -> list[Metric]:
        return list(self._entries)

    def items(self) -> list[tuple[str, Metric]]:
        return list(zip(self.result_keys, self._entries, strict=True))

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            index = self._key_index.get(key)
            if index is None:
                shown = list(self.result_keys[:12]) + (["..."] if len(self.result_keys) > 12 else [])
                raise KeyError(f"Expected one of the keys {shown}, got {key!r}.")
            return self._entries[index]
        return super().__getitem__(key)

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]
        return iter(self.result_keys)

    def __len__(self) -> int:
        return len(self.result_keys)

    def __contains__(self, key: object) -> bool:
        return key in self._key_index

    def __repr__(self) -> str:
        # The entry submodules would print one line per key.
        return f"{type(self).__name__}({self.extra_repr()})"


def _split_vector(size: int, device: torch.device) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    vector = torch.empty(size, dtype=SUM_DTYPE, device=device)
    return vector, vector.unbind()


def _refuse_whole_lightning_logging(metric: DictSumMetric) -> None:
    """Raise with the working pattern when Lightning's logger computes the whole metric.

    ``self.log_dict(collection)`` with a MetricCollection holding the metric logs it as one value,
    and Lightning's logger takes one tensor per logged metric: without this, its error at the end
    of the epoch would say the dict is not a tensor but not what to do. Lightning's logged-value
    wrapper is recognised by its attribute ``value`` being this metric, a few frames up.
    """
    frame: Optional[FrameType] = sys._getframe(1)
    for _ in range(6):
        frame = frame.f_back if frame is not None else None
        if frame is None:
            return
        if frame.f_code.co_name != "compute":  # cheap test first: reading f_locals copies them
            continue
        caller = frame.f_locals.get("self")
        if type(caller).__name__ == "_ResultMetric" and getattr(caller, "value", None) is metric:
            name = getattr(getattr(caller, "meta", None), "name", "?")
            raise TypeError(
                f"Expected Lightning to log the entries of {type(metric).__name__}, got the whole metric logged as "
                f"{name!r} (for example by self.log_dict(collection) with a MetricCollection holding it): "
                "Lightning logs one tensor per metric and compute() returns a dict. Log the metric itself with "
                "self.log_dict(metric), which logs each entry; or, for a MetricCollection, call "
                "self.log_dict(collection.compute()) at the end of the epoch, then collection.reset()."
            )


class _Entry(Metric):
    """One entry of a :class:`DictSumMetric` as a metric: Lightning's ``self.log`` takes it.

    It holds no state: ``compute()`` is the parent's cached ``compute()[key]`` (one sync for all
    entries), ``reset()`` resets the parent, and the step value is the parent's batch value.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, parent: DictSumMetric, key: str, index: int) -> None:
        # No sync of its own and no cache: the parent holds both.
        super().__init__(sync_on_compute=False, compute_with_cache=False)
        # Not a submodule: the parent owns the entries, not the other way round.
        self.__dict__["_parent"] = parent
        self.key = key
        self.index = index

    @property
    def parent(self) -> DictSumMetric:
        parent: DictSumMetric = self.__dict__["_parent"]
        return parent

    @property
    def update_called(self) -> bool:
        return self.parent.update_called

    @property
    def update_count(self) -> int:
        return self.parent.update_count

    @property  # type: ignore[override]
    def _forward_cache(self) -> Optional[torch.Tensor]:
        return self.parent._step_value(self.key, self.index)

    @_forward_cache.setter
    def _forward_cache(self, value: Any) -> None:
        pass  # torchmetrics sets it; the value always comes from the parent

    def update(self, *args: Any, **kwargs: Any) -> None:
        name = type(self.parent).__name__
        raise TypeError(
            f"Expected `update` to be called on the {name}, not on its entry {self.key!r}: "
            "metric.update(...) records every entry."
        )

    def compute(self) -> torch.Tensor:
        return self.parent.compute()[self.key]

    def reset(self) -> None:
        super().reset()
        self.parent.reset()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key!r})"
