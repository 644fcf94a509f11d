"""The builders against our restatement of the ancestor's semantics (tests/reference.py), on random configurations.

Each configuration is drawn from its own seed, so a failing id reproduces alone: it names the
task count ``T``, the batch size ``B`` (0 and 1 included), both reductions, how ``pos_weights``
are given (list, list of ints, numpy array, tensor), the weights (none, positive, some zero, a
zero task, all zero, one per row with and without zeros), the label dtype (float 0/1, soft
float, int, bool), the kind of logits (normal; extreme, up to 1e30 in magnitude; one +inf with
label 0) and the dtype. Values and gradients (a fixed random cotangent for every output) are
compared in float64 and float32.
"""

from __future__ import annotations

import itertools
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import pytest
import torch

from losses import LossType, build_loss, build_multi_task_loss, get_global_loss_detached
from tests import reference

TASK_NAMES = ("fav", "reply", "repost", "click", "share", "follow")
DTYPES = (torch.float64, torch.float32)
REDUCTION_PAIRS = list(itertools.product(("mean", "sum", "none"), ("mean", "sum", "min", "max", "median")))
BATCH_SIZES = (0, 1, 1, 2, 3, 5, 8, 17, 64)
INT_DTYPES = (torch.int64, torch.int32, torch.uint8)


@dataclass(frozen=True)
class MultiTaskCase:
    seed: int
    tasks: int
    batch: int
    task_loss_reduction: str
    global_reduction: str
    pos_weights: str
    weights: str
    labels: str
    logits: str
    dtype: torch.dtype

    @property
    def id(self) -> str:
        return (
            f"{self.seed:03d}-T{self.tasks}-B{self.batch}-{self.task_loss_reduction}-{self.global_reduction}"
            f"-pw_{self.pos_weights}-w_{self.weights}-y_{self.labels}-x_{self.logits}-{str(self.dtype)[6:]}"
        )


def _multi_task_case(seed: int) -> MultiTaskCase:
    rng = random.Random(seed)
    task_loss_reduction, global_reduction = REDUCTION_PAIRS[seed % len(REDUCTION_PAIRS)]
    logits = rng.choice(("normal", "normal", "normal", "normal", "extreme", "inf"))
    # An infinite loss times a zero weight is NaN in torch as in ours; keep weights positive there.
    weight_kinds = (
        ("none", "positive", "rows")
        if logits == "inf"
        else ("none", "positive", "some_zeros", "zero_task", "all_zero", "rows", "rows_some_zeros")
    )
    return MultiTaskCase(
        seed=seed,
        tasks=rng.randint(1, len(TASK_NAMES)),
        batch=rng.choice(BATCH_SIZES),
        task_loss_reduction=task_loss_reduction,
        global_reduction=global_reduction,
        pos_weights=rng.choice(("none", "list", "int_list", "numpy", "tensor")),
        weights=rng.choice(weight_kinds),
        # Soft labels at an infinite logit give NaN in torch (inf - inf); the +inf goes where y = 0.
        labels=rng.choice(("float", "int", "bool") if logits == "inf" else ("float", "soft", "int", "bool")),
        logits=logits,
        dtype=rng.choice(DTYPES),
    )


MULTI_TASK_CASES = [_multi_task_case(seed) for seed in range(300)]


def _labels(kind: str, shape: tuple[int, ...], gen: torch.Generator, seed: int) -> torch.Tensor:
    if kind == "soft":
        return torch.rand(shape, generator=gen, dtype=torch.float64)
    hard = torch.rand(shape, generator=gen) < 0.4
    if kind == "bool":
        return hard
    if kind == "int":
        return hard.to(INT_DTYPES[seed % len(INT_DTYPES)])
    return hard.double()


