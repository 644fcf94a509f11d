"""Argument checks shared by the loss modules and metrics: one argument, one rule.

The checks of each call path, built from these, are in :mod:`losses._input_checks`.

Everything here runs once at construction or compares shapes and dtypes, which never touches
tensor data and so never waits on the device; the one exception, :func:`check_values`, runs only
when a loss was built with ``check_inputs=True``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, Optional, Protocol, Union, overload

import torch


class SupportsArray(Protocol):
    """Anything NumPy can turn into an array: a NumPy array, or an object with ``__array__``."""

    def __array__(self) -> Any: ...


#: What a weight argument accepts: a tensor, a sequence of numbers, or an array.
TensorLike = Union[torch.Tensor, Sequence[float], SupportsArray]

#: Reductions that reduce a tensor of element losses to one value (or keep them, ``none``).
ELEMENT_REDUCTIONS = ("mean", "sum", "none")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ``ValueError`` naming ``name``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {tuple(choices)}, got {value!r}.")
    return value


def check_probability(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a real number (NumPy's included, ``bool`` refused) in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Expected `{name}` to be a float in [0, 1], got {type(value).__name__}.")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"Expected `{name}` to be in [0, 1], got {value!r}.")
    return float(value)


#: Where a learned version of a weight argument lives, for the error that refuses a learnable one.
_LEARNED_ALTERNATIVES = {
    "task_weights": ", or learn task weights with `MultiTaskLoss(..., weighting=losses.UncertaintyWeighting(tasks))`",
}


def weight_tensor(name: str, value: Optional[TensorLike]) -> Optional[torch.Tensor]:
    """Turn a weight into a one-dimensional floating tensor, a constant to be stored as a buffer.

    ``value`` is a tensor that does not require grad (copied, its floating dtype kept), or
    anything :func:`torch.as_tensor` takes that holds real numbers (a list, a tuple, a NumPy array,
    an object with ``__array__``), converted to the default dtype. The weight must be non-negative
    and finite. Checking that reads the data once, which is fine here because it runs at
    construction, not in ``forward``; the values of a ``meta`` tensor cannot be read and are not
    checked.
    """
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            # A buffer is a constant: a learnable weight would silently never learn.
            raise ValueError(
                f"Expected `{name}` not to require grad: it is stored as a buffer and is not learned. "
                f"Pass a plain tensor (`{name}.detach()`){_LEARNED_ALTERNATIVES.get(name, '')}."
            )
        tensor = value.detach().clone()
    elif isinstance(value, (str, bytes)) or not (isinstance(value, Sequence) or hasattr(value, "__array__")):
        raise TypeError(
            f"Expected `{name}` to be a tensor, a sequence or an array of numbers, got {type(value).__name__}."
        )
    else:
        try:
            if not isinstance(value, Sequence):
                import numpy  # an object with __array__ comes from a library that has NumPy

                value = numpy.array(value)  # a copy: torch cannot take a view with negative strides
            # On the CPU, so that the values can be checked even under a `torch.device("meta")` context.
            tensor = torch.as_tensor(value, device="cpu")
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"Expected `{name}` to be a sequence or an array of numbers, got {value!r}.") from err
        if tensor.is_floating_point():  # a float64 NumPy array gives a buffer of the default dtype, as a list does
            tensor = tensor.to(torch.get_default_dtype())
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"Expected `{name}` to hold real numbers, got dtype {tensor.dtype}.")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    if tensor.ndim != 1:
        raise ValueError(f"Expected `{name}` to have 1 dimension(s), got shape {tuple(tensor.shape)}.")
    if tensor.device.type != "meta" and (not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any())):
        raise ValueError(f"Expected `{name}` to be non-negative and finite, got {tensor.tolist()}.")
    return tensor


def check_same_shape(name: str, tensor: torch.Tensor, expected: torch.Size, against: str) -> None:
    """Raise unless ``tensor`` has exactly the shape ``expected`` (the shape of ``against``)."""
    if tensor.shape != expected:
        raise ValueError(
            f"Expected `{name}` to have the shape of `{against}` {tuple(expected)}, got {tuple(tensor.shape)}."
        )


def check_broadcasts_to(name: str, tensor: torch.Tensor, target: torch.Size, against: str) -> None:
    """Raise unless ``tensor`` broadcasts to ``target`` without changing it."""
    shape = tensor.shape
    fits = len(shape) <= len(target) and all(
        size in (1, wanted) for size, wanted in zip(reversed(shape), reversed(target), strict=False)
    )
    if not fits:
        raise ValueError(
            f"Expected `{name}` of shape {tuple(tensor.shape)} to broadcast to the shape of `{against}` "
            f"{tuple(target)}."
        )


@overload
def on_device_of(name: str, buffer: torch.Tensor, logits: torch.Tensor) -> torch.Tensor: ...


@overload
def on_device_of(name: str, buffer: Optional[torch.Tensor], logits: torch.Tensor) -> Optional[torch.Tensor]: ...


def on_device_of(name: str, buffer: Optional[torch.Tensor], logits: torch.Tensor) -> Optional[torch.Tensor]:
    """A loss's ``buffer`` on the device of ``logits``: as it is, or a ``meta`` copy for meta logits.

    Meta logits (shape inference, no data) need no values from the buffer, so a loss whose
    buffers hold real values works on them without being moved. Any other mismatch is an error
    naming both devices, instead of torch's device error deep inside the math.
    """
    if buffer is None or buffer.device == logits.device:
        return buffer
    if logits.device.type == "meta":
        return buffer.to("meta")
    raise ValueError(
        f"Expected `logits` on the device of the loss's `{name}` ({buffer.device}), got {logits.device}. "
        "Move the loss with `.to(device)`, as the model that holds it."
    )


def check_tensor(name: str, value: Any) -> torch.Tensor:
    """Raise a ``TypeError`` unless ``value`` is a tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, got {type(value).__name__}.")
    return value


