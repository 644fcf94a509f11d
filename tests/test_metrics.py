import copy
import math
import pickle

import pytest
import torch
from torchmetrics import MetricCollection

from losses import GlobalLoss, MultiTaskGlobalLoss, MultiTaskLoss

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

    @pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")  # torchmetrics' own notice
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

    @pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")  # torchmetrics' own notice
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
