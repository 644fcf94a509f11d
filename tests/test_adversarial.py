"""Findings of the adversarial pass over the public API (issue 9, point 11) that cut across modules.

Each test pins the outcome of a case that once gave a silent wrong value, a NaN or a deep torch
error: now the correct value or a named error.
"""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from losses import BCEWithLogitsLoss, CrossEntropyLoss, GlobalLoss, MultiTaskGlobalLoss, MultiTaskLoss
from losses import functional as LF

LOG2 = math.log(2.0)


def _single_task_calls():
    """(name, loss, logits, labels, weights) of a valid call for each loss, one argument per slot."""
    return [
        ("bce", BCEWithLogitsLoss(), torch.zeros(2, 2), torch.ones(2, 2), torch.ones(2, 2)),
        ("cross_entropy", CrossEntropyLoss(), torch.zeros(2, 3), torch.tensor([0, 2]), torch.ones(2)),
        ("multi_task", MultiTaskLoss(["a", "b"]), torch.zeros(2, 2), torch.ones(2, 2), torch.ones(2, 2)),
        (
            "multi_task_ce",
            MultiTaskLoss(["a", "b"], loss_type="cross_entropy"),
            torch.zeros(2, 2, 3),
            torch.tensor([[0, 1], [2, 0]]),
            torch.ones(2, 2),
        ),
    ]


CALLS = _single_task_calls()


class TestNonTensorInputs:
    """Lists, Python numbers and NumPy arrays gave AttributeError ("'list' object has no attribute ...")."""

    @pytest.mark.parametrize(("kind", "loss", "logits", "labels", "weights"), CALLS, ids=[c[0] for c in CALLS])
    @pytest.mark.parametrize("slot", ["logits", "labels", "weights"])
    @pytest.mark.parametrize("convert", [lambda t: t.tolist(), lambda t: t.numpy(), lambda t: 1.0])
    @pytest.mark.parametrize("check_inputs", [False, True])
    def test_every_argument_of_every_loss(self, kind, loss, logits, labels, weights, slot, convert, check_inputs):
        loss.check_inputs = check_inputs
        arguments = {"logits": logits, "labels": labels, "weights": weights}
        bad = convert(arguments[slot])
        arguments[slot] = bad
        with pytest.raises(TypeError, match=rf"Expected `{slot}` to be a torch.Tensor, got {type(bad).__name__}\."):
            loss(**arguments)

    @pytest.mark.parametrize("check_inputs", [False, True])
    def test_a_mask_given_as_a_nested_list(self, check_inputs):
        loss = MultiTaskLoss(["a", "b"], check_inputs=check_inputs)
        with pytest.raises(TypeError, match=r"Expected `mask` to be a torch.Tensor, got list\."):
            loss(torch.zeros(2, 2), torch.ones(2, 2), mask=[[True, False], [True, True]])

    def test_numpy_logits_name_the_fix(self):
        with pytest.raises(TypeError, match="`logits` to be a torch.Tensor, got ndarray"):
            BCEWithLogitsLoss()(np.zeros(2, dtype=np.float32), torch.ones(2))


class TestComplexInputs:
    """Complex labels and weights lost their imaginary part with a mere ComplexWarning."""

    @pytest.mark.parametrize(("kind", "loss", "logits", "labels", "weights"), CALLS, ids=[c[0] for c in CALLS])
    @pytest.mark.parametrize("slot", ["logits", "labels", "weights"])
    @pytest.mark.parametrize("check_inputs", [False, True])
    def test_every_argument_of_every_loss(self, kind, loss, logits, labels, weights, slot, check_inputs):
        loss.check_inputs = check_inputs
        arguments = {"logits": logits, "labels": labels, "weights": weights}
        arguments[slot] = arguments[slot].to(torch.complex64)
        with pytest.raises(TypeError, match=rf"Expected `{slot}` to hold real numbers, got dtype torch.complex64\."):
            loss(**arguments)

    def test_the_reported_case(self):
        with pytest.raises(TypeError, match="`labels` to hold real numbers"):
            MultiTaskLoss(["a", "b"])(torch.zeros(1, 2), torch.tensor([[1 + 1j, 0j]]))


