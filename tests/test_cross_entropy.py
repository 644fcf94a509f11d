import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from losses import CrossEntropyLoss

REDUCTIONS = ("mean", "sum", "none")
TOLERANCE = {torch.float64: {"rtol": 1e-12, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-6}}


def _logits(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 2).to(dtype)


def _class_labels(shape, num_classes, seed=0, ignore_every=0):
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, num_classes, shape, generator=gen)
    if ignore_every:
        labels.view(-1)[::ignore_every] = -100
    return labels


def _probabilities(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed + 2)
    class_dim = 0 if len(shape) == 1 else 1
    return torch.rand(shape, generator=gen, dtype=torch.float64).softmax(class_dim).to(dtype)


def _class_weight(num_classes, dtype):
    return torch.linspace(0.5, 2.0, num_classes, dtype=dtype)


def _check(ours, ref, inputs, dtype):
    torch.testing.assert_close(ours, ref, **TOLERANCE[dtype])
    grad = torch.rand_like(ours)
    (ours_grad,) = torch.autograd.grad(ours, inputs[0], grad)
    (ref_grad,) = torch.autograd.grad(ref, inputs[1], grad)
    torch.testing.assert_close(ours_grad, ref_grad, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(5,), (9, 4), (3, 5, 2, 2)])
@pytest.mark.parametrize("smoothing", [0.0, 0.15])
@pytest.mark.parametrize("weighted", [False, True])
def test_class_indices_match_torch(dtype, reduction, shape, smoothing, weighted):
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    sample_shape = () if len(shape) == 1 else shape[:1] + shape[2:]
    logits = _logits(shape, dtype)
    labels = _class_labels(sample_shape, num_classes, ignore_every=3 if len(shape) > 1 else 0)
    weight = _class_weight(num_classes, dtype) if weighted else None
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = CrossEntropyLoss(weight=weight, reduction=reduction, label_smoothing=smoothing).to(dtype)
    ref = F.cross_entropy(ref_in, labels, weight=weight, reduction=reduction, label_smoothing=smoothing)
    _check(loss(ours_in, labels), ref, (ours_in, ref_in), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(5,), (9, 4), (3, 5, 2, 2)])
@pytest.mark.parametrize("weighted", [False, True])
def test_probability_labels_match_torch(dtype, reduction, shape, weighted):
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    logits, labels = _logits(shape, dtype), _probabilities(shape, dtype)
    weight = _class_weight(num_classes, dtype) if weighted else None
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = CrossEntropyLoss(weight=weight, reduction=reduction, label_smoothing=0.1).to(dtype)
    ref = F.cross_entropy(ref_in, labels, weight=weight, reduction=reduction, label_smoothing=0.1)
    _check(loss(ours_in, labels), ref, (ours_in, ref_in), dtype)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 8),
    num_classes=st.integers(1, 6),
    extra=st.lists(st.integers(1, 3), max_size=2),
    reduction=st.sampled_from(REDUCTIONS),
    weighted=st.booleans(),
    smoothing=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_torch(batch, num_classes, extra, reduction, weighted, smoothing, seed):
    shape = (batch, num_classes, *extra)
    logits = _logits(shape, torch.float64, seed)
    labels = _class_labels((batch, *extra), num_classes, seed)
    weight = _class_weight(num_classes, torch.float64) if weighted else None
    ours = CrossEntropyLoss(weight, reduction=reduction, label_smoothing=smoothing).double()(logits, labels)
    ref = F.cross_entropy(logits, labels, weight=weight, reduction=reduction, label_smoothing=smoothing)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_per_sample_weights_multiply_and_keep_torchs_denominator(weighted):
    logits = _logits((10, 4), torch.float64)
    labels = _class_labels((10,), 4, ignore_every=4)
    weight = _class_weight(4, torch.float64) if weighted else None
    sample_weights = torch.rand(10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    elements = F.cross_entropy(logits, labels, weight=weight, reduction="none")
    valid = labels != -100
    denominator = weight[labels[valid]].sum() if weighted else valid.sum()

    def make(reduction):
        return CrossEntropyLoss(weight, reduction=reduction).double()

    torch.testing.assert_close(make("none")(logits, labels, sample_weights), elements * sample_weights)
    torch.testing.assert_close(make("sum")(logits, labels, sample_weights), (elements * sample_weights).sum())
    torch.testing.assert_close(
        make("mean")(logits, labels, sample_weights), (elements * sample_weights).sum() / denominator
    )


def test_per_sample_weights_with_probability_labels():
    logits, labels = _logits((6, 3), torch.float64), _probabilities((6, 3), torch.float64)
    sample_weights = torch.arange(6, dtype=torch.float64)
    elements = F.cross_entropy(logits, labels, reduction="none")
    out = CrossEntropyLoss().double()(logits, labels, sample_weights)
    torch.testing.assert_close(out, (elements * sample_weights).sum() / 6)


def test_all_labels_ignored_gives_zero_without_nan_gradient():
    logits = _logits((4, 3), torch.float32).requires_grad_()
    labels = torch.full((4,), -100)
    out = CrossEntropyLoss(weight=[1.0, 2.0, 3.0])(logits, labels)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(logits.grad, torch.zeros(4, 3))


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_is_computed_in_float32(half):
    logits = _logits((16, 5), half).requires_grad_()
    labels = _class_labels((16,), 5)
    out = CrossEntropyLoss(weight=_class_weight(5, torch.float32))(logits, labels, torch.ones(16, dtype=half))
    assert out.dtype == torch.float32
    ref = F.cross_entropy(logits.detach().float(), labels, weight=_class_weight(5, torch.float32))
    torch.testing.assert_close(out, ref)
    out.backward()
    assert logits.grad.dtype == half


def test_gradcheck_float64():
    logits = _logits((5, 4), torch.float64).requires_grad_()
    labels = _class_labels((5,), 4, ignore_every=3)
    sample_weights = torch.rand(5, dtype=torch.float64)
    loss = CrossEntropyLoss(weight=_class_weight(4, torch.float64), label_smoothing=0.2).double()
    assert torch.autograd.gradcheck(lambda x: loss(x, labels, sample_weights), (logits,))
    probabilities = _probabilities((5, 4), torch.float64)
    assert torch.autograd.gradcheck(lambda x: loss(x, probabilities), (logits,))


def test_class_weight_buffer_moves_and_survives_copies():
    loss = CrossEntropyLoss(weight=[1, 2, 3], ignore_index=7, reduction="sum")
    assert loss.weight.dtype == torch.float32
    assert "weight" in loss.state_dict()
    assert loss.double().weight.dtype == torch.float64
    logits, labels = _logits((4, 3), torch.float64), torch.tensor([0, 7, 2, 1])
    expected = F.cross_entropy(
        logits, labels, weight=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), ignore_index=7, reduction="sum"
    )
    restored = CrossEntropyLoss(weight=[0, 0, 0], ignore_index=7, reduction="sum").double()
    restored.load_state_dict(loss.state_dict())
    for clone in (loss, copy.deepcopy(loss), pickle.loads(pickle.dumps(loss)), restored):
        torch.testing.assert_close(clone(logits, labels), expected)


