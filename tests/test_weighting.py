"""Task weightings against the papers' formulas, their state, and their agreement across real gloo ranks."""

import copy
import io
import math
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from losses import MultiTaskLoss, distributed
from losses.weighting import (
    DynamicWeightAverage,
    GeometricLossStrategy,
    RandomLossWeighting,
    TaskWeighting,
    UncertaintyWeighting,
)
from tests.conftest import run_on_ranks

TASKS = ("click", "fav", "reply")
METHODS = {
    "uncertainty": lambda: UncertaintyWeighting(TASKS, init=[0.0, 0.5, -0.3], regression=["fav"]),
    "dwa": lambda: DynamicWeightAverage(TASKS, temperature=2.0, window=2),
    "rlw": lambda: RandomLossWeighting(TASKS, seed=7),
    "gls": lambda: GeometricLossStrategy(TASKS),
}


def _losses(values, requires_grad=False):
    tensor = torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)
    out = {f"loss/{task}": value for task, value in zip(TASKS, tensor.unbind(), strict=True)}
    out["loss"] = tensor.mean()
    return tensor, out


def _weights(out):
    return torch.stack([out[f"weight/{task}"] for task in TASKS])


def _loss_sequence(steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(len(TASKS), generator=gen, dtype=torch.float64) + 0.1).tolist() for _ in range(steps)]


# --- uncertainty weighting -------------------------------------------------------------------------


def test_uncertainty_matches_its_formula_and_gradients():
    weighting = UncertaintyWeighting(TASKS, init=[0.0, 0.5, -0.3], regression=["fav"]).double()
    task_losses, losses = _losses([0.7, 0.2, 1.5], requires_grad=True)
    out = weighting(losses)
    s = torch.tensor([0.0, 0.5, -0.3]).double()  # built in the default dtype, then converted
    c = torch.tensor([1.0, 0.5, 1.0], dtype=torch.float64)
    expected = (c * (torch.exp(-s) * task_losses.detach() + s)).sum()
    torch.testing.assert_close(out["loss"], expected, rtol=1e-15, atol=0)
    torch.testing.assert_close(_weights(out), c * torch.exp(-s), rtol=1e-15, atol=0)
    assert not _weights(out).requires_grad
    assert list(out) == [*(f"loss/{t}" for t in TASKS), *(f"weight/{t}" for t in TASKS), "loss"]
    out["loss"].backward()
    # d/ds_t = c_t (1 - e^{-s_t} L_t); d/dL_t = c_t e^{-s_t}.
    torch.testing.assert_close(weighting.log_variance.grad, c * (1 - torch.exp(-s) * task_losses.detach()))
    torch.testing.assert_close(task_losses.grad, c * torch.exp(-s))


@pytest.mark.parametrize("regression", [(), TASKS])
def test_uncertainty_weight_tends_to_form_factor_over_loss(regression):
    # For fixed losses the optimum is s_t = log L_t, so the weight c_t e^{-s_t} tends to c_t / L_t.
    weighting = UncertaintyWeighting(TASKS, regression=regression).double()
    optimizer = torch.optim.SGD(weighting.parameters(), lr=0.5)
    values = [0.5, 2.0, 0.05]
    for _ in range(2000):
        optimizer.zero_grad()
        weighting(_losses(values)[1])["loss"].backward()
        optimizer.step()
    torch.testing.assert_close(weighting.log_variance.detach(), torch.tensor(values, dtype=torch.float64).log())


# --- dynamic weight average ------------------------------------------------------------------------


