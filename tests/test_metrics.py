import copy
import math
import pickle
from fractions import Fraction

import numpy as np
import pytest
import torch
from torchmetrics import Metric, MetricCollection

from losses import GlobalLoss, MultiTaskGlobalLoss, MultiTaskLoss, MultiTaskRankingMetrics
from losses.weighting import UncertaintyWeighting

TASKS = ["fav", "reply", "click"]


def _losses(values):
    keys = [*(f"loss/{t}" for t in TASKS), "loss"]
    return {key: torch.tensor(value) for key, value in zip(keys, values, strict=True)}


class TestGlobalLoss:
    def test_sample_weighted_mean_and_sum(self):
        updates = [(0.5, 32), (0.25, 8), (1.0, 24)]
        mean, total = GlobalLoss(), GlobalLoss(reduction="sum")
        for loss, weight in updates:
            mean.update(torch.tensor(loss), weight)
            total.update(torch.tensor(loss), torch.tensor(weight))
        expected_sum = sum(loss * weight for loss, weight in updates)
        assert mean.compute().item() == pytest.approx(expected_sum / 64, rel=1e-15)
        assert total.compute().item() == pytest.approx(expected_sum, rel=1e-15)

    def test_class_attributes_for_torchmetrics(self):
        assert GlobalLoss.is_differentiable is False
        assert GlobalLoss.higher_is_better is False
        assert GlobalLoss.full_state_update is False
        assert MultiTaskGlobalLoss.full_state_update is False

    def test_detaches_and_accepts_any_float_dtype(self):
        weight = torch.tensor(2.0, requires_grad=True)
        metric = GlobalLoss()
        metric.update((weight * 3).to(torch.bfloat16), weight=2)
        metric.update(torch.tensor([1.0], dtype=torch.float16), weight=2)
        value = metric.compute()
        assert not value.requires_grad
        assert value.item() == 3.5

    @pytest.mark.filterwarnings(r"ignore:.*compute\(\) runs on a rank with no update")
    def test_no_update_gives_nan_with_a_warning_for_mean_and_zero_for_sum(self):
        with pytest.warns(UserWarning, match=r"GlobalLoss.compute\(\): no loss with a positive weight was recorded"):
            assert math.isnan(GlobalLoss().compute().item())
        assert GlobalLoss(reduction="sum").compute().item() == 0.0

    def test_many_small_updates_lose_no_precision(self):
        value, count = 1e-4 + 3e-12, 100_000
        metric = GlobalLoss(reduction="sum")
        loss = torch.tensor(value, dtype=torch.float64)
        naive32 = torch.zeros((), dtype=torch.float32)
        for _ in range(count):
            metric.update(loss)
            naive32 += loss.float()
        exact = math.fsum([value] * count)
        assert metric.compute().item() == pytest.approx(exact, rel=1e-12)
        # The same loop in a float32 state is off by far more: the float64 state is what saves it.
        assert abs(naive32.item() - exact) / exact > 1e-5

    def test_forward_gives_the_batch_value_and_accumulates(self):
        metric = GlobalLoss()
        assert metric(torch.tensor(2.0), weight=1).item() == 2.0
        assert metric(torch.tensor(4.0), weight=3).item() == 4.0
        assert metric.compute().item() == 3.5

    def test_state_dict_resumes_the_running_numbers(self):
        metric = GlobalLoss()
        metric.update(torch.tensor(1.0), 10)
        state = metric.state_dict()
        assert set(state) == {"synced_sums", "unsynced_sums", "saving_rank", "sum_format"}
        resumed = GlobalLoss()
        resumed.load_state_dict(state)
        resumed.update(torch.tensor(4.0), 5)
        assert resumed.compute().item() == pytest.approx(2.0)

    def test_copies_and_reset(self):
        metric = GlobalLoss()
        metric.update(torch.tensor(3.0), 2)
        for clone in (copy.deepcopy(metric), pickle.loads(pickle.dumps(metric))):
            assert clone.compute().item() == 3.0
        metric.reset()
        metric.update(torch.tensor(1.0))
        assert metric.compute().item() == 1.0

    def test_in_a_metric_collection(self):
        collection = MetricCollection({"train_loss": GlobalLoss(), "train_loss_sum": GlobalLoss(reduction="sum")})
        collection.update(torch.tensor(1.0), weight=3)
        collection.update(torch.tensor(5.0), weight=1)
        values = collection.compute()
        assert values["train_loss"].item() == 2.0
        assert values["train_loss_sum"].item() == 8.0

    def test_update_never_reads_a_value_on_the_host(self, monkeypatch):
        metric = GlobalLoss()
        loss, weight = torch.tensor(0.5), torch.tensor(16.0)

        def forbidden(*args, **kwargs):
            raise AssertionError("update read a tensor value on the host")

        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            monkeypatch.setattr(torch.Tensor, name, forbidden)
        metric.update(loss, weight)
        metric.update(loss, 16)
        monkeypatch.undo()
        assert metric.compute().item() == 0.5

    def test_errors(self):
        with pytest.raises(ValueError, match=r"`reduction` to be one of \('mean', 'sum'\), got 'max'"):
            GlobalLoss(reduction="max")  # type: ignore[arg-type]
        metric = GlobalLoss()
        with pytest.raises(ValueError, match=r"`loss` to be a single value, got shape \(4,\)"):
            metric.update(torch.ones(4))
        with pytest.raises(TypeError, match="`loss` to be a torch.Tensor, got float"):
            metric.update(0.5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="`weight` to be non-negative and finite, got -1"):
            metric.update(torch.tensor(1.0), -1)
        with pytest.raises(ValueError, match=r"`weight` to be a single number, got shape \(2,\)"):
            metric.update(torch.tensor(1.0), torch.ones(2))
        with pytest.raises(TypeError, match="`weight` to be a number or a one-element tensor, got str"):
            metric.update(torch.tensor(1.0), "8")  # type: ignore[arg-type]


