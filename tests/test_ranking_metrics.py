"""MultiTaskRankingMetrics on one process: values, window, config, checkpoints, dtype, precision."""

import copy
import math
import pickle
import warnings
from fractions import Fraction

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchmetrics import MetricCollection
from torchmetrics.utilities.exceptions import TorchMetricsUserError

from losses import MultiTaskLoss, MultiTaskRankingMetrics
from losses.ranking_functional import RESULTS
from losses.ranking_metrics import WINDOW_SLOTS
from tests.ranking_reference import reference_metrics

TASKS = ["click", "fav", "reply"]
RATES = [0.5, 0.2, 1.0]


def batches(sizes, seed=0, tasks=3, dtype=torch.float32):
    """Batches of the given sizes: logits, binary labels, [B, T] weights, a mask with NaN labels under it."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for size in sizes:
        mask = torch.rand(size, tasks, generator=gen) < 0.8
        labels = (torch.rand(size, tasks, generator=gen) < 0.3).float()
        out.append(
            {
                "logits": (torch.randn(size, tasks, generator=gen) * 2 - 1).to(dtype),
                "labels": labels.masked_fill(~mask, math.nan),
                "weights": (torch.rand(size, tasks, generator=gen) + 0.5).to(dtype),
                "mask": mask,
            }
        )
    return out


def concatenated(parts):
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def expected(parts, rates=None, prefix=""):
    data = concatenated(parts)
    return reference_metrics(TASKS, data["logits"], data["labels"], data["weights"], data["mask"], rates, prefix)


def floats(results):
    return {key: value.item() for key, value in results.items()}


def assert_close(actual, wanted, rel=1e-6):
    assert set(actual) >= set(wanted)
    for key, value in wanted.items():
        assert actual[key] == pytest.approx(value, rel=rel, abs=rel, nan_ok=True), key


def test_compute_is_the_metrics_of_all_updates_together():
    parts = batches([17, 300, 1, 64])
    metric = MultiTaskRankingMetrics(TASKS, neg_sampling_rates=RATES)
    for part in parts:
        metric.update(**part)
    results = metric.compute()
    assert list(results) == [f"{name}/{task}" for name in RESULTS for task in TASKS]
    assert all(value.dtype == torch.float64 and value.shape == () for value in results.values())
    assert_close(floats(results), expected(parts, RATES))


def test_update_takes_what_multi_task_loss_takes():
    """The same call as MultiTaskLoss: bool labels, [B] weights, a mask; logits that require grad."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 3, generator=gen, requires_grad=True)
    labels = torch.rand(32, 3, generator=gen) < 0.4
    weights = torch.rand(32, generator=gen) + 0.5
    mask = torch.rand(32, 3, generator=gen) < 0.9
    MultiTaskLoss(TASKS)(logits, labels, weights, mask)["loss"].backward()
    metric = MultiTaskRankingMetrics(TASKS)
    metric.update(logits, labels, weights, mask)
    wanted = reference_metrics(TASKS, logits.detach(), labels.float(), weights, mask)
    assert_close(floats(metric.compute()), wanted)
    assert logits.grad is not None  # untouched by the metric


def test_the_metric_reads_no_value_on_the_host_in_update():
    """`.item()`, `bool(t)`, `int(t)` all dispatch to aten._local_scalar_dense: none may run in update."""

    class ScalarReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.reads += 1
            return func(*args, **(kwargs or {}))

    metric = MultiTaskRankingMetrics(TASKS, window=50, neg_sampling_rates=RATES)
    part = batches([20])[0]
    with ScalarReads() as counter:
        for _ in range(5):
            metric.update(**part)
    assert counter.reads == 0
    with ScalarReads() as counter:
        bool(metric.sums.sum() > 0)
        int(metric.sums[0, 0])
    assert counter.reads == 2  # the check sees what it looks for


def test_window_holds_exactly_the_documented_updates():
    """window=100 on one process: slots of at least 10 rows; batches of 5 rows fill a slot in 2 updates."""
    parts = batches([5] * 31, seed=2)
    metric = MultiTaskRankingMetrics(TASKS, window=100)
    for part in parts[:30]:
        metric.update(**part)
    # 30 updates = 15 slots of 2; the ring keeps the last 10 slots: updates 10..29 (100 rows).
    assert_close(floats(metric.compute()), expected(parts[10:30], prefix="window_"))
    assert_close(floats(metric.compute()), expected(parts[:30]))
    # Update 30 starts a new slot, which forgets updates 10 and 11: the window is 12..30 (95 rows).
    metric.update(**parts[30])
    assert_close(floats(metric.compute()), expected(parts[12:31], prefix="window_"))