def _dwa_reference(sequence, window, temperature):
    """The weights of each step from the paper's formula, with windows of steps for epochs."""
    means = [
        [math.fsum(step[t] for step in sequence[k * window : (k + 1) * window]) / window for t in range(len(TASKS))]
        for k in range(len(sequence) // window)
    ]
    weights = []
    for step in range(len(sequence)):
        k = step // window
        if k < 2:
            weights.append([1.0] * len(TASKS))
            continue
        ratios = [means[k - 1][t] / means[k - 2][t] for t in range(len(TASKS))]
        exps = [math.exp(r / temperature) for r in ratios]
        weights.append([len(TASKS) * e / math.fsum(exps) for e in exps])
    return weights


@pytest.mark.parametrize(("window", "temperature"), [(1, 2.0), (3, 2.0), (4, 0.5)])
def test_dwa_matches_the_paper_formula_over_windows(window, temperature):
    sequence = _loss_sequence(5 * window + 2)
    dwa = DynamicWeightAverage(TASKS, temperature=temperature, window=window).double()
    expected = _dwa_reference(sequence, window, temperature)
    for values, weights in zip(sequence, expected, strict=True):
        task_losses, losses = _losses(values)
        out = dwa(losses)
        torch.testing.assert_close(_weights(out), torch.tensor(weights, dtype=torch.float64), rtol=1e-14, atol=0)
        torch.testing.assert_close(out["loss"], (_weights(out) * task_losses).sum(), rtol=1e-15, atol=0)
    assert dwa.steps == len(sequence)
    assert not torch.equal(dwa.weight, torch.ones(len(TASKS), dtype=torch.float64))


def test_dwa_records_nothing_in_eval_mode():
    dwa = DynamicWeightAverage(TASKS, window=1).double()
    for values in _loss_sequence(3):
        dwa(_losses(values)[1])
    before = copy.deepcopy(dwa.state_dict())
    dwa.eval()
    out = dwa(_losses([5.0, 5.0, 5.0])[1])
    torch.testing.assert_close(_weights(out), before["weight"])
    after = dwa.state_dict()
    assert after["_extra_state"]["steps"] == before["_extra_state"]["steps"] == 3
    torch.testing.assert_close(after["window_mean"], before["window_mean"])


def test_dwa_takes_a_window_without_labels_as_no_trend():
    dwa = DynamicWeightAverage(TASKS, window=1).double()
    for values in ([0.5, 0.0, 0.2], [0.5, 0.3, 0.1]):  # fav never labelled in the first window
        dwa(_losses(values)[1])
    weights = _weights(dwa(_losses([0.5, 0.3, 0.1])[1]))
    assert torch.isfinite(weights).all()
    ratios = torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(weights, 3 * torch.softmax(ratios / 2.0, dim=0))


# --- random loss weighting -------------------------------------------------------------------------


def test_rlw_draws_the_softmax_of_a_seeded_standard_normal_every_step():
    rlw = RandomLossWeighting(TASKS, seed=7)
    draws = []
    for step in range(4):
        task_losses, losses = _losses([0.7, 0.2, 1.5])
        out = rlw(losses)
        gen = torch.Generator().manual_seed(7 * 2**32 + step)
        expected = torch.softmax(torch.randn(len(TASKS), generator=gen, dtype=torch.float64), dim=0)
        assert torch.equal(_weights(out), expected)
        torch.testing.assert_close(out["loss"], (expected * task_losses).sum(), rtol=1e-15, atol=0)
        draws.append(expected)
    assert len({tuple(draw.tolist()) for draw in draws}) == 4
    assert all(draw.sum().item() == pytest.approx(1.0, abs=1e-15) for draw in draws)
    rlw.eval()
    assert torch.equal(_weights(rlw(_losses([0.7, 0.2, 1.5])[1])), torch.full((3,), 1 / 3, dtype=torch.float64))
    assert rlw.steps == 4


def test_rlw_weights_average_to_one_over_the_task_count():
    rlw = RandomLossWeighting(TASKS)
    mean = torch.stack([_weights(rlw(_losses([1.0, 1.0, 1.0])[1])) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.01, rtol=0)


# --- geometric loss strategy -----------------------------------------------------------------------


def test_gls_value_and_gradient_are_the_geometric_mean():
    ours_in, ours = _losses([0.7, 0.02, 1.5], requires_grad=True)
    ref_in = ours_in.detach().clone().requires_grad_()
    out = GeometricLossStrategy(TASKS)(ours)
    reference = torch.prod(ref_in) ** (1 / 3)
    torch.testing.assert_close(out["loss"], reference, rtol=1e-15, atol=0)
    out["loss"].backward()
    reference.backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-14, atol=0)
    torch.testing.assert_close(_weights(out), ref_in.grad, rtol=1e-14, atol=0)


def test_gls_leaves_a_task_with_zero_loss_out_of_the_product():
    task_losses, losses = _losses([0.8, 0.0, 0.05], requires_grad=True)
    out = GeometricLossStrategy(TASKS)(losses)
    torch.testing.assert_close(out["loss"], torch.tensor(0.2, dtype=torch.float64), rtol=1e-15, atol=0)
    out["loss"].backward()
    torch.testing.assert_close(task_losses.grad, torch.tensor([0.125, 0.0, 2.0], dtype=torch.float64))


def test_gls_of_many_small_losses_does_not_underflow():
    tasks = [f"t{i}" for i in range(400)]
    losses = {f"loss/{t}": torch.tensor(1e-3) for t in tasks}
    out = GeometricLossStrategy(tasks)(losses)
    torch.testing.assert_close(out["loss"], torch.tensor(1e-3))


# --- shared behaviour ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip_continues_the_same_weights(method):
    sequence = _loss_sequence(11, seed=3)
    original = METHODS[method]().double()
    for values in sequence[:5]:  # DWA stops mid-window, with a partial window sum
        original(_losses(values)[1])
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    resumed = METHODS[method]().double()
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    copies = [resumed, copy.deepcopy(original), pickle.loads(pickle.dumps(original))]
    for values in sequence[5:]:
        expected = original(_losses(values)[1])
        for copied in copies:
            out = copied(_losses(values)[1])
            assert torch.equal(_weights(out), _weights(expected))
            assert torch.equal(out["loss"], expected["loss"])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("method", METHODS)
def test_a_non_finite_task_loss_is_skipped_as_a_zero_loss(method, bad):
    # Every method, against a twin fed 0 where the other gets NaN or inf: same weights, same
    # "loss", same state, a zero gradient for the skipped task, and nothing non-finite kept.
    sequence = _loss_sequence(6, seed=5)
    skipping, twin = METHODS[method]().double(), METHODS[method]().double()
    for step, values in enumerate(sequence):
        poisoned = list(values)
        if step in (1, 2, 4):  # inside DWA's windows and at their ends (window 2)
            poisoned[1], values = bad, [values[0], 0.0, values[2]]
        task_losses, losses = _losses(poisoned, requires_grad=True)
        twin_losses, expected_losses = _losses(values, requires_grad=True)
        out, expected = skipping(losses), twin(expected_losses)
        assert torch.equal(_weights(out), _weights(expected))
        assert torch.equal(out["loss"], expected["loss"])
        assert math.isfinite(out["loss"].item())
        assert out["loss/fav"].item() == poisoned[1] or math.isnan(poisoned[1])  # the entry keeps its value
        out["loss"].backward()
        expected["loss"].backward()
        gradient = twin_losses.grad.clone()
        if step in (1, 2, 4):
            gradient[1] = 0.0
        assert torch.equal(task_losses.grad, gradient)
        for ours, theirs in zip(skipping.parameters(), twin.parameters(), strict=True):
            assert torch.equal(ours.grad, theirs.grad)
            assert ours.grad.isfinite().all()
    state, twin_state = skipping.state_dict(), twin.state_dict()
    for key in state:
        value = state[key]
        if key == "_extra_state":
            assert value.keys() == twin_state[key].keys()
            for name in value:
                assert torch.equal(torch.as_tensor(value[name]), torch.as_tensor(twin_state[key][name]))
        else:
            assert torch.equal(value, twin_state[key])
            assert value.isfinite().all()


@pytest.mark.parametrize("method", METHODS)
def test_to_moves_state_and_keeps_the_loss_dtype(method):
    weighting = METHODS[method]()
    for values in _loss_sequence(5):
        weighting({key: value.float() for key, value in _losses(values)[1].items()})
    weighting = weighting.to(torch.float64)
    tensors = [*weighting.parameters(), *weighting.buffers()]
    if isinstance(weighting, DynamicWeightAverage):
        tensors.append(weighting.get_extra_state()["window_sum"])
    assert all(tensor.dtype == torch.float64 for tensor in tensors)
    for dtype in (torch.float32, torch.float64):
        out = weighting({key: value.to(dtype) for key, value in _losses([0.3, 0.2, 0.1])[1].items()})
        assert out["loss"].dtype == dtype
        assert all(out[f"weight/{t}"].dtype == dtype for t in TASKS)


def test_state_dict_keys():
    assert list(METHODS["uncertainty"]().state_dict()) == ["log_variance", "form_factor"]
    assert list(METHODS["dwa"]().state_dict()) == ["window_mean", "weight", "_extra_state"]
    assert list(METHODS["rlw"]().state_dict()) == ["_extra_state"]
    assert list(METHODS["gls"]().state_dict()) == []


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: UncertaintyWeighting(TASKS, init=[0.0, 1.0]), ValueError, r"`init` to have one value per task \(3\)"),
        (lambda: UncertaintyWeighting(TASKS, init=float("nan")), ValueError, "`init` to be finite"),
        (lambda: UncertaintyWeighting(TASKS, init="0"), TypeError, "`init` to be a float"),
        (lambda: UncertaintyWeighting(TASKS, regression=["dwell"]), ValueError, r"unknown \['dwell'\]"),
        (lambda: UncertaintyWeighting(TASKS, regression="fav"), TypeError, "`regression` to be a sequence"),
        (lambda: DynamicWeightAverage(TASKS, temperature=0.0), ValueError, "`temperature` to be positive"),
        (lambda: DynamicWeightAverage(TASKS, temperature="2"), TypeError, "`temperature` to be a positive float"),
        (lambda: DynamicWeightAverage(TASKS, window=0), ValueError, "`window` to be a positive int, got 0"),
        (lambda: DynamicWeightAverage(TASKS, window=2.5), TypeError, "`window` to be a positive int, got float"),
        (lambda: RandomLossWeighting(TASKS, seed=-1), ValueError, r"`seed` to be an int in \[0, 2\*\*32\), got -1"),
        (lambda: RandomLossWeighting(TASKS, seed=1.0), TypeError, "`seed` to be an int"),
        (lambda: GeometricLossStrategy([]), ValueError, "`tasks` to name at least one task"),
        (lambda: GeometricLossStrategy(["a", "a"]), ValueError, "unique task names"),
    ],
)
def test_bad_configuration_is_rejected_at_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("method", METHODS)
def test_bad_loss_dicts_are_rejected_with_their_keys(method):
    weighting = METHODS[method]()
    _, losses = _losses([0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match=r"missing \['loss/reply'\], extra \['loss/share'\]"):
        weighting({**{k: v for k, v in losses.items() if k != "loss/reply"}, "loss/share": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="every task loss to be a scalar tensor"):
        weighting({**losses, "loss/fav": torch.ones(2)})
    with pytest.raises(TypeError, match="`losses` to be a dict"):
        weighting([0.3, 0.2, 0.1])
    # Without "loss" is fine: it is replaced anyway.
    assert "loss" in weighting({k: v for k, v in losses.items() if k != "loss"})


@pytest.mark.parametrize(
    "method", [DynamicWeightAverage, GeometricLossStrategy, RandomLossWeighting, UncertaintyWeighting]
)
def test_process_group_must_be_a_group(method):
    with pytest.raises(TypeError, match="`process_group` to be None"):
        method(TASKS, process_group="world")


def test_a_new_method_is_one_small_subclass():
    class Inverse(TaskWeighting):
        def weights(self, task_losses):
            return 1 / task_losses

    out = Inverse(TASKS)(_losses([0.5, 0.25, 2.0])[1])
    torch.testing.assert_close(out["loss"], torch.tensor(3.0, dtype=torch.float64))
    torch.testing.assert_close(_weights(out), torch.tensor([2.0, 4.0, 0.5], dtype=torch.float64))


# --- inside MultiTaskLoss --------------------------------------------------------------------------


def _block(seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(16, len(TASKS), generator=gen, dtype=torch.float64)
    labels = (torch.rand(16, len(TASKS), generator=gen) < 0.3).double()
    mask = torch.rand(16, len(TASKS), generator=gen) < 0.8
    return logits, labels, mask


@pytest.mark.parametrize("method", METHODS)
def test_multi_task_loss_applies_its_weighting(method):
    logits, labels, mask = _block()
    weighted = MultiTaskLoss(TASKS, pos_weights=[1.0, 3.0, 0.5], weighting=METHODS[method]()).double()
    separate = METHODS[method]().double()
    expected = separate(MultiTaskLoss(TASKS, pos_weights=[1.0, 3.0, 0.5]).double()(logits, labels, mask=mask))
    out = weighted(logits, labels, mask=mask)
    assert list(out) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(out[key], value, rtol=1e-15, atol=0, msg=key)
    assert isinstance(weighted.weighting, type(separate))
    # A submodule: its parameters and buffers are the loss's, so they follow the model.
    assert [name for name, _ in weighted.named_parameters()] == [
        f"weighting.{n}" for n, _ in separate.named_parameters()
    ]
    assert [k for k in weighted.state_dict() if k.startswith("weighting.")] == [
        f"weighting.{k}" for k in separate.state_dict()
    ]


def test_multi_task_loss_trains_the_uncertainty_parameters():
    logits, labels, mask = _block()
    loss = MultiTaskLoss(TASKS, weighting=UncertaintyWeighting(TASKS)).double()
    loss(logits, labels, mask=mask)["loss"].backward()
    task_losses = MultiTaskLoss(TASKS).double()(logits, labels, mask=mask)
    expected = 1 - torch.stack([task_losses[f"loss/{t}"] for t in TASKS])  # c (1 - e^{-s} L) at s = 0
    torch.testing.assert_close(loss.weighting.log_variance.grad, expected)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"weighting": UncertaintyWeighting(["click", "fav"])}, ValueError, "`weighting` to weigh the tasks"),
        ({"weighting": GeometricLossStrategy(TASKS), "task_weights": [1.0, 2.0, 1.0]}, ValueError, "task_weights"),
        ({"weighting": GeometricLossStrategy(TASKS), "global_reduction": "max"}, ValueError, "global_reduction"),
        ({"weighting": GeometricLossStrategy(TASKS), "task_loss_reduction": "none"}, ValueError, "'none'"),
        ({"weighting": lambda losses: losses}, TypeError, "`weighting` to be a TaskWeighting"),
    ],
)
def test_multi_task_loss_rejects_a_weighting_that_does_not_fit(kwargs, error, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(error, match=match):
            MultiTaskLoss(TASKS, **kwargs)


# --- DDP on real gloo ranks ------------------------------------------------------------------------

STEPS = 7  # with DWA's window of 2, steps 5 to 7 use weights from the loss trend
LEARNING_RATE = 0.1


def _global_batch(step, batch=24, features=6):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(batch, features, generator=gen, dtype=torch.float64)
    labels = (torch.rand(batch, len(TASKS), generator=gen) < 0.4).double()
    weights = torch.rand(batch, len(TASKS), generator=gen, dtype=torch.float64) + 0.5
    # Rank 0's third of the rows is densely labelled, rank 1's rest sparsely: counts differ by rank.
    density = torch.where(torch.arange(batch) < batch // 3, 0.95, 0.4).unsqueeze(1)
    mask = torch.rand(batch, len(TASKS), generator=gen, dtype=torch.float64) < density
    return x, labels, weights, mask


class _WeightedRanker(nn.Module):
    def __init__(self, weighting):
        super().__init__()
        torch.manual_seed(0)
        self.tower = nn.Linear(6, len(TASKS)).double()
        # "global": each rank's task loss is its share of the global batch's, so their average, which
        # DDP's gradient averaging and the weightings' collectives take, is the exact global task loss.
        # The weighting inside the loss, inside the model DDP wraps: as docs/weighting.rst says to.
        self.loss = MultiTaskLoss(TASKS, pos_weights=[1.0, 3.0, 0.5], normalize="global", weighting=weighting)
        self.double()

    def forward(self, x, labels, weights, mask):
        return self.loss(self.tower(x), labels, weights, mask)


def _train(model, rows, gls_by_formula=False):
    """``STEPS`` SGD steps on rows ``rows`` of each step's global batch: weights, losses and gradients per step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    history = []
    for step in range(STEPS):
        x, labels, weights, mask = (tensor[rows] for tensor in _global_batch(step))
        out = model(x, labels, weights, mask)
        loss = out["loss"]
        if gls_by_formula:  # the paper's formula through autograd, with no linearization
            loss = torch.stack([out[f"loss/{t}"] for t in TASKS]).prod() ** (1 / len(TASKS))
        optimizer.zero_grad()
        loss.backward()
        history.append(
            {
                "weights": _weights(out) if f"weight/{TASKS[0]}" in out else None,
                "loss": loss.detach().clone(),
                "grads": [p.grad.clone() for p in model.parameters()],
            }
        )
        optimizer.step()
    return history


def _naive_local_gls_gradient(rows):
    """What GLS of each rank's own task losses would train on: DDP's average of the local gradients."""
    model = _WeightedRanker(None)
    x, labels, weights, mask = (tensor[rows] for tensor in _global_batch(0))
    out = model(x, labels, weights, mask)
    local = torch.stack([out[f"loss/{t}"] for t in TASKS]).prod() ** (1 / len(TASKS))
    grads = torch.autograd.grad(local, list(model.tower.parameters()))
    return [distributed.all_reduce_sum(grad) / distributed.world_size() for grad in grads]


def _weightings_on_ranks(rank, world_size):
    batch = _global_batch(0)[0].shape[0]
    rows = slice(0, batch // 3) if rank == 0 else slice(batch // 3, batch)
    results = {}
    for method, make in METHODS.items():
        history = _train(DistributedDataParallel(_WeightedRanker(make())), rows)
        for entry in history:  # the loss each rank logs: the average of the ranks' values
            entry["loss"] = distributed.all_reduce_sum(entry["loss"]) / world_size
        results[method] = history
    results["naive_gls"] = _naive_local_gls_gradient(rows)
    return results


@pytest.fixture(scope="module")
def on_two_ranks():
    """Every method trained for a few steps on 2 gloo ranks with unequal shards and masks (one spawn)."""
    return run_on_ranks(_weightings_on_ranks, 2, timeout=120)


def _single_process(method):
    model = _WeightedRanker(None if method == "gls_formula" else METHODS[method]())
    return _train(model, slice(None), gls_by_formula=method == "gls_formula")


@pytest.mark.parametrize("method", METHODS)
def test_ddp_ranks_apply_bit_identical_weights(on_two_ranks, method):
    first, second = (result[method] for result in on_two_ranks)
    for step, (a, b) in enumerate(zip(first, second, strict=True)):
        assert torch.equal(a["weights"], b["weights"]), (method, step)


@pytest.mark.parametrize("method", METHODS)
def test_ddp_gradients_equal_single_process_gradients_of_the_same_weighted_loss(on_two_ranks, method):
    reference = _single_process(method)
    for result in on_two_ranks:
        for step, (ours, ref) in enumerate(zip(result[method], reference, strict=True)):
            torch.testing.assert_close(ours["weights"], ref["weights"], rtol=1e-12, atol=0, msg=f"{method} {step}")
            torch.testing.assert_close(ours["loss"], ref["loss"], rtol=1e-12, atol=0, msg=f"{method} {step}")
            for grad, ref_grad in zip(ours["grads"], ref["grads"], strict=True):
                torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12, msg=f"{method} {step}")
    if method == "dwa":  # the trend weights were in use, not only the first windows' ones
        assert not torch.equal(reference[-1]["weights"], torch.ones(len(TASKS), dtype=torch.float64))
    if method == "rlw":  # the draws do not depend on the rank or the world size at all
        assert all(
            torch.equal(o["weights"], r["weights"]) for o, r in zip(on_two_ranks[0][method], reference, strict=True)
        )


def test_ddp_gls_equals_the_paper_formula_on_the_global_batch(on_two_ranks):
    formula = _single_process("gls_formula")
    for result in on_two_ranks:
        for ours, ref in zip(result["gls"], formula, strict=True):
            torch.testing.assert_close(ours["loss"], ref["loss"], rtol=1e-12, atol=0)
            for grad, ref_grad in zip(ours["grads"], ref["grads"], strict=True):
                torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_ddp_gls_of_local_losses_would_be_biased(on_two_ranks):
    exact = _single_process("gls_formula")[0]["grads"]
    naive = on_two_ranks[0]["naive_gls"]
    assert max((ours - ref).abs().max().item() for ours, ref in zip(naive, exact, strict=True)) > 1e-3


def test_uncertainty_parameters_stay_equal_on_every_rank(on_two_ranks):
    first, second = (result["uncertainty"] for result in on_two_ranks)
    # The log-variance gradient is averaged by DDP like any other: the same on both ranks.
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a["grads"][-1], b["grads"][-1])


@pytest.mark.parametrize("make", [lambda tasks: DynamicWeightAverage(tasks, window=2), RandomLossWeighting])
def test_stepping_weightings_compile_without_a_graph_per_step(make: object) -> None:
    # Their step count is host state; traced, it was a constant of the graph: one recompilation per
    # step, then torch.compile's limit (a hard error with fullgraph=True, at step 9).
    import torch._dynamo

    tasks = ["click", "reply", "dwell"]
    eager = MultiTaskLoss(tasks, weighting=make(tasks))  # type: ignore[operator]
    module = MultiTaskLoss(tasks, weighting=make(tasks))  # type: ignore[operator]
    compiled = torch.compile(module, backend="eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    generator = torch.Generator().manual_seed(0)
    labels = (torch.rand(16, 3, generator=generator) > 0.5).float()
    for step in range(12):
        logits = torch.randn(16, 3, generator=generator) * (1 + step)
        expected, got = eager(logits, labels), compiled(logits, labels)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], msg=f"{key} at step {step}")
    assert getattr(module.weighting, "steps", None) == getattr(eager.weighting, "steps", None) == 12
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 4