def _logits(kind: str, shape: tuple[int, ...], labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    logits = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    if kind == "extreme":
        # Magnitudes spread over 10**1.5 .. 10**30, distinct so that no reduction meets a tie.
        magnitude = 10 ** (1.5 + 28.5 * torch.rand(shape, generator=gen, dtype=torch.float64))
        sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).double()
        logits = torch.where(torch.rand(shape, generator=gen) < 0.3, sign * magnitude, logits)
    elif kind == "inf":
        negatives = (labels.double() == 0).flatten().nonzero()
        if len(negatives):
            pick = negatives[torch.randint(len(negatives), (1,), generator=gen)]
            logits.view(-1)[pick] = float("inf")
    return logits


def _pos_weights(kind: str, tasks: int, gen: torch.Generator, dtype: torch.dtype) -> Any:
    values = torch.rand(tasks, generator=gen, dtype=torch.float64) * 4
    values[torch.rand(tasks, generator=gen) < 0.15] = 0.0
    if kind == "none":
        return None
    if kind == "list":
        return values.tolist()
    if kind == "int_list":
        return [int(value) for value in values.round()]
    if kind == "numpy":
        return values.numpy()
    return values.to(dtype)


def _weights(kind: str, shape: tuple[int, int], gen: torch.Generator) -> Optional[torch.Tensor]:
    batch, tasks = shape
    positive = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.05
    if kind == "none":
        return None
    if kind == "positive":
        return positive
    if kind == "some_zeros":
        return positive * (torch.rand(shape, generator=gen) < 0.6)
    if kind == "zero_task":
        positive[:, int(torch.randint(tasks, (), generator=gen))] = 0.0
        return positive
    if kind == "all_zero":
        return torch.zeros(shape, dtype=torch.float64)
    if kind == "rows":
        return positive[:, 0]
    return positive[:, 0] * (torch.rand(batch, generator=gen) < 0.6)


def _multi_task_inputs(case: MultiTaskCase) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Any]:
    gen = torch.Generator().manual_seed(case.seed)
    shape = (case.batch, case.tasks)
    labels = _labels(case.labels, shape, gen, case.seed)
    logits = _logits(case.logits, shape, labels, gen).to(case.dtype)
    weights = _weights(case.weights, shape, gen)
    pos_weights = _pos_weights(case.pos_weights, case.tasks, gen, case.dtype)
    if labels.is_floating_point():
        labels = labels.to(case.dtype)
    return logits, labels, None if weights is None else weights.to(case.dtype), pos_weights


def _cotangents(outputs: dict[str, torch.Tensor], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(value.shape, generator=gen, dtype=torch.float64).to(value.dtype) for value in outputs.values()]


def _input_gradient(outputs: dict[str, torch.Tensor], logits: torch.Tensor, seed: int) -> torch.Tensor:
    assert all(value.requires_grad for value in outputs.values()), "every output must be differentiable"
    (grad,) = torch.autograd.grad(list(outputs.values()), logits, _cotangents(outputs, seed))
    return grad


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Run these small batches on one thread: waking a second one for each op costs more than the op.

    On a loaded machine every parallel region waits for the scheduler; one thread keeps this
    module at a few seconds there too.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _quietly(build: Any, *args: Any, **kwargs: Any) -> Any:
    # Reductions other than mean warn at construction; the warning is tested in test_builders.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return build(*args, **kwargs)


@pytest.mark.parametrize("case", MULTI_TASK_CASES, ids=[case.id for case in MULTI_TASK_CASES])
def test_build_multi_task_loss_matches_the_reference(case: MultiTaskCase) -> None:
    logits, labels, weights, pos_weights = _multi_task_inputs(case)
    tasks = TASK_NAMES[: case.tasks]
    loss_type = LossType.BCE_WITH_LOGITS if case.seed % 2 else "bce_with_logits"
    loss = _quietly(
        build_multi_task_loss, loss_type, tasks, case.task_loss_reduction, case.global_reduction, pos_weights
    )
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = loss(ours_in, labels, weights)
    expected = reference.multi_task_loss(
        ref_in, labels, weights, tasks, case.task_loss_reduction, case.global_reduction, pos_weights
    )
    assert list(ours) == list(expected)
    for key, value in expected.items():
        assert ours[key].dtype == value.dtype, key
        torch.testing.assert_close(ours[key], value, msg=lambda text, key=key: f"{key}: {text}")
    torch.testing.assert_close(
        _input_gradient(ours, ours_in, case.seed),
        _input_gradient(expected, ref_in, case.seed),
        msg=lambda text: f"gradient: {text}",
    )