def test_window_smaller_than_a_batch_holds_the_last_ten_updates():
    parts = batches([30] * 14, seed=3)
    metric = MultiTaskRankingMetrics(TASKS, window=100)
    for part in parts:
        metric.update(**part)
    assert_close(floats(metric.compute()), expected(parts[-WINDOW_SLOTS:], prefix="window_"))


def test_window_with_uneven_batches_counts_rows():
    sizes = [3, 40, 7, 7, 60, 1, 2, 25, 9, 80, 4, 4, 4, 33]
    parts = batches(sizes, seed=4)
    metric = MultiTaskRankingMetrics(TASKS, window=200)  # slots of at least 20 rows
    for part in parts:
        metric.update(**part)
    # Slots: [3,40] [7,7,60] [1,2,25] [9,80] [4,4,4,33]; all five fit in the ring of 10.
    assert_close(floats(metric.compute()), expected(parts, prefix="window_"))
    metric.reset()
    for part in parts + parts[:8]:
        metric.update(**part)
    # 8 more updates: [3,40] [7,7,60] [1,2] (filling); 8 slots in all, still within the ring.
    assert_close(floats(metric.compute()), expected(parts + parts[:8], prefix="window_"))


def test_forward_returns_the_batch_and_accumulates_like_update():
    parts = batches([8] * 25, seed=5)
    by_forward = MultiTaskRankingMetrics(TASKS, window=40, neg_sampling_rates=RATES)
    by_update = MultiTaskRankingMetrics(TASKS, window=40, neg_sampling_rates=RATES)
    for part in parts:
        batch_value = by_forward(**part)
        by_update.update(**part)
    assert_close(floats(batch_value), expected(parts[-1:], RATES))
    assert_close(floats(batch_value), expected(parts[-1:], RATES, prefix="window_"))
    torch.testing.assert_close(by_forward.compute(), by_update.compute(), equal_nan=True)
    assert by_forward._forward_cache is batch_value


def test_reset_clears_sums_and_window():
    parts = batches([30, 30], seed=6)
    metric = MultiTaskRankingMetrics(TASKS, window=20)
    metric.update(**parts[0])
    metric.reset()
    metric.update(**parts[1])
    assert_close(floats(metric.compute()), {**expected(parts[1:]), **expected(parts[1:], prefix="window_")})


def test_state_dict_resume_continues_sums_and_ring_exactly():
    parts = batches([6] * 40, seed=7)
    whole = MultiTaskRankingMetrics(TASKS, window=60)
    first = MultiTaskRankingMetrics(TASKS, window=60)
    for part in parts[:23]:
        whole.update(**part)
        first.update(**part)
    state = pickle.loads(pickle.dumps(first.state_dict()))
    resumed = MultiTaskRankingMetrics(TASKS, window=60)
    resumed.load_state_dict(state)
    for part in parts[23:]:
        whole.update(**part)
        resumed.update(**part)
    torch.testing.assert_close(resumed.compute(), whole.compute(), rtol=1e-12, atol=1e-12)


def test_checkpoint_names_what_is_saved():
    metric = MultiTaskRankingMetrics(TASKS, window=60)
    metric.update(**batches([6])[0])
    state = metric.state_dict()
    assert state["_extra_state"] == {"window_slot": 0, "window_slot_rows": 6}
    assert state["synced_sums"].dtype == torch.float64


def test_states_stay_float64_under_dtype_casts():
    parts = batches([50, 50], seed=8)
    metric = MultiTaskRankingMetrics(TASKS, window=80, neg_sampling_rates=RATES)
    model = torch.nn.Module()
    model.metric = metric
    model.to(torch.bfloat16)
    metric.half()
    metric.update(**parts[0])
    metric.update(
        **{key: value.to(torch.bfloat16) if value.is_floating_point() else value for key, value in parts[1].items()}
    )
    assert metric.sums.dtype == torch.float64
    assert metric.window_sums.dtype == torch.float64
    assert all(value.dtype == torch.float64 for value in metric.compute().values())


def test_copies_and_pickles():
    parts = batches([20, 20], seed=9)
    metric = MultiTaskRankingMetrics(TASKS, window=30, neg_sampling_rates=RATES)
    metric.update(**parts[0])
    for copied in (copy.deepcopy(metric), pickle.loads(pickle.dumps(metric))):
        copied.update(**parts[1])
        assert_close(floats(copied.compute()), expected(parts, RATES))
        assert copied.neg_sampling_rates == tuple(RATES)


def test_in_a_metric_collection():
    parts = batches([20, 40], seed=10)
    collection = MetricCollection({"ranking": MultiTaskRankingMetrics(TASKS)})
    for part in parts:
        collection.update(**part)
    results = floats(collection.compute())
    assert_close({key.removeprefix("ranking_"): value for key, value in results.items()}, expected(parts))