class TestMultiTaskGlobalLoss:
    def test_weighted_mean_per_key_in_order(self):
        metric = MultiTaskGlobalLoss(TASKS)
        metric.update(_losses([0.1, 0.2, 0.3, 0.2]), weight=1)
        metric.update(_losses([0.5, 0.6, 0.7, 0.6]), weight=3)
        out = metric.compute()
        assert list(out) == ["loss/fav", "loss/reply", "loss/click", "loss"]
        torch.testing.assert_close(
            torch.stack(list(out.values())), torch.tensor([0.4, 0.5, 0.6, 0.5], dtype=torch.float64)
        )

    def test_takes_what_multi_task_loss_returns(self):
        loss = MultiTaskLoss(TASKS)
        metric = MultiTaskGlobalLoss(TASKS, reduction="sum")
        out = loss(torch.randn(8, 3, requires_grad=True), torch.randint(0, 2, (8, 3)))
        metric.update(out, weight=8)
        for key, value in metric.compute().items():
            assert value.item() == pytest.approx(8 * out[key].item(), rel=1e-6)

    def test_all_tasks_live_in_one_state_tensor(self):
        for num_tasks in (1, 500):
            metric = MultiTaskGlobalLoss([f"t{i}" for i in range(num_tasks)])
            states = {name: tuple(getattr(metric, name).shape) for name in metric._defaults}
            assert states == {"weighted_sums": (num_tasks + 1,), "total_weight": (), "invalid_weights": ()}

    def test_missing_and_extra_keys_are_named(self):
        metric = MultiTaskGlobalLoss(TASKS)
        bad = _losses([0.1, 0.2, 0.3, 0.2])
        del bad["loss/reply"]
        bad["loss/share"] = torch.tensor(0.0)
        with pytest.raises(ValueError, match=r"missing \['loss/reply'\], extra \['loss/share'\]"):
            metric.update(bad)

    def test_entries_must_be_single_values(self):
        metric = MultiTaskGlobalLoss(["fav"])
        with pytest.raises(ValueError, match=r"single-value tensor, got \{'loss/fav': \(2,\), 'loss': \(2,\)\}"):
            metric.update({"loss/fav": torch.ones(2), "loss": torch.ones(2)})
        with pytest.raises(TypeError, match="`losses` to be a dict of loss tensors, got Tensor"):
            metric.update(torch.ones(2))  # type: ignore[arg-type]

    @pytest.mark.filterwarnings(r"ignore:.*compute\(\) runs on a rank with no update")
    def test_state_dict_and_nan_without_updates(self):
        metric = MultiTaskGlobalLoss(TASKS)
        with pytest.warns(UserWarning, match="MultiTaskGlobalLoss.compute"):
            assert all(math.isnan(v.item()) for v in metric.compute().values())
        metric.update(_losses([1.0, 2.0, 3.0, 2.0]), 2)
        resumed = MultiTaskGlobalLoss(TASKS)
        resumed.load_state_dict(metric.state_dict())
        assert resumed.compute()["loss/click"].item() == 3.0

    def test_task_names_are_checked(self):
        with pytest.raises(ValueError, match="duplicates"):
            MultiTaskGlobalLoss(["fav", "fav"])

    def test_one_element_entries_of_any_shape_mix(self):
        metric = MultiTaskGlobalLoss(TASKS)
        mixed = {
            "loss/fav": torch.tensor([0.1]),
            "loss/reply": torch.tensor(0.2),
            "loss/click": torch.tensor([[0.3]], dtype=torch.float64),
            "loss": torch.tensor([0.2], dtype=torch.bfloat16),
        }
        metric.update(mixed, weight=1)
        metric.update(_losses([0.5, 0.6, 0.7, 0.6]), weight=3)
        values = {key: value.item() for key, value in metric.compute().items()}
        bf16 = torch.tensor(0.2, dtype=torch.bfloat16).item()
        assert values == pytest.approx(
            {"loss/fav": 0.4, "loss/reply": 0.5, "loss/click": 0.6, "loss": (bf16 + 1.8) / 4}, rel=1e-7
        )
        with pytest.raises(ValueError, match=r"single-value tensor, got .*'loss/reply': \(2,\).*'loss/click': 'float'"):
            metric.update({**mixed, "loss/reply": torch.ones(2), "loss/click": 0.3})

    def test_the_weight_entries_of_a_task_weighting_are_accepted_and_not_recorded(self):
        loss = MultiTaskLoss(TASKS, weighting=UncertaintyWeighting(TASKS))
        out = loss(torch.randn(8, 3), torch.randint(0, 2, (8, 3)))
        assert [key for key in out if key.startswith("weight/")] == [f"weight/{t}" for t in TASKS]
        with_weights, without = MultiTaskGlobalLoss(TASKS), MultiTaskGlobalLoss(TASKS)
        with_weights.update(out, weight=8)
        without.update({key: value for key, value in out.items() if not key.startswith("weight/")}, weight=8)
        assert list(with_weights.compute()) == ["loss/fav", "loss/reply", "loss/click", "loss"]
        torch.testing.assert_close(with_weights.compute(), without.compute(), rtol=0, atol=0)
        # Only the weights of this metric's tasks: anything else is still named.
        with pytest.raises(ValueError, match=r"missing \[\], extra \['weight/share'\]"):
            with_weights.update({**out, "weight/share": torch.tensor(1.0)})
        partial = {key: value for key, value in out.items() if key != "loss/reply"}
        with pytest.raises(ValueError, match=r"missing \['loss/reply'\], extra \[\]"):
            with_weights.update(partial)