@dataclass(frozen=True)
class SingleTaskCase:
    seed: int
    loss_type: str
    shape: tuple[int, ...]
    reduction: str
    labels: str
    dtype: torch.dtype

    @property
    def id(self) -> str:
        shape = "x".join(map(str, self.shape))
        return f"{self.seed:03d}-{self.loss_type}-{shape}-{self.reduction}-y_{self.labels}-{str(self.dtype)[6:]}"


def _single_task_case(seed: int) -> SingleTaskCase:
    rng = random.Random(seed)
    batch = rng.choice(BATCH_SIZES)
    loss_type = rng.choice(("bce_with_logits", "cross_entropy"))
    if loss_type == "bce_with_logits":
        shape = rng.choice(((batch,), (batch, rng.randint(1, 5)), (batch, 3, 2)))
        labels = rng.choice(("float", "soft", "int", "bool"))
    else:
        shape = rng.choice(((batch, rng.randint(2, 6)), (batch, 3, 2)))
        labels = rng.choice(("classes", "classes_some_ignored", "classes_all_ignored"))
    return SingleTaskCase(seed, loss_type, shape, ("mean", "sum", "none")[seed % 3], labels, rng.choice(DTYPES))


SINGLE_TASK_CASES = [_single_task_case(seed) for seed in range(100)]


def _single_task_inputs(case: SingleTaskCase) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(case.seed)
    logits = (torch.randn(case.shape, generator=gen, dtype=torch.float64) * 2).to(case.dtype)
    if case.loss_type == "bce_with_logits":
        labels = _labels(case.labels, case.shape, gen, case.seed)
        return logits, labels.to(case.dtype) if labels.is_floating_point() else labels
    sample_shape = case.shape[:1] + case.shape[2:]
    labels = torch.randint(case.shape[1], sample_shape, generator=gen)
    if case.labels == "classes_some_ignored":
        labels[torch.rand(sample_shape, generator=gen) < 0.3] = -100
    elif case.labels == "classes_all_ignored":
        labels[:] = -100
    return logits, labels


@pytest.mark.parametrize("case", SINGLE_TASK_CASES, ids=[case.id for case in SINGLE_TASK_CASES])
def test_build_loss_matches_the_reference(case: SingleTaskCase) -> None:
    logits, labels = _single_task_inputs(case)
    loss_type = LossType(case.loss_type) if case.seed % 2 else case.loss_type
    loss = _quietly(build_loss, loss_type, case.reduction)
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = {"loss": loss(ours_in, labels)}
    expected = {"loss": reference.single_task_loss(case.loss_type, ref_in, labels, case.reduction)}
    assert ours["loss"].dtype == expected["loss"].dtype
    torch.testing.assert_close(ours["loss"], expected["loss"])
    torch.testing.assert_close(_input_gradient(ours, ours_in, case.seed), _input_gradient(expected, ref_in, case.seed))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(), (3,)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_get_global_loss_detached_on_one_process(reduction, shape, dtype, requires_grad) -> None:
    """World size 1: the value itself, in a new detached tensor; half precision comes back in float32."""
    gen = torch.Generator().manual_seed(0)
    local = (torch.rand(shape, generator=gen, dtype=torch.float64) * 100).to(dtype)
    if dtype == torch.float16:
        local = local + 60000  # near float16's largest value, 65504
    local.requires_grad_(requires_grad)
    before = local.detach().clone()
    out = _quietly(get_global_loss_detached, local, reduction)
    assert not out.requires_grad
    assert out.dtype == (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    assert out.data_ptr() != local.data_ptr()
    torch.testing.assert_close(out.double(), reference.global_loss([local], reduction), rtol=0, atol=0)
    assert torch.equal(local.detach(), before)