def test_undefined_tasks_warn_once_and_give_nan():
    metric = MultiTaskRankingMetrics(["a", "b"], window=10)
    logits = torch.zeros(4, 2)
    labels = torch.tensor([[1, 0], [0, 0], [1, 0], [0, 0]])
    metric.update(logits, labels, mask=torch.tensor([[True, False]] * 4))
    with pytest.warns(UserWarning, match=r"no labelled weight for \['b'\]") as record:
        results = floats(metric.compute())
    assert len(record) == 1
    assert results["ne/a"] == pytest.approx(1.0)
    assert math.isnan(results["ne/b"])
    assert math.isnan(results["window_ne/b"])
    assert not any(math.isinf(value) for value in results.values())


def test_no_warning_when_all_is_defined():
    metric = MultiTaskRankingMetrics(TASKS, window=100)
    metric.update(**batches([200], seed=11)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metric.compute()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"window": 0}, ValueError, r"`window` to be None or a positive int .* got 0"),
        ({"window": -5}, ValueError, r"`window` .* got -5"),
        ({"window": 2.5}, ValueError, r"`window` .* got 2.5"),
        ({"window": True}, ValueError, r"`window` .* got True"),
        ({"neg_sampling_rates": [0.5, 0.5]}, ValueError, r"one rate per task \(3\), got 2"),
        (
            {"neg_sampling_rates": [0.5, 0.0, 1.0]},
            ValueError,
            r"`neg_sampling_rates` to be in \(0, 1\], got \[0.5, 0.0, 1.0\]",
        ),
        ({"neg_sampling_rates": [0.5, 1.5, 1.0]}, ValueError, r"in \(0, 1\], got \[0.5, 1.5, 1.0\]"),
        ({"neg_sampling_rates": [0.5, -0.1, 1.0]}, ValueError, r"`neg_sampling_rates` to be non-negative and finite"),
        (
            {"neg_sampling_rates": [0.5, math.nan, 1.0]},
            ValueError,
            r"`neg_sampling_rates` to be non-negative and finite",
        ),
        ({"neg_sampling_rates": "0.5"}, TypeError, r"`neg_sampling_rates` to be a tensor"),
    ],
)
def test_config_errors_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        MultiTaskRankingMetrics(TASKS, **kwargs)


def test_tasks_are_validated():
    with pytest.raises(ValueError, match="duplicates"):
        MultiTaskRankingMetrics(["a", "a"])


def test_update_shape_errors_name_the_argument():
    metric = MultiTaskRankingMetrics(TASKS)
    with pytest.raises(ValueError, match=r"`logits` to have 3 tasks in dimension 1"):
        metric.update(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"`weights` of shape \[B, T\]"):
        metric.update(torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(3))
    with pytest.raises(TypeError, match=r"`labels` to be a torch.Tensor"):
        metric.update(torch.zeros(4, 3), [[0, 1, 0]] * 4)


def test_rates_accept_a_tensor_and_follow_the_device_of_the_logits():
    metric = MultiTaskRankingMetrics(TASKS, neg_sampling_rates=torch.tensor(RATES))
    parts = batches([40], seed=12)
    metric.update(**parts[0])
    assert_close(floats(metric.compute()), expected(parts, RATES))


def test_empty_batch_adds_nothing():
    parts = batches([0, 30], seed=13)
    metric = MultiTaskRankingMetrics(TASKS, window=10)
    for part in parts:
        metric.update(**part)
    assert_close(floats(metric.compute()), expected(parts[1:]))


def test_many_updates_lose_no_precision():
    """10,000 real updates of weights that float32 cannot hold exactly, against exact fractions.

    A float32 running sum of the same increments drifts by about 1e-4 here; the float64 states
    match the exact sums to 1e-12.
    """
    weights = torch.tensor([0.1, 0.3, 0.7], dtype=torch.float64)
    logits = torch.zeros(3, 1, dtype=torch.float64)
    labels = torch.tensor([[1.0], [0.0], [0.0]])
    metric = MultiTaskRankingMetrics(["t"])
    float32_total = torch.zeros((), dtype=torch.float32)
    updates = 10_000
    for _ in range(updates):
        metric.update(logits, labels, weights)
        float32_total += weights.float().sum()
    exact_weight = updates * sum(Fraction(w) for w in weights.tolist())
    exact_positive = updates * Fraction(weights[0].item())
    assert metric.sums[0, 0].item() == pytest.approx(float(exact_weight), rel=1e-12)
    assert metric.compute()["ctr/t"].item() == pytest.approx(float(exact_positive / exact_weight), rel=1e-12)
    assert abs(float32_total.item() / float(exact_weight) - 1) > 1e-6  # the failure the states avoid