class _Holder(torch.nn.Module):
    """A model that holds its metrics as submodules, as the docs advise."""

    def __init__(self):
        super().__init__()
        self.tower = torch.nn.Linear(2, 2)
        self.train_loss = GlobalLoss()
        self.per_task = MultiTaskGlobalLoss(["fav"])


CASTS = {
    "to(bfloat16)": lambda m: m.to(torch.bfloat16),
    "to(dtype=float16)": lambda m: m.to(dtype=torch.float16),
    "half()": lambda m: m.half(),
    "bfloat16()": lambda m: m.bfloat16(),
    "float()": lambda m: m.float(),
    "double()": lambda m: m.double(),
    "type(float16)": lambda m: m.type(torch.float16),
    "set_dtype(float16)": lambda m: m.train_loss.set_dtype(torch.float16) and m.per_task.set_dtype(torch.float16),
}


class TestFloat64States:
    @pytest.mark.parametrize("cast", list(CASTS))
    def test_states_stay_float64_under_every_cast_of_the_model(self, cast):
        model = _Holder()
        CASTS[cast](model)
        for metric in (model.train_loss, model.per_task):
            for name in metric._defaults:
                assert getattr(metric, name).dtype == torch.float64, (cast, name)
                assert metric._defaults[name].dtype == torch.float64, (cast, name)

    def test_twenty_thousand_updates_in_a_bfloat16_model_are_exact(self):
        model = _Holder().to(torch.bfloat16)
        assert model.tower.weight.dtype == torch.bfloat16  # the model was cast; the metric was not
        low, high = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
        for step in range(20_000):
            model.train_loss.update(low if step % 2 else high, weight=1)
        assert model.train_loss.compute().item() == pytest.approx(0.7, rel=1e-14)
        assert model.train_loss.total_weight.item() == 20_000

    def test_device_moves_still_apply_and_cached_results_keep_their_dtype(self):
        moved = _Holder().to("meta", torch.bfloat16)
        assert moved.train_loss.weighted_sum.device.type == "meta"
        assert moved.train_loss.weighted_sum.dtype == torch.float64
        assert moved.per_task.device.type == "meta"
        model = _Holder()
        model.train_loss.update(torch.tensor(0.3, dtype=torch.float64), 2)
        model.train_loss.compute()
        model.to("cpu", torch.bfloat16)
        cached = model.train_loss.compute()
        assert cached.dtype == torch.float64  # the cached value was not cast with the model
        assert cached.item() == 0.3