class TestErrors:
    def test_unknown_reduction(self):
        with pytest.raises(ValueError, match=r"`reduction` to be one of \('mean', 'sum', 'none'\), got 'batchmean'"):
            CrossEntropyLoss(reduction="batchmean")  # type: ignore[arg-type]

    def test_negative_class_weight(self):
        with pytest.raises(ValueError, match=r"`weight` to be non-negative and finite, got \[1.0, -2.0\]"):
            CrossEntropyLoss(weight=[1.0, -2.0])

    def test_class_weight_of_wrong_dimension(self):
        with pytest.raises(ValueError, match=r"`weight` to have 1 dimension\(s\), got shape \(2, 2\)"):
            CrossEntropyLoss(weight=torch.ones(2, 2))

    def test_label_smoothing(self):
        with pytest.raises(ValueError, match=r"`label_smoothing` to be in \[0, 1\], got 2"):
            CrossEntropyLoss(label_smoothing=2)

    def test_ignore_index_type(self):
        with pytest.raises(TypeError, match="`ignore_index` to be an int, got float"):
            CrossEntropyLoss(ignore_index=-1.0)  # type: ignore[arg-type]

    def test_class_weight_length_is_not_the_class_count(self):
        with pytest.raises(ValueError, match=r"class `weight` of length 4 .*\(8, 4\)\), got shape \(3,\)"):
            CrossEntropyLoss(weight=[1.0, 1.0, 1.0])(torch.zeros(8, 4), torch.zeros(8, dtype=torch.long))

    def test_float_labels_of_wrong_shape(self):
        with pytest.raises(ValueError, match=r"probability `labels` .* shape of `logits` \(8, 4\), got \(8,\)"):
            CrossEntropyLoss()(torch.zeros(8, 4), torch.zeros(8))

    def test_integer_labels_with_logits_of_wrong_rank(self):
        with pytest.raises(
            ValueError, match=r"class-index `labels` \(integer\) of shape \(8,\) .*\(8, 4\).*got \(8, 4\)"
        ):
            CrossEntropyLoss()(torch.zeros(8, 4), torch.zeros(8, 4, dtype=torch.long))
        with pytest.raises(ValueError, match=r"of shape \(2, 5\) for `logits` of shape \(2, 3, 5\).*got \(2, 3\)"):
            CrossEntropyLoss()(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))

    def test_bool_labels(self):
        with pytest.raises(
            TypeError, match="integer class indices or floating point probabilities, got dtype torch.bool"
        ):
            CrossEntropyLoss()(torch.zeros(8, 4), torch.zeros(8, dtype=torch.bool))

    def test_per_sample_weights_of_wrong_shape(self):
        with pytest.raises(
            ValueError,
            match=r"`weights` to have the shape of one loss per sample \(8,\) .*\(8, 4\) without.*got \(8, 4\)",
        ):
            CrossEntropyLoss()(torch.zeros(8, 4), torch.zeros(8, dtype=torch.long), torch.ones(8, 4))

    def test_scalar_logits(self):
        with pytest.raises(ValueError, match="`logits` to have a class dimension"):
            CrossEntropyLoss()(torch.tensor(1.0), torch.tensor(0))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("labels", ["indices", "probabilities"])