def check_int(name: str, value: Any) -> int:
    """Return ``value`` as an ``int`` if it is an integer (NumPy's included, ``bool`` refused), else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Expected `{name}` to be an int, got {type(value).__name__}.")
    return int(value)


def check_real_tensors(**tensors: Any) -> None:
    """Raise a ``TypeError`` naming the first argument that is neither ``None`` nor a real tensor.

    Complex tensors are refused: torch would drop their imaginary part with a mere warning.
    """
    for name, value in tensors.items():
        if value is not None and check_tensor(name, value).is_complex():
            raise TypeError(f"Expected `{name}` to hold real numbers, got dtype {value.dtype}.")


def check_same_device(logits: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    """Raise a ``ValueError`` naming the first tensor that is not on the device of ``logits`` (reads no data).

    Meta logits too: torch's kernels refuse a CPU label beside them with an error that names no
    argument. (A loss's own buffers are another matter: :func:`on_device_of` lends them to meta logits.)
    """
    device = logits.device
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != device:
            raise ValueError(f"Expected `{name}` on the device of `logits` ({device}), got {tensor.device}.")


def check_loss_arguments(reduction: Any, label_smoothing: Any, **tensors: Any) -> None:
    """The checks of a single-task loss function: its options, then its tensors (see :func:`check_real_tensors`)."""
    check_choice("reduction", reduction, ELEMENT_REDUCTIONS)
    check_probability("label_smoothing", label_smoothing)
    check_real_tensors(**tensors)


def check_task_vector(name: str, value: Any, num_tasks: int) -> None:
    """Raise unless ``value`` is ``None`` or a constant real tensor of shape ``(num_tasks,)``: one number per task.

    A per-task vector that requires grad is refused: the multi-task math differentiates the logits only.
    """
    check_real_tensors(**{name: value})
    check_no_grad(name, value, "the multi-task losses differentiate with respect to `logits` only.")
    if value is not None and value.shape != (num_tasks,):
        raise ValueError(
            f"Expected `{name}` to hold one value per task, shape ({num_tasks},), got {tuple(value.shape)}."
        )


def check_no_grad(name: str, tensor: Optional[torch.Tensor], reason: str) -> None:
    """Raise a ``ValueError`` if ``tensor`` requires grad where its gradient would be missing (``reason`` says why)."""
    if tensor is not None and tensor.requires_grad:
        raise ValueError(f"Expected `{name}` not to require grad: {reason} Pass `{name}.detach()`.")


def check_floating(name: str, tensor: torch.Tensor) -> None:
    """Raise a ``TypeError`` unless ``tensor`` holds floating point numbers."""
    if not tensor.is_floating_point():
        raise TypeError(f"Expected `{name}` to be a floating point tensor, got dtype {tensor.dtype}.")


def task_names(tasks: Sequence[str]) -> tuple[str, ...]:
    """Return the task names as a tuple: a non-empty sequence of distinct, non-empty strings."""
    if isinstance(tasks, str) or not isinstance(tasks, Sequence):
        raise TypeError(f"Expected `tasks` to be a sequence of task names, got {type(tasks).__name__}.")
    names = tuple(tasks)
    if not names:
        raise ValueError("Expected `tasks` to name at least one task, got an empty sequence.")
    bad = [name for name in names if not isinstance(name, str) or not name]
    if bad:
        raise ValueError(f"Expected every task name to be a non-empty str, got {bad!r}.")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"Expected unique task names, got duplicates {duplicates} in {list(names)}.")
    return names


#: Maps an index into the checked tensor to the index the caller's user knows (a part of a block to the block).
IndexMap = Callable[[tuple[int, ...]], tuple[int, ...]]


def _first_bad(
    name: str, tensor: torch.Tensor, bad: torch.Tensor, expectation: str, index_map: Optional[IndexMap] = None
) -> None:
    # Reading `bad` waits for the device: only called when the caller opted in to value checks.
    count = int(bad.sum())
    if count:
        index = tuple(int(i) for i in bad.nonzero()[0])
        value = tensor[index].item()
        shown = index if index_map is None else index_map(index)
        raise ValueError(
            f"Expected `{name}` to be {expectation}, got {count} entries that are not, "
            f"the first at index {shown}: {value!r}."
        )


def check_values(
    name: str,
    tensor: torch.Tensor,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    where: Optional[torch.Tensor] = None,
    allowed: Optional[int] = None,
    index_map: Optional[IndexMap] = None,
) -> None:
    """Opt-in value check (it synchronizes with the device): finite and within ``[low, high]``.

    ``where`` restricts the check to the entries where it is true; ``allowed`` is one extra value
    that passes (an ``ignore_index``); ``index_map`` turns the index of the first bad entry
    into the one the message shows (the block's index of an entry of a part of it). A ``meta``
    tensor holds no values and is not checked, and nothing is checked while ``torch.compile``
    traces: a check reads values, which a compiled graph cannot branch on.
    """
    check_real_tensors(**{name: tensor})
    if tensor.device.type == "meta" or torch.compiler.is_compiling():
        return
    bad = torch.zeros_like(tensor, dtype=torch.bool)
    if tensor.is_floating_point():
        bad |= ~torch.isfinite(tensor)
    if low is not None:
        bad |= tensor < low
    if high is not None:
        bad |= tensor > high
    if allowed is not None:
        bad &= tensor != allowed
    if where is not None:
        bad &= where
    bounds = "finite" if tensor.is_floating_point() else "an integer"
    if low is not None or high is not None:
        bounds += f" in [{'-inf' if low is None else low}, {'inf' if high is None else high}]"
    if allowed is not None:
        bounds += f" or {allowed}"
    _first_bad(name, tensor, bad, bounds, index_map)