class TestWeights:
    """One rule for Python numbers and tensors: a non-negative finite number, not a bool."""

    @pytest.mark.parametrize("bad", [-3.0, math.inf, math.nan])
    def test_a_bad_python_weight_is_refused_at_once(self, bad):
        with pytest.raises(ValueError, match="`weight` to be non-negative and finite"):
            GlobalLoss().update(torch.tensor(0.5), bad)

    @pytest.mark.parametrize("bad", [-3.0, math.inf, math.nan])
    def test_a_bad_tensor_weight_adds_nothing_and_compute_raises(self, bad):
        for metric, loss in ((GlobalLoss(), torch.tensor(0.5)), (MultiTaskGlobalLoss(TASKS), _losses([0.5] * 4))):
            metric.update(loss, torch.tensor(2.0))
            metric.update(loss, torch.tensor(bad))
            assert metric.total_weight.item() == 2.0
            with pytest.raises(ValueError, match=r"`weight` to be non-negative and finite, got 1 tensor weight"):
                metric.compute()
            metric.reset()
            metric.update(loss, torch.tensor(2.0))
            metric.compute()  # fine again after reset

    def test_bools_are_refused_as_numbers_and_as_tensors(self):
        metric = GlobalLoss()
        with pytest.raises(TypeError, match="`weight` to be a number or a one-element tensor, got bool"):
            metric.update(torch.tensor(0.5), True)
        with pytest.raises(TypeError, match=r"one-element tensor of real numbers, got torch.bool"):
            metric.update(torch.tensor(0.5), torch.tensor(True))
        with pytest.raises(TypeError, match=r"got torch.complex64"):
            metric.update(torch.tensor(0.5), torch.tensor(1 + 1j))

    @pytest.mark.parametrize(
        "weight", [np.int64(32), np.int32(32), np.float32(32.0), np.float64(32.0), Fraction(64, 2)]
    )
    def test_numpy_scalars_and_other_real_numbers_are_weights(self, weight):
        metric, per_task = GlobalLoss(reduction="sum"), MultiTaskGlobalLoss(TASKS, reduction="sum")
        metric.update(torch.tensor(0.5), weight=weight)
        per_task.update(_losses([0.5] * 4), weight=weight)
        assert metric.compute().item() == 16.0
        assert per_task.compute()["loss"].item() == 16.0

    def test_numpy_bools_and_bad_numpy_values_are_refused(self):
        metric = GlobalLoss()
        with pytest.raises(TypeError, match="`weight` to be a number or a one-element tensor, got numpy.bool"):
            metric.update(torch.tensor(0.5), np.bool_(True))
        for bad in (np.float64(-2.0), np.float32(np.nan), np.float64(np.inf)):
            with pytest.raises(ValueError, match="`weight` to be non-negative and finite"):
                metric.update(torch.tensor(0.5), bad)
        with pytest.raises(TypeError, match="got numpy.ndarray"):
            metric.update(torch.tensor(0.5), np.array([2.0]))

    def test_integer_tensor_weights_count(self):
        metric = GlobalLoss()
        metric.update(torch.tensor(1.0), torch.tensor(3))
        metric.update(torch.tensor(2.0), torch.tensor([1]))
        assert metric.compute().item() == 1.25

    @pytest.mark.parametrize("weight", [0, 0.0, torch.tensor(0.0), torch.tensor(0)])
    def test_a_zero_weight_adds_nothing_even_to_a_nan_loss(self, weight):
        metric, per_task = GlobalLoss(), MultiTaskGlobalLoss(TASKS)
        metric.update(torch.tensor(0.5), 4)
        per_task.update(_losses([0.5] * 4), 4)
        metric.update(torch.tensor(math.nan), weight)  # the loss of a rank with no labelled sample
        per_task.update(_losses([math.nan, math.inf, 0.5, math.nan]), weight)
        assert metric.compute().item() == 0.5
        assert all(value.item() == 0.5 for value in per_task.compute().values())

    def test_a_tensor_weight_costs_no_host_sync(self, monkeypatch):
        metric = GlobalLoss()

        def forbidden(*args, **kwargs):
            raise AssertionError("update read a tensor value on the host")

        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            monkeypatch.setattr(torch.Tensor, name, forbidden)
        metric.update(torch.tensor(0.5), torch.tensor(-1.0))
        metric.update(torch.tensor(0.5), torch.tensor(0.0))
        monkeypatch.undo()
        assert metric.invalid_weights.item() == 1