@pytest.mark.parametrize("use_weights", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_empty_batch_gives_zero_not_nan(reduction, labels, use_weights, weighted):
    x = torch.zeros(0, 4, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long) if labels == "indices" else torch.zeros(0, 4)
    weights = torch.ones(0) if use_weights else None
    loss = CrossEntropyLoss(weight=[1.0, 2.0, 1.0, 1.0] if weighted else None, reduction=reduction)
    out = loss(x, target, weights)
    if reduction == "none":
        assert out.shape == (0,)
    else:
        assert out.shape == ()
        assert out.item() == 0.0
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros(0, 4))


def test_class_weight_as_a_numpy_array():
    np = pytest.importorskip("numpy")
    loss = CrossEntropyLoss(weight=np.array([1.0, 2.0, 4.0]))
    assert loss.weight.dtype == torch.float32
    logits, labels = _logits((6, 3), torch.float32), _class_labels((6,), 3)
    torch.testing.assert_close(loss(logits, labels), F.cross_entropy(logits, labels, weight=torch.tensor([1.0, 2, 4])))
    with pytest.raises(ValueError, match=r"`weight` to be non-negative and finite, got \[1.0, nan\]"):
        CrossEntropyLoss(weight=np.array([1.0, np.nan]))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_integer_label_dtype(dtype, reduction):
    logits, labels = _logits((9, 4), torch.float64), _class_labels((9,), 4)
    weight = _class_weight(4, torch.float64)
    loss = CrossEntropyLoss(weight, reduction=reduction).double()
    ref = F.cross_entropy(logits, labels, weight=weight, reduction=reduction)
    torch.testing.assert_close(loss(logits, labels.to(dtype)), ref)
    torch.testing.assert_close(loss(logits, labels.to(dtype), torch.ones(9, dtype=torch.float64)), ref)


class TestIgnoredSamples:
    def test_an_ignored_sample_adds_nothing_whatever_its_weight_holds(self):
        # 0 * NaN was NaN: an ignored sample with a NaN weight made the loss NaN.
        logits = torch.zeros(2, 3, requires_grad=True)
        for reduction, expected in (("mean", math.log(3)), ("sum", math.log(3))):
            out = CrossEntropyLoss(reduction=reduction)(logits, torch.tensor([0, -100]), torch.tensor([1.0, math.nan]))
            assert out.item() == pytest.approx(expected, rel=1e-6)
            (grad,) = torch.autograd.grad(out, logits)
            assert grad[1].tolist() == [0.0, 0.0, 0.0]
        out = CrossEntropyLoss(reduction="none")(logits, torch.tensor([0, -100]), torch.tensor([1.0, math.inf]))
        assert out.tolist() == pytest.approx([math.log(3), 0.0])

    def test_weight_gradient_is_zero_at_ignored_samples(self):
        logits = _logits((4, 3), torch.float64)
        labels = torch.tensor([0, -100, 2, 1])
        weights = torch.tensor([1.0, 5.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
        out = CrossEntropyLoss()(logits, labels, weights)
        (grad,) = torch.autograd.grad(out, weights)
        elements = F.cross_entropy(logits, labels, reduction="none")
        torch.testing.assert_close(grad, elements / 3)
        assert grad[1].item() == 0.0

    def test_non_finite_logits_of_an_ignored_sample_give_torchs_nan_gradient(self):
        # Documented: the loss is right, the ignored row's gradient is NaN as in torch (zeroing it
        # would cost a pass over the logits); check_inputs=True names such logits.
        logits = torch.zeros(2, 3)
        logits[1] = math.nan
        ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        labels = torch.tensor([0, -100])
        ours = CrossEntropyLoss()(ours_in, labels)
        ref = F.cross_entropy(ref_in, labels)
        assert ours.item() == pytest.approx(math.log(3))
        ours.backward()
        ref.backward()
        torch.testing.assert_close(ours_in.grad, ref_in.grad, equal_nan=True)
        assert ours_in.grad[1].isnan().all()
        with pytest.raises(ValueError, match=r"`logits` to be finite, got 3 entries .* \(1, 0\): nan"):
            CrossEntropyLoss(check_inputs=True)(logits, labels)


def test_a_learnable_class_weight_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"`weight` not to require grad: it is stored as a buffer"):
        CrossEntropyLoss(weight=torch.nn.Parameter(torch.ones(3)))