def test_a_million_updates_worth_of_sums_still_take_small_increments():
    """The state after 1,000,000 updates, then 1,000 more, each a millionth of the total.

    Running a million updates in a test would take minutes (about 100 µs each for tiny batches on
    this CPU), so the first 999,000 arrive as one update whose weights are 999,000 times larger:
    the states then hold what a million updates leave, and each further update adds about one
    millionth of them. float32 states would round each such increment by up to 6%; the float64
    states keep the exact total to 1e-10.
    """
    gen = torch.Generator().manual_seed(14)
    logits = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    labels = (torch.rand(8, 2, generator=gen) < 0.5).double()
    labels[0] = 1.0
    labels[1] = 0.0
    weights = torch.rand(8, generator=gen, dtype=torch.float64) + 0.5
    one = MultiTaskRankingMetrics(["a", "b"])
    one.update(logits, labels, weights)
    per_update = one.sums.clone()
    metric = MultiTaskRankingMetrics(["a", "b"])
    metric.update(logits, labels, weights * 999_000)
    for _ in range(1000):
        metric.update(logits, labels, weights)
    torch.testing.assert_close(metric.sums, per_update * 1_000_000, rtol=1e-10, atol=0)
    torch.testing.assert_close(metric.compute(), one.compute(), rtol=1e-10, atol=1e-10)


def test_forward_while_synced_is_refused():
    metric = MultiTaskRankingMetrics(TASKS)
    metric._is_synced = True  # what sync() leaves on several ranks until unsync()
    with pytest.raises(TorchMetricsUserError, match="not to be synced in forward"):
        metric(**batches([4])[0])


def test_loading_a_checkpoint_of_another_layout_names_the_states():
    with_window = MultiTaskRankingMetrics(TASKS, window=100)
    with_window.update(**batches([4])[0])
    with pytest.raises(ValueError, match=r"the states \{'sums': \(4, 3\)\}"):
        MultiTaskRankingMetrics(TASKS).load_state_dict(with_window.state_dict())


def test_the_metric_is_a_mapping_of_entry_metrics_for_lightning_log_dict():
    metric = MultiTaskRankingMetrics(TASKS, window=100)
    keys = [f"{prefix}{name}/{task}" for prefix in ("", "window_") for name in RESULTS for task in TASKS]
    assert list(metric) == list(metric.keys()) == keys
    assert len(metric) == 30
    assert "window_ne/reply" in metric
    assert "ne/share" not in metric
    assert [key for key, _ in metric.items()] == keys
    assert metric["calibration/fav"].key == "calibration/fav"
    with pytest.raises(KeyError, match="got 'ne/share'"):
        metric["ne/share"]
    assert (
        repr(metric) == "MultiTaskRankingMetrics(tasks=['click', 'fav', 'reply'], window=100, neg_sampling_rates=None)"
    )


def test_entries_share_one_compute_and_give_the_batch_values_on_step():
    parts = batches([40, 30], seed=12)
    metric = MultiTaskRankingMetrics(TASKS, window=100, neg_sampling_rates=RATES)
    metric.update(**parts[0])
    # After update, the entries' step value is the batch's own value (Lightning's on_step).
    batch = expected(parts[:1], RATES)
    assert metric["ne/fav"]._forward_cache.item() == pytest.approx(batch["ne/fav"], rel=1e-6)
    assert metric["window_ctr/reply"]._forward_cache.item() == pytest.approx(batch["ctr/reply"], rel=1e-6)
    metric.update(**parts[1])
    assert metric["ne/fav"]._forward_cache.item() == pytest.approx(expected(parts[1:], RATES)["ne/fav"], rel=1e-6)
    # compute once for every entry.
    calls = []
    inner = metric.compute_values

    def counting():
        calls.append(1)
        return inner()

    metric.compute_values = counting
    values = {key: entry.compute().item() for key, entry in metric.items()}
    assert calls == [1]
    assert_close(values, {**expected(parts, RATES), **expected(parts, RATES, prefix="window_")})
    # forward's batch dict is the step value until the next update.
    out = metric(**parts[0])
    assert metric["rce/click"]._forward_cache is out["rce/click"]
    metric.update(**parts[1])
    assert metric["rce/click"]._forward_cache.item() == pytest.approx(expected(parts[1:], RATES)["rce/click"])
    metric["ne/click"].reset()
    assert metric.sums.abs().sum().item() == 0.0
    assert metric["ne/click"]._forward_cache is None