class TestStepValue:
    """After update(), the batch value is where Lightning's on_step logging reads it."""

    def test_update_records_the_batch_value(self):
        mean, total = GlobalLoss(), GlobalLoss(reduction="sum")
        for metric in (mean, total):
            metric.update(torch.tensor(0.25), weight=4)
            metric.update(torch.tensor(0.5), weight=torch.tensor(2))
        assert mean._forward_cache.item() == 0.5
        assert total._forward_cache.item() == 1.0
        assert mean.compute().item() == pytest.approx(1 / 3)

    def test_entries_give_the_batch_value_of_update_and_of_forward(self):
        metric = MultiTaskGlobalLoss(TASKS)
        metric.update(_losses([0.1, 0.2, 0.3, 0.2]), weight=2)
        assert metric["loss/reply"]._forward_cache.item() == pytest.approx(0.2)
        out = metric(_losses([0.5, 0.6, 0.7, 0.6]), weight=2)
        assert metric["loss/click"]._forward_cache.item() == pytest.approx(0.7) == out["loss/click"].item()
        assert metric["loss"].compute().item() == pytest.approx(0.4)


class TestEntries:
    """MultiTaskGlobalLoss as a read-only mapping of entry metrics, for Lightning's log_dict."""

    def test_mapping_of_entry_metrics_in_key_order(self):
        metric = MultiTaskGlobalLoss(TASKS)
        assert list(metric) == list(metric.keys()) == [*(f"loss/{t}" for t in TASKS), "loss"]
        assert len(metric) == 4
        assert "loss/fav" in metric
        assert "loss/share" not in metric
        assert [key for key, _ in metric.items()] == list(metric.keys())
        assert all(isinstance(entry, Metric) for entry in metric.values())
        assert dict(metric)["loss/fav"] is metric["loss/fav"]
        with pytest.raises(KeyError, match="got 'loss/share'"):
            metric["loss/share"]

    def test_entries_share_one_compute(self):
        metric = MultiTaskGlobalLoss(TASKS)
        metric.update(_losses([0.1, 0.2, 0.3, 0.2]), weight=1)
        calls = []
        inner = metric.compute

        def counting():
            calls.append(1)
            return inner()

        values = {key: entry.compute().item() for key, entry in metric.items()}
        assert values == pytest.approx({"loss/fav": 0.1, "loss/reply": 0.2, "loss/click": 0.3, "loss": 0.2})
        assert metric._computed is not None  # the parent's cached compute served every entry
        metric.compute = counting
        metric["loss/fav"].compute()
        assert calls == [1]

    def test_entry_reset_resets_the_metric_and_update_points_to_it(self):
        metric = MultiTaskGlobalLoss(TASKS)
        metric.update(_losses([0.1, 0.2, 0.3, 0.2]), weight=1)
        metric["loss"].reset()
        assert metric.total_weight.item() == 0.0
        with pytest.raises(TypeError, match=r"`update` to be called on the MultiTaskGlobalLoss"):
            metric["loss"].update(torch.tensor(1.0))

    def test_entries_are_not_in_the_state_dict_and_survive_copies(self):
        metric = MultiTaskGlobalLoss(TASKS)
        metric.update(_losses([0.1, 0.2, 0.3, 0.2]), weight=1)
        assert set(metric.state_dict()) == {"synced_sums", "unsynced_sums", "saving_rank", "sum_format"}
        for clone in (copy.deepcopy(metric), pickle.loads(pickle.dumps(metric))):
            assert clone["loss/click"].parent is clone
            assert clone["loss/click"].compute().item() == pytest.approx(0.3)
        assert repr(metric) == "MultiTaskGlobalLoss(tasks=['fav', 'reply', 'click'], reduction='mean')"


