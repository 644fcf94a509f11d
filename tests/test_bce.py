import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from losses import BCEWithLogitsLoss

REDUCTIONS = ("mean", "sum", "none")
TOLERANCE = {torch.float64: {"rtol": 1e-12, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-6}}


def _inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, 2, shape, generator=gen).to(dtype)
    weights = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
    pos_weight = (torch.rand(shape[-1:], generator=gen, dtype=torch.float64) * 4).to(dtype)
    return logits, labels, weights, pos_weight


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(7,), (16, 5), (3, 4, 6)])
def test_matches_torch_with_gradients(dtype, reduction, shape):
    logits, labels, weights, pos_weight = _inputs(shape, dtype)
    ours_in = logits.clone().requires_grad_()
    ref_in = logits.clone().requires_grad_()
    loss = BCEWithLogitsLoss(pos_weight=pos_weight, reduction=reduction).to(dtype)
    ours = loss(ours_in, labels, weights)
    ref = F.binary_cross_entropy_with_logits(ref_in, labels, weight=weights, pos_weight=pos_weight, reduction=reduction)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, ref, **TOLERANCE[dtype])
    grad = torch.rand_like(ours)
    ours.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, **TOLERANCE[dtype])


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    reduction=st.sampled_from(REDUCTIONS),
    use_weights=st.booleans(),
    use_pos_weight=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_matches_torch(shape, reduction, use_weights, use_pos_weight, seed):
    logits, labels, weights, pos_weight = _inputs(tuple(shape), torch.float64, seed)
    weights = weights if use_weights else None
    pos_weight = pos_weight if use_pos_weight else None
    ours = BCEWithLogitsLoss(pos_weight=pos_weight, reduction=reduction).double()(logits, labels, weights)
    ref = F.binary_cross_entropy_with_logits(logits, labels, weight=weights, pos_weight=pos_weight, reduction=reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_half_precision_is_computed_in_float32(half, reduction):
    logits, labels, weights, pos_weight = _inputs((32, 4), torch.float32)
    logits_half = logits.to(half).requires_grad_()
    out = BCEWithLogitsLoss(pos_weight=pos_weight, reduction=reduction)(logits_half, labels.to(half), weights.to(half))
    assert out.dtype == torch.float32
    upcast = logits_half.detach().float().requires_grad_()
    ref = F.binary_cross_entropy_with_logits(
        upcast, labels, weight=weights.to(half).float(), pos_weight=pos_weight, reduction=reduction
    )
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    ref.sum().backward()
    assert logits_half.grad.dtype == half
    torch.testing.assert_close(logits_half.grad, upcast.grad.to(half))


@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.bool, torch.float32])
def test_integer_and_bool_labels_behave_like_type_as(label_dtype):
    logits, labels, _, _ = _inputs((10, 3), torch.float32)
    out = BCEWithLogitsLoss()(logits, labels.to(label_dtype))
    torch.testing.assert_close(out, F.binary_cross_entropy_with_logits(logits, labels))


def test_label_smoothing_moves_targets_toward_one_half():
    logits, labels, weights, _ = _inputs((12, 3), torch.float64)
    eps = 0.2
    out = BCEWithLogitsLoss(label_smoothing=eps, reduction="none")(logits, labels, weights)
    smoothed = labels * (1 - eps) + eps / 2
    expected = -weights * (smoothed * F.logsigmoid(logits) + (1 - smoothed) * F.logsigmoid(-logits))
    torch.testing.assert_close(out, expected)
    # eps = 1 makes every target 1/2: the loss no longer depends on the labels.
    full = BCEWithLogitsLoss(label_smoothing=1.0)
    torch.testing.assert_close(full(logits, labels), full(logits, 1 - labels))


def test_gradcheck_float64():
    logits, labels, weights, pos_weight = _inputs((6, 3), torch.float64)
    loss = BCEWithLogitsLoss(pos_weight=pos_weight, label_smoothing=0.1).double()
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: loss(x, labels, weights), (logits,))
    assert torch.autograd.gradgradcheck(lambda x: loss(x, labels, weights), (logits,))


def test_weights_broadcast_over_rows():
    logits, labels, _, _ = _inputs((8, 3), torch.float64)
    row_weights = torch.arange(1.0, 9.0, dtype=torch.float64).unsqueeze(1)
    out = BCEWithLogitsLoss().double()(logits, labels, row_weights)
    ref = F.binary_cross_entropy_with_logits(logits, labels, weight=row_weights.expand(8, 3))
    torch.testing.assert_close(out, ref)