class TestLearnableWeightsAreRefused:
    """A weight that requires grad was silently detached into a buffer: it never learned."""

    def test_task_weights_point_to_a_learned_weighting(self):
        with pytest.raises(
            ValueError,
            match=r"`task_weights` not to require grad: it is stored as a buffer and is not learned\. Pass a plain "
            r"tensor \(`task_weights.detach\(\)`\), or learn task weights with .*UncertaintyWeighting",
        ):
            MultiTaskLoss(["a", "b"], task_weights=torch.nn.Parameter(torch.ones(2)))

    def test_pos_weights(self):
        with pytest.raises(ValueError, match=r"`pos_weights` not to require grad"):
            MultiTaskLoss(["a", "b"], pos_weights=torch.ones(2, requires_grad=True))

    def test_a_frozen_parameter_is_a_plain_tensor(self):
        loss = MultiTaskLoss(["a", "b"], task_weights=torch.nn.Parameter(torch.tensor([1.0, 3.0]), requires_grad=False))
        out = loss(torch.zeros(2, 2), torch.ones(2, 2))
        assert out["loss"].item() == pytest.approx(2 * LOG2)


class TestGradientsOfLabelsAndWeights:
    """One rule: single-task losses differentiate labels and weights as their formula does;
    MultiTaskLoss differentiates the logits only, for every kind, and refuses the rest by name."""

    @pytest.mark.parametrize("slot", ["labels", "weights"])
    def test_multi_task_bce(self, slot):
        _, loss, logits, labels, weights = CALLS[2]
        arguments = {"logits": logits, "labels": labels, "weights": weights}
        arguments[slot] = arguments[slot].clone().requires_grad_()
        with pytest.raises(
            ValueError, match=rf"`{slot}` not to require grad: MultiTaskLoss differentiates .*`logits` only"
        ):
            loss(**arguments)

    def test_multi_task_cross_entropy_weights(self):
        # Accepted and differentiated before, while the BCE tasks and the docs said error.
        _, loss, logits, labels, weights = CALLS[3]
        with pytest.raises(ValueError, match=r"`weights` not to require grad: MultiTaskLoss differentiates"):
            loss(logits, labels, weights.clone().requires_grad_())

    def test_single_task_losses_differentiate_their_weights(self):
        logits = torch.randn(4, 3, dtype=torch.float64)
        labels = torch.randint(0, 2, (4, 3)).double()
        weights = torch.rand(4, 3, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(BCEWithLogitsLoss(reduction="sum")(logits, labels, weights), weights)
        torch.testing.assert_close(grad, F.binary_cross_entropy_with_logits(logits, labels, reduction="none"))
        class_labels = torch.tensor([0, 2, 1, 2])
        sample_weights = torch.rand(4, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(
            CrossEntropyLoss(reduction="sum")(logits, class_labels, sample_weights), sample_weights
        )
        torch.testing.assert_close(grad, F.cross_entropy(logits, class_labels, reduction="none"))


class TestCheckInputsLooksAtLabelledEntriesOnly:
    """check_inputs=True raised for NaN logits or weights at masked-out entries, which add nothing."""

    def test_bce_logits_and_weights_at_masked_entries(self):
        loss = MultiTaskLoss(["a", "b"], check_inputs=True)
        mask = torch.tensor([[True, False]])
        for logits, weights in (
            (torch.tensor([[0.0, math.nan]]), None),
            (torch.zeros(1, 2), torch.tensor([[1.0, math.nan]])),
            (torch.tensor([[0.0, math.inf]]), torch.tensor([[1.0, -1.0]])),
        ):
            out = loss(logits, torch.tensor([[1.0, 0.0]]), weights, mask=mask)
            assert out["loss/a"].item() == pytest.approx(LOG2)
            assert out["loss/b"].item() == 0.0
        with pytest.raises(ValueError, match=r"`logits` to be finite, .* index \(0, 1\): nan"):
            loss(torch.tensor([[0.0, math.nan]]), torch.tensor([[1.0, 0.0]]))

    def test_cross_entropy_weights_of_ignored_samples(self):
        loss = CrossEntropyLoss(check_inputs=True)
        out = loss(torch.zeros(2, 3), torch.tensor([0, -100]), torch.tensor([1.0, math.nan]))
        assert out.item() == pytest.approx(math.log(3))
        with pytest.raises(ValueError, match=r"`weights` to be finite in \[0, inf\], .* \(1,\): nan"):
            loss(torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([1.0, math.nan]))


def test_cross_entropy_tasks_take_logits_with_a_strided_class_dimension():
    # Regression of the ignore_index fix: logits [B, C, T].permute(0, 2, 1) failed in a `view`.
    gen = torch.Generator().manual_seed(0)
    stored = torch.randn(5, 4, 2, generator=gen, dtype=torch.float64)
    logits = stored.permute(0, 2, 1)
    labels = torch.randint(0, 4, (5, 2), generator=gen)
    out = MultiTaskLoss(["a", "b"], loss_type="cross_entropy").double()(logits, labels)
    for task, name in enumerate(("a", "b")):
        torch.testing.assert_close(out[f"loss/{name}"], F.cross_entropy(logits[:, task], labels[:, task]))


class TestCompile:
    """check_inputs=True under torch.compile(fullgraph=True) failed with GuardOnDataDependentSymNode."""

    @pytest.fixture(autouse=True)
    def _reset(self):
        yield
        torch._dynamo.reset()

    def test_value_checks_are_skipped_while_compiling(self):
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(8, 3, generator=gen)
        labels = (torch.rand(8, 3, generator=gen) < 0.3).float()
        mask = torch.rand(8, 3, generator=gen) < 0.7
        for loss, args in (
            (MultiTaskLoss(["a", "b", "c"], check_inputs=True), (logits, labels, None, mask)),
            (BCEWithLogitsLoss(check_inputs=True), (logits, labels)),
            (CrossEntropyLoss(check_inputs=True), (logits, torch.tensor([0, 1, 2, -100, 0, 1, 2, 0]))),
        ):
            compiled = torch.compile(loss, fullgraph=True)
            eager = loss(*args)
            torch.testing.assert_close(compiled(*args), eager)
        # Eager calls still check.
        with pytest.raises(ValueError, match="`labels` to be finite in"):
            BCEWithLogitsLoss(check_inputs=True)(logits, labels + 2)


def test_torch_jit_trace_of_a_multi_task_loss_serves_other_batch_sizes():
    # TorchScript's `script` cannot parse the modules (documented); `trace` works, and tracing turns
    # the batch size into a 0-dim tensor that the argument checks must take as one number.
    gen = torch.Generator().manual_seed(0)
    loss = MultiTaskLoss(["a", "b", "c"])
    example = (torch.randn(4, 3, generator=gen), (torch.rand(4, 3, generator=gen) < 0.5).float())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(loss, example, strict=False)
    # What a trace says, and why each is fine: torch deprecates tracing (it still ships it; we
    # test it while it does), and the argument checks compare shapes, which a trace freezes to
    # the example's answer. The math itself branches on no traced number (the row count of the
    # column sums did).
    tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    deprecated = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(tracer) + len(deprecated) == len(caught), [str(w.message) for w in caught]
    assert all("deprecated. Please switch to `torch.compile`" in str(w.message) for w in deprecated)
    assert all("Converting a tensor to a Python boolean" in str(w.message) for w in tracer)
    assert [w.filename for w in tracer if w.filename.endswith("_fused_bce.py")] == []
    logits, labels = torch.randn(6, 3, generator=gen), (torch.rand(6, 3, generator=gen) < 0.5).float()
    torch.testing.assert_close(traced(logits, labels)["loss"], loss(logits, labels)["loss"])


def test_metrics_refuse_complex_losses():
    # GlobalLoss and MultiTaskGlobalLoss recorded 0.5 for 0.5 + 1j.
    with pytest.raises(TypeError, match=r"`loss` to hold real numbers, got dtype torch.complex64"):
        GlobalLoss().update(torch.tensor(0.5 + 1j))
    with pytest.raises(TypeError, match=r"`losses` to hold real numbers, got dtype torch.complex64"):
        MultiTaskGlobalLoss(["a"]).update({"loss/a": torch.tensor(0.5 + 1j), "loss": torch.tensor(0.5)})


class TestOwnPass:
    """Cases found while fixing the above."""

    def test_numpy_scalars_as_options(self):
        # A config read through NumPy gives np.int64 / np.float32, which were a TypeError.
        loss = CrossEntropyLoss(ignore_index=np.int64(-1), label_smoothing=np.float32(0.25))
        assert type(loss.ignore_index) is int
        assert loss.ignore_index == -1
        assert loss.label_smoothing == 0.25
        logits, labels = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, -1, 3])
        torch.testing.assert_close(
            loss.double()(logits, labels), F.cross_entropy(logits, labels, ignore_index=-1, label_smoothing=0.25)
        )

    def test_integer_task_losses(self):
        with pytest.raises(TypeError, match="`task_losses` to be a floating point tensor, got dtype torch.int64"):
            LF.reduce_tasks(torch.tensor([1, 2, 3]), torch.ones(3), "mean")

    @pytest.mark.parametrize("name", ["pos_weight", "task_weight", "scale"])
    def test_per_task_vectors_that_require_grad(self, name):
        # The fused node returns no gradient for them: a silently missing gradient (e.g. through
        # torch.func.functional_call with a learnable replacement for the pos_weight buffer).
        arguments = {"pos_weight": torch.ones(3), "factor": 1.0, name: torch.ones(3, requires_grad=True)}
        with pytest.raises(ValueError, match=rf"`{name}` not to require grad: .*`logits` only"):
            LF.multi_task_bce(torch.zeros(2, 3), torch.ones(2, 3), **arguments)