def _ranking_batch(step):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(6, 2, generator=gen), (torch.rand(6, 2, generator=gen) < 0.5).float()


#: Every metric of the library, with how to feed it the batch of a step.
METRICS = {
    "GlobalLoss": (lambda: GlobalLoss(), lambda step: ((torch.tensor(0.1 * step),), {"weight": step + 1})),
    "MultiTaskGlobalLoss": (
        lambda: MultiTaskGlobalLoss(TASKS),
        lambda step: ((_losses([0.1 * step, 0.2, 0.3 * step, 0.4]),), {"weight": step + 1}),
    ),
    # A window of 6 slots' worth of rows: the ring moves (and zeroes a slot) every update.
    "MultiTaskRankingMetrics": (
        lambda: MultiTaskRankingMetrics(["click", "fav"], window=60),
        lambda step: (_ranking_batch(step), {}),
    ),
}


def _values(result):
    return result if isinstance(result, dict) else {"value": result}


class TestInferenceMode:
    """Lightning's validation loop runs under torch.inference_mode; updates after it still work."""

    def test_forward_under_inference_mode_then_update_outside(self):
        metric = GlobalLoss()
        with torch.inference_mode():
            metric(torch.tensor(0.5))
        metric.update(torch.tensor(1.0))
        assert metric.compute().item() == 0.75

    @pytest.mark.parametrize("name", list(METRICS))
    @pytest.mark.parametrize("inside", ["forward", "update", "reset", "construction", "load"])
    def test_every_metric_keeps_working_after_inference_mode(self, name, inside):
        build, batch = METRICS[name]
        metric, twin = build(), build()  # twin: the same records, never under inference_mode
        first = 0
        if inside == "construction":
            with torch.inference_mode():
                metric = build()
        elif inside == "load":
            twin.update(*batch(0)[0], **batch(0)[1])
            source = build()
            source.update(*batch(0)[0], **batch(0)[1])
            with torch.inference_mode():
                metric.load_state_dict(source.state_dict())
            first = 1
        for step in range(first, 3):
            args, kwargs = batch(step)
            twin.update(*args, **kwargs)
            if inside == "reset" and step == 0:
                with torch.inference_mode():
                    metric.update(*args, **kwargs)
                    metric.reset()
                metric.update(*args, **kwargs)
            elif inside in ("forward", "update"):
                with torch.inference_mode():
                    getattr(metric, inside if inside == "update" else "forward")(*args, **kwargs)
            else:
                metric.update(*args, **kwargs)
        # Outside inference mode again: more updates, written in place into the states.
        for step in range(3, 15):
            args, kwargs = batch(step)
            metric.update(*args, **kwargs)
            twin.update(*args, **kwargs)
        assert all(not getattr(metric, state).is_inference() for state in metric.sum_state_names)
        torch.testing.assert_close(_values(metric.compute()), _values(twin.compute()), rtol=1e-12, atol=1e-12)