class TestPosWeightBuffer:
    def test_sequence_becomes_a_float_buffer_in_state_dict(self):
        loss = BCEWithLogitsLoss(pos_weight=[1, 2, 3])
        assert loss.pos_weight.dtype == torch.float32
        assert dict(loss.named_buffers()).keys() == {"pos_weight"}
        torch.testing.assert_close(loss.state_dict()["pos_weight"], torch.tensor([1.0, 2.0, 3.0]))

    def test_constructor_copies_the_given_tensor(self):
        given = torch.tensor([1.0, 2.0])
        loss = BCEWithLogitsLoss(pos_weight=given)
        given.fill_(7.0)
        assert loss.pos_weight.tolist() == [1.0, 2.0]

    def test_follows_dtype_conversions(self):
        loss = BCEWithLogitsLoss(pos_weight=[1.0, 2.0])
        assert loss.double().pos_weight.dtype == torch.float64
        assert loss.to(torch.float32).pos_weight.dtype == torch.float32
        assert loss.to("cpu").pos_weight.device.type == "cpu"

    def test_survives_deepcopy_pickle_and_load_state_dict(self):
        loss = BCEWithLogitsLoss(pos_weight=[0.5, 4.0], reduction="sum", label_smoothing=0.1)
        logits, labels, weights, _ = _inputs((5, 2), torch.float32)
        expected = loss(logits, labels, weights)
        buffer = io.BytesIO()
        torch.save(loss.state_dict(), buffer)
        buffer.seek(0)
        restored = BCEWithLogitsLoss(pos_weight=[1.0, 1.0], reduction="sum", label_smoothing=0.1)
        restored.load_state_dict(torch.load(buffer))
        for clone in (copy.deepcopy(loss), pickle.loads(pickle.dumps(loss)), restored):
            torch.testing.assert_close(clone.pos_weight, torch.tensor([0.5, 4.0]))
            torch.testing.assert_close(clone(logits, labels, weights), expected)

    def test_no_pos_weight_means_ones(self):
        logits, labels, _, _ = _inputs((5, 2), torch.float32)
        assert BCEWithLogitsLoss().pos_weight is None
        torch.testing.assert_close(BCEWithLogitsLoss()(logits, labels), BCEWithLogitsLoss([1, 1])(logits, labels))


class TestErrors:
    def test_unknown_reduction_at_construction(self):
        with pytest.raises(ValueError, match=r"`reduction` to be one of \('mean', 'sum', 'none'\), got 'avg'"):
            BCEWithLogitsLoss(reduction="avg")  # type: ignore[arg-type]

    @pytest.mark.parametrize("bad", [[-1.0, 1.0], [float("nan")], [float("inf"), 1.0]])
    def test_negative_or_non_finite_pos_weight(self, bad):
        with pytest.raises(ValueError, match=r"`pos_weight` to be non-negative and finite, got \["):
            BCEWithLogitsLoss(pos_weight=bad)

    def test_pos_weight_of_wrong_type(self):
        with pytest.raises(
            TypeError, match="`pos_weight` to be a tensor, a sequence or an array of numbers, got float"
        ):
            BCEWithLogitsLoss(pos_weight=2.0)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="`pos_weight` to hold real numbers, got dtype torch.bool"):
            BCEWithLogitsLoss(pos_weight=torch.tensor([True]))

    @pytest.mark.parametrize("bad", [-0.1, 1.5])
    def test_label_smoothing_outside_unit_interval(self, bad):
        with pytest.raises(ValueError, match=rf"`label_smoothing` to be in \[0, 1\], got {bad}"):
            BCEWithLogitsLoss(label_smoothing=bad)
        with pytest.raises(TypeError, match="`label_smoothing` to be a float"):
            BCEWithLogitsLoss(label_smoothing="0.1")  # type: ignore[arg-type]

    def test_labels_of_wrong_shape_show_both_shapes(self):
        with pytest.raises(ValueError, match=r"`labels` to have the shape of `logits` \(4, 3\), got \(4,\)"):
            BCEWithLogitsLoss()(torch.zeros(4, 3), torch.zeros(4))

    def test_labels_that_would_broadcast_are_still_rejected(self):
        with pytest.raises(ValueError, match=r"\(4, 1\), got \(4, 3\)"):
            BCEWithLogitsLoss()(torch.zeros(4, 1), torch.zeros(4, 3))

    def test_weights_of_wrong_shape_show_both_shapes(self):
        with pytest.raises(
            ValueError, match=r"`weights` of shape \(3, 4\) to broadcast to the shape of `logits` \(4, 3\)"
        ):
            BCEWithLogitsLoss()(torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(3, 4))

    def test_pos_weight_of_wrong_length_for_the_logits(self):
        with pytest.raises(
            ValueError, match=r"`pos_weight` of shape \(2,\) to broadcast to the shape of `logits` \(4, 3\)"
        ):
            BCEWithLogitsLoss(pos_weight=[1.0, 2.0])(torch.zeros(4, 3), torch.zeros(4, 3))

    def test_integer_logits(self):
        with pytest.raises(TypeError, match="`logits` to be a floating point tensor, got dtype torch.int64"):
            BCEWithLogitsLoss()(torch.zeros(4, dtype=torch.long), torch.zeros(4))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("use_weights", [False, True])
