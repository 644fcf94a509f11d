"""torch's own sample inputs for its two losses, run through our functional twins and our modules.

torch's test suite ships sample inputs for every operator (``OpInfo`` in ``op_db``) and module
(``ModuleInfo`` in ``module_db``). We take all of them for ``binary_cross_entropy_with_logits``
and ``cross_entropy`` (and for ``nn.BCEWithLogitsLoss`` / ``nn.CrossEntropyLoss``), in float64,
float32 and bfloat16, and run each through :func:`losses.functional.binary_cross_entropy_with_logits`
/ :func:`losses.functional.cross_entropy` and through :class:`losses.BCEWithLogitsLoss` /
:class:`losses.CrossEntropyLoss`, comparing the value and the gradient with respect to the logits
with torch's op on the same sample. These inputs were written by torch's authors, not by us: odd
shapes, weights of every sign, targets outside [0, 1], scalars. Per dtype that is 32 BCE samples
(26 OpInfo, 6 ModuleInfo) and 126 cross-entropy samples (21 OpInfo, 105 ModuleInfo), each run
through both paths. ModuleInfo declares float32 and float64 only; its sample functions draw
bfloat16 just as well, so we take those too.

torch's keyword arguments map to ours: BCE ``weight`` (per element) is our ``weights`` (a
``forward`` argument of the module); cross-entropy ``weight`` (per class) is the functional's
``class_weight`` and the module's ``weight``; ``pos_weight``, ``reduction``, ``ignore_index`` and
``label_smoothing`` keep their names.

bfloat16: our losses compute half precision in float32 and return a float32 loss, so the reference
is torch's op on the float32 upcast of the sample (exact: every bfloat16 is a float32). The value
is compared at float32 tolerance; our gradient, which comes back in bfloat16, is compared with the
reference gradient rounded to bfloat16.

The documented differences from torch are asserted, not skipped:

- a negative class weight is rejected by :class:`~losses.CrossEntropyLoss` with a ``ValueError``
  naming ``weight`` (torch's samples draw class weights from [-9, 9]); the functional twin takes
  it and must match torch; the module is then checked on the same sample with ``|weight|``;
- cross-entropy whose labels are all ``ignore_index``, reduced by ``mean``, gives 0 and a zero
  gradient, where torch gives NaN;
- an empty batch reduced by ``mean`` gives 0, where torch gives NaN (``sum`` gives 0 and
  ``none`` an empty tensor, as torch).

No sample has a shape we reject by design: every one runs through both paths.

The samples are drawn once, at import, from a fixed seed (torch's sample functions use the global
generators of torch and of Python's ``random``), inside ``fork_rng`` so that the rest of the suite
sees its random state unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from losses import BCEWithLogitsLoss, CrossEntropyLoss, functional


def _import_torch_samples() -> tuple[list[Any], list[Any]]:
    """``op_db`` and ``module_db``, without the global changes importing torch's test helpers makes.

    ``torch.testing._internal.common_utils`` freezes the ``torch.backends`` flags and wraps
    TorchScript calls in a profiler when imported; neither may leak into the other tests of this
    process, so both are held in place for the import and restored after it.
    """
    with (
        mock.patch.object(torch.backends, "disable_global_flags", return_value=None),
        mock.patch.object(torch._C.ScriptFunction, "__call__", torch._C.ScriptFunction.__call__),
        mock.patch.object(torch._C.ScriptMethod, "__call__", torch._C.ScriptMethod.__call__),
    ):
        from torch.testing._internal.common_methods_invocations import op_db
        from torch.testing._internal.common_modules import module_db
    return op_db, module_db


OP_DB, MODULE_DB = _import_torch_samples()


DTYPES = (torch.float64, torch.float32, torch.bfloat16)
SEED = 20240601
TORCH_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "bce": F.binary_cross_entropy_with_logits,
    "ce": F.cross_entropy,
}
OPINFO_NAMES = {
    "nn.functional.binary_cross_entropy_with_logits": "bce",
    "nn.functional.cross_entropy": "ce",
}
MODULEINFO_CLASSES = {torch.nn.BCEWithLogitsLoss: "bce", torch.nn.CrossEntropyLoss: "ce"}


@dataclass
class Sample:
    """One of torch's samples as the functional call it stands for: ``torch_op(logits, labels, **kwargs)``."""

    name: str
    op: str
    logits: torch.Tensor
    labels: torch.Tensor
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def reduction(self) -> str:
        return str(self.kwargs.get("reduction", "mean"))


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _describe(logits: torch.Tensor, labels: torch.Tensor, kwargs: dict[str, Any]) -> str:
    parts = [f"x{tuple(logits.shape)}", f"y{tuple(labels.shape)}{'int' if not labels.is_floating_point() else ''}"]
    for key, value in kwargs.items():
        parts.append(f"{key}{tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"{key}={value}")
    return "-".join(parts).replace(" ", "")


def _opinfo_samples(dtype: torch.dtype) -> Iterator[Sample]:
    for info in OP_DB:
        op = OPINFO_NAMES.get(info.name)
        if op is None:
            continue
        for index, sample in enumerate(info.sample_inputs("cpu", dtype, requires_grad=False)):
            logits, labels = sample.input.detach(), sample.args[0].detach()
            kwargs = {key: _detached(value) for key, value in sample.kwargs.items()}
            name = f"opinfo-{op}-{str(dtype)[6:]}-{index:02d}-{_describe(logits, labels, kwargs)}"
            yield Sample(name, op, logits, labels, kwargs)


def _moduleinfo_samples(dtype: torch.dtype) -> Iterator[Sample]:
    for info in MODULE_DB:
        op = MODULEINFO_CLASSES.get(info.module_cls)
        if op is None:
            continue
        for index, sample in enumerate(info.module_inputs_func(info, "cpu", dtype, False, True)):
            logits, labels = (value.detach() for value in sample.forward_input.args)
            kwargs = {key: _detached(value) for key, value in sample.constructor_input.kwargs.items()}
            name = f"moduleinfo-{op}-{str(dtype)[6:]}-{index:03d}-{sample.desc or 'default'}"
            yield Sample(name, op, logits, labels, kwargs)


def _all_samples() -> list[Sample]:
    with torch.random.fork_rng(devices=[]):
        python_state = random.getstate()
        try:
            samples = []
            for dtype in DTYPES:
                torch.manual_seed(SEED)
                random.seed(SEED)
                samples += [*_opinfo_samples(dtype), *_moduleinfo_samples(dtype)]
            return samples
        finally:
            random.setstate(python_state)


SAMPLES = _all_samples()


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Run these tiny ops on one thread: waking a second one for each costs more than the op.

    On a loaded machine every parallel region waits for the scheduler, which made this module
    take a minute instead of seconds; values do not depend on it (torch runs under the same setting).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ours(sample: Sample, through: str, logits: torch.Tensor) -> torch.Tensor:
    kwargs = sample.kwargs
    if sample.op == "bce":
        if through == "functional":
            return functional.binary_cross_entropy_with_logits(
                logits,
                sample.labels,
                weights=kwargs.get("weight"),
                pos_weight=kwargs.get("pos_weight"),
                reduction=sample.reduction,  # type: ignore[arg-type]
            )
        module = BCEWithLogitsLoss(pos_weight=kwargs.get("pos_weight"), reduction=sample.reduction)  # type: ignore[arg-type]
        return module(logits, sample.labels, kwargs.get("weight"))
    options = {
        "ignore_index": kwargs.get("ignore_index", -100),
        "reduction": sample.reduction,
        "label_smoothing": kwargs.get("label_smoothing", 0.0),
    }
    if through == "functional":
        return functional.cross_entropy(logits, sample.labels, class_weight=kwargs.get("weight"), **options)
    return CrossEntropyLoss(weight=kwargs.get("weight"), **options)(logits, sample.labels)


def _upcast(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16:
        return value.float()
    return value


def _reference(sample: Sample, logits: torch.Tensor) -> torch.Tensor:
    """torch's op on the sample; for bfloat16 on its float32 upcast, where ours computes too."""
    kwargs = {key: _upcast(value) for key, value in sample.kwargs.items()}
    return TORCH_OPS[sample.op](_upcast(logits), _upcast(sample.labels), **kwargs)


def _all_ignored(sample: Sample) -> bool:
    return (
        sample.op == "ce"
        and not sample.labels.is_floating_point()
        and bool((sample.labels == sample.kwargs.get("ignore_index", -100)).all())
    )


def _value_and_grad(
    fn: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The value of ``fn(logits)`` and its vector-Jacobian product with a fixed random cotangent."""
    x = logits.clone().requires_grad_()
    value = fn(x)
    cotangent = torch.rand(value.shape, generator=torch.Generator().manual_seed(0), dtype=value.dtype)
    (grad,) = torch.autograd.grad(value, x, cotangent)
    return value.detach(), grad


def _compare(sample: Sample, through: str) -> None:
    dtype = sample.logits.dtype
    reference, ref_grad = _value_and_grad(lambda x: _reference(sample, x), _upcast(sample.logits))
    ours, grad = _value_and_grad(lambda x: _ours(sample, through, x), sample.logits)
    assert ours.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    assert grad.dtype == dtype
    if _all_ignored(sample) and sample.reduction == "mean":
        assert torch.isnan(reference), "torch gives NaN for an all-ignored mean; we document 0"
        assert ours.item() == 0.0
        assert torch.equal(grad, torch.zeros_like(grad))
        return
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(grad, ref_grad.to(dtype))


def _negative_class_weight(sample: Sample) -> bool:
    weight = sample.kwargs.get("weight")
    return sample.op == "ce" and weight is not None and bool((weight < 0).any())


@pytest.mark.parametrize("through", ["functional", "module"])
@pytest.mark.parametrize("sample", SAMPLES, ids=[sample.name for sample in SAMPLES])
def test_torch_sample(sample: Sample, through: str) -> None:
    if through == "module" and _negative_class_weight(sample):
        weight = sample.kwargs["weight"]
        with pytest.raises(ValueError, match=r"Expected `weight` to be non-negative and finite, got \["):
            CrossEntropyLoss(weight=weight)
        sample = Sample(sample.name, sample.op, sample.logits, sample.labels, {**sample.kwargs, "weight": weight.abs()})
    _compare(sample, through)


def test_the_samples_cover_the_documented_differences() -> None:
    """Guard: torch still ships the samples we count on, negative class weights among them.

    A new torch with more or fewer samples fails here: look at what changed, then update the counts.
    """
    for dtype in DTYPES:
        of_dtype = [sample for sample in SAMPLES if sample.logits.dtype == dtype]
        assert sum(sample.op == "bce" for sample in of_dtype) == 32
        assert sum(sample.op == "ce" for sample in of_dtype) == 126
        assert any(_negative_class_weight(sample) for sample in of_dtype)


# Derived from torch's ignore_index samples: every label ignored.
ALL_IGNORED = [
    pytest.param({"ignore_index": 1}, id="ignore_index"),
    pytest.param({"ignore_index": 1, "weight": torch.tensor([0.5, 2.0, 3.0])}, id="ignore_index-weight"),
    pytest.param({"ignore_index": 1, "label_smoothing": 0.15}, id="ignore_index-label_smoothing"),
    pytest.param({"ignore_index": -100, "weight": torch.tensor([0.5, 2.0, 3.0])}, id="default_ignore_index-weight"),
]


@pytest.mark.parametrize("through", ["functional", "module"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kwargs", ALL_IGNORED)
@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 1, 2)], ids=str)
def test_all_ignored_cross_entropy_mean_is_zero(shape: tuple[int, ...], kwargs: dict[str, Any], dtype, through) -> None:
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    labels = torch.full(shape[:1] + shape[2:], kwargs["ignore_index"], dtype=torch.long)
    kwargs = {key: value.to(dtype) if isinstance(value, torch.Tensor) else value for key, value in kwargs.items()}
    sample = Sample("all-ignored", "ce", logits, labels, kwargs)
    _compare(sample, through)


@pytest.mark.parametrize("through", ["functional", "module"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    ("op", "logits_shape", "labels_shape", "labels_dtype"),
    [
        pytest.param("bce", (0,), (0,), None, id="bce-x(0,)"),
        pytest.param("bce", (0, 5), (0, 5), None, id="bce-x(0,5)"),
        pytest.param("ce", (0, 3), (0,), torch.long, id="ce-x(0,3)-yint"),
        pytest.param("ce", (0, 3, 2), (0, 2), torch.long, id="ce-x(0,3,2)-yint"),
        pytest.param("ce", (0, 3), (0, 3), None, id="ce-x(0,3)-yprob"),
    ],
)
def test_empty_batch(op, logits_shape, labels_shape, labels_dtype, reduction, dtype, through) -> None:
    """An empty batch: ``mean`` gives 0 (torch: NaN), ``sum`` 0, ``none`` an empty tensor; no NaN gradient."""
    logits = torch.zeros(logits_shape, dtype=dtype)
    labels = torch.zeros(labels_shape, dtype=labels_dtype or dtype)
    sample = Sample("empty", op, logits, labels, {"reduction": reduction})
    ours, grad = _value_and_grad(lambda x: _ours(sample, through, x), logits)
    reference = _reference(sample, logits)
    assert ours.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    assert ours.shape == reference.shape
    if reduction == "mean":
        assert torch.isnan(reference), "torch gives NaN for the mean of an empty batch; we document 0"
        assert ours.item() == 0.0
    elif reduction == "sum":
        assert ours.item() == 0.0 == reference.item()
    assert grad.shape == logits.shape