class TestMetaDevice:
    @pytest.mark.parametrize("name", list(METRICS))
    def test_a_metric_on_the_meta_device_records_and_computes_meta_tensors(self, name):
        build, batch = METRICS[name]
        metric = build().to("meta")
        for step in range(2):
            args, kwargs = batch(step)
            meta_args = [{k: v.to("meta") for k, v in a.items()} if isinstance(a, dict) else a.to("meta") for a in args]
            metric.update(*meta_args, **kwargs)
            metric.update(*args, **kwargs)  # real values are copied there too
        results = _values(metric.compute())
        assert all(value.is_meta and value.shape == () for value in results.values())
        assert all(value.dtype == torch.float64 for value in results.values())

    def test_a_meta_tensor_into_real_states_is_a_named_error(self):
        meta = torch.empty((), device="meta")
        with pytest.raises(ValueError, match="Expected `loss` to hold values, got a tensor on the meta device"):
            GlobalLoss().update(meta)
        with pytest.raises(ValueError, match="Expected `weight` to hold values"):
            GlobalLoss().update(torch.tensor(0.5), weight=meta)
        with pytest.raises(ValueError, match="Expected `losses` to hold values"):
            MultiTaskGlobalLoss(["fav"]).update({"loss/fav": meta, "loss": meta})
        with pytest.raises(ValueError, match="Expected `logits` to hold values"):
            MultiTaskRankingMetrics(["fav"]).update(torch.empty(4, 1, device="meta"), torch.ones(4, 1, device="meta"))


class TestResults:
    def test_each_compute_returns_fresh_tensors(self):
        for name, (build, batch) in METRICS.items():
            metric = build()
            metric.update(*batch(1)[0], **batch(1)[1])
            first = _values(metric.compute())
            kept = {key: value.clone() for key, value in first.items()}
            metric.update(*batch(2)[0], **batch(2)[1])
            second = _values(metric.compute())
            torch.testing.assert_close(first, kept, rtol=0, atol=0, equal_nan=True, msg=name)
            assert all(a is not b for a, b in zip(first.values(), second.values(), strict=True))