def test_empty_batch_gives_zero_not_nan(reduction, use_weights):
    x = torch.zeros(0, 3, requires_grad=True)
    weights = torch.ones(0, 3) if use_weights else None
    out = BCEWithLogitsLoss(pos_weight=[1.0, 2.0, 3.0], reduction=reduction)(x, torch.zeros(0, 3), weights)
    if reduction == "none":
        assert out.shape == (0, 3)
    else:
        assert out.shape == ()
        assert out.item() == 0.0
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros(0, 3))


class TestArrayLikeWeights:
    def test_numpy_arrays_and_tuples_become_the_same_buffer(self):
        np = pytest.importorskip("numpy")
        for value in (
            np.array([1.0, 2.5]),
            np.array([1, 2.5], dtype=np.float16),
            (1.0, 2.5),
            np.array([2.5, 1.0])[::-1],
        ):
            loss = BCEWithLogitsLoss(pos_weight=value)
            assert loss.pos_weight.dtype == torch.float32
            assert loss.pos_weight.tolist() == [1.0, 2.5]
        assert BCEWithLogitsLoss(pos_weight=np.array([1, 3])).pos_weight.tolist() == [1.0, 3.0]

    def test_an_object_with_array_interface(self):
        np = pytest.importorskip("numpy")

        class Column:
            def __array__(self, dtype=None, copy=None):
                return np.array([2.0, 4.0])

        assert BCEWithLogitsLoss(pos_weight=Column()).pos_weight.tolist() == [2.0, 4.0]

    def test_bad_arrays_get_the_named_errors(self):
        np = pytest.importorskip("numpy")
        with pytest.raises(ValueError, match=r"`pos_weight` to be non-negative and finite, got \[1.0, -1.0\]"):
            BCEWithLogitsLoss(pos_weight=np.array([1.0, -1.0]))
        with pytest.raises(ValueError, match=r"`pos_weight` to have 1 dimension\(s\), got shape \(2, 1\)"):
            BCEWithLogitsLoss(pos_weight=np.ones((2, 1)))
        with pytest.raises(TypeError, match="`pos_weight` to hold real numbers, got dtype torch.bool"):
            BCEWithLogitsLoss(pos_weight=np.array([True, False]))
        with pytest.raises(TypeError, match="`pos_weight` to hold real numbers, got dtype torch.complex128"):
            BCEWithLogitsLoss(pos_weight=np.array([1 + 1j]))
        with pytest.raises(TypeError, match=r"`pos_weight` to be a sequence or an array of numbers, got array\(\['a'"):
            BCEWithLogitsLoss(pos_weight=np.array(["a", "b"]))
        with pytest.raises(
            TypeError, match=r"`pos_weight` to be a sequence or an array of numbers, got \[\[1\], \[2, 3\]\]"
        ):
            BCEWithLogitsLoss(pos_weight=[[1], [2, 3]])
        with pytest.raises(TypeError, match="`pos_weight` to be a tensor, a sequence or an array of numbers, got dict"):
            BCEWithLogitsLoss(pos_weight={"a": 1.0})


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weights_shape", [(6, 4), (6, 1), (4,)])
def test_weights_that_require_grad_get_their_gradient(reduction, weights_shape):
    # torch's BCE refuses to differentiate `weight` ("not differentiable with respect to argument 'weight'").
    logits, labels, _, pos_weight = _inputs((6, 4), torch.float64)
    logits.requires_grad_()
    weights = torch.rand(weights_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    weights.requires_grad_()
    loss = BCEWithLogitsLoss(pos_weight=pos_weight, reduction=reduction).double()
    ours = loss(logits, labels, weights)
    elements = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=pos_weight, reduction="none") * weights
    ref = {"mean": elements.mean(), "sum": elements.sum(), "none": elements}[reduction]
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        ours,
        F.binary_cross_entropy_with_logits(
            logits, labels, weights.detach(), pos_weight=pos_weight, reduction=reduction
        ),
    )
    grad = torch.rand_like(ours)
    ours_grads = torch.autograd.grad(ours, (logits, weights), grad)
    ref_grads = torch.autograd.grad(ref, (logits, weights), grad)
    for got, expected in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_a_learnable_pos_weight_is_refused_at_construction():
    # A buffer never learns: an nn.Parameter was silently detached and kept no gradient.
    with pytest.raises(
        ValueError, match=r"`pos_weight` not to require grad: it is stored as a buffer and is not learned"
    ):
        BCEWithLogitsLoss(pos_weight=torch.nn.Parameter(torch.ones(3)))
    frozen = BCEWithLogitsLoss(pos_weight=torch.nn.Parameter(torch.full((3,), 2.0), requires_grad=False))
    assert not frozen.pos_weight.requires_grad
    assert frozen.pos_weight.tolist() == [2.0, 2.0, 2.0]
