"""Lightning on 2 CPU processes: every logging pattern of docs/logging.rst, bf16-true, and resuming
from a mid-epoch ``trainer.save_checkpoint``. One launch of tests/lightning_app.py runs them all."""

import json
import math
import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MetricCollection

from losses import MultiTaskGlobalLoss, MultiTaskLoss
from tests.conftest import Launch
from tests.ranking_reference import auc_inputs, exact_auc, exact_average_precision, group_metrics, reference_metrics

#: Seconds for the whole launch (six fits); a hung collective fails the test instead of CI.
TIMEOUT = 300
KEYS = ["loss/fav", "loss/reply", "loss"]
TASKS = ["fav", "reply"]
RANKING_KEYS = [f"{name}/{task}" for name in ("ne", "rce", "logloss", "calibration", "ctr") for task in TASKS]


# Started in the background when these tests are collected (see Launch).
APP = Launch(
    [sys.executable, str(Path(__file__).with_name("lightning_app.py")), "{out}"],
    {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()},
    TIMEOUT,
)


@pytest.fixture(scope="module")
def app():
    APP.output()
    out = APP.out_dir

    def result(fit, rank):
        return json.loads((out / f"{fit}_rank{rank}.json").read_text())

    return result


def _entries(seen, epoch=None):
    """The step entries of ``seen``; those before a mid-epoch save if it holds one."""
    entries = []
    for entry in seen:
        if entry.get("saved"):
            break
        if epoch is None or entry["epoch"] == epoch:
            entries.append(entry)
    return entries


def _records(seen, epoch=None):
    """The (values, weight) records of ``seen``; those before a mid-epoch save if it holds one."""
    return [(entry["values"], entry["weight"]) for entry in _entries(seen, epoch)]


def _ranking(entries):
    """The ranking metrics of the steps ``entries`` (of every rank), by the float64 reference."""
    logits = torch.tensor([row for entry in entries for row in entry["logits"]])
    labels = torch.tensor([row for entry in entries for row in entry["labels"]])
    return reference_metrics(TASKS, logits, labels)


def _auc(entries):
    """AUC, PR-AUC (exact, by sorting) and gauc (requests of 2 rows in each step) of the steps ``entries``."""
    logits = torch.tensor([row for entry in entries for row in entry["logits"]], dtype=torch.float64)
    labels = torch.tensor([row for entry in entries for row in entry["labels"]], dtype=torch.float64)
    out = {}
    for t, task in enumerate(TASKS):
        x, positive, mass = auc_inputs(logits, labels, None, None, t)
        out[f"auc/{task}"] = exact_auc(x, positive, mass)
        out[f"pr_auc/{task}"] = exact_average_precision(x, positive, mass)
        total, weight = 0.0, 0.0
        for entry in entries:
            step_logits = torch.tensor(entry["logits"], dtype=torch.float64)
            groups = torch.arange(len(entry["logits"])) // 2
            sums = group_metrics(step_logits, torch.tensor(entry["labels"]), None, None, groups, t)
            total, weight = total + sums["gauc_sum"], weight + sums["gauc_weight"]
        out[f"gauc/{task}"] = total / weight
    return out


def _weighted(records, reduction="mean"):
    total = sum(w for _, w in records)
    sums = {key: math.fsum(values[key] * w for values, w in records) for key in KEYS}
    return sums if reduction == "sum" else {key: value / total for key, value in sums.items()}


def _epoch_logs(logged):
    return [entry for entry in logged if "train_loss" in entry]


def test_metric_object_logs_the_sample_weighted_global_loss_each_epoch(app):
    seen = [app("logging", rank)["seen"] for rank in (0, 1)]
    assert [entry["weight"] for entry in seen[0] if entry["epoch"] == 0] == [5, 5, 5]
    assert [entry["weight"] for entry in seen[1] if entry["epoch"] == 0] == [7, 7, 4]
    for rank in (0, 1):
        epochs = _epoch_logs(app("logging", rank)["logged"])
        assert len(epochs) == 2
        for epoch, logged in enumerate(epochs):
            records = _records(seen[0], epoch) + _records(seen[1], epoch)
            assert logged["train_loss"] == pytest.approx(_weighted(records)["loss"], rel=1e-12)
            unweighted = sum(values["loss"] for values, _ in records) / len(records)
            assert logged["train_loss"] != pytest.approx(unweighted, rel=1e-6)


def test_log_dict_of_the_per_task_metric_logs_every_entry_with_one_sync_per_epoch(app):
    seen = [app("logging", rank)["seen"] for rank in (0, 1)]
    for rank in (0, 1):
        result = app("logging", rank)
        for epoch, logged in enumerate(_epoch_logs(result["logged"])):
            expected = _weighted(_records(seen[0], epoch) + _records(seen[1], epoch))
            assert {key: logged[f"{key}_epoch"] for key in KEYS} == pytest.approx(expected, rel=1e-12)
        # Each step logs this rank's own batch values.
        steps = [entry for entry in result["logged"] if "loss_step" in entry]
        assert [entry["loss/reply_step"] for entry in steps] == pytest.approx(
            [values["loss/reply"] for values, _ in _records(seen[rank])], rel=1e-7
        )
        # Two epochs: one sync each for the three entries of per_task (and the ten of ranking);
        # step_loss never syncs.
        assert result["syncs"] == {"train_loss": 2, "per_task": 2, "totals.sum": 2, "ranking": 2}


def test_log_dict_of_the_ranking_metric_logs_every_entry_of_the_global_batch(app):
    seen = [app("logging", rank)["seen"] for rank in (0, 1)]
    for rank in (0, 1):
        epochs = _epoch_logs(app("logging", rank)["logged"])
        assert len(epochs) == 2
        for epoch, logged in enumerate(epochs):
            expected = _ranking(_entries(seen[0], epoch) + _entries(seen[1], epoch))
            assert {key: logged[key] for key in RANKING_KEYS} == pytest.approx(expected, rel=1e-6)
            # AUC from 4096 bins: a pair of about 300 sharing a bin would move it by 2e-3; gauc is exact.
            auc = _auc(_entries(seen[0], epoch) + _entries(seen[1], epoch))
            for task in TASKS:
                assert logged[f"auc/{task}"] == pytest.approx(auc[f"auc/{task}"], abs=5e-3)
                assert logged[f"pr_auc/{task}"] == pytest.approx(auc[f"pr_auc/{task}"], abs=1e-2)
                assert logged[f"gauc/{task}"] == pytest.approx(auc[f"gauc/{task}"], rel=1e-6)
        # One rank's data alone gives other values: these are the global ones.
        alone = _ranking(_entries(seen[rank], 0))
        assert epochs[0]["ne/fav"] != pytest.approx(alone["ne/fav"], rel=1e-4)


def test_update_then_log_on_step_logs_each_batch_value(app):
    for rank in (0, 1):
        result = app("logging", rank)
        steps = [entry["step_loss"] for entry in result["logged"] if "step_loss" in entry]
        assert steps == pytest.approx([values["loss"] for values, _ in _records(result["seen"])], rel=1e-7)
        assert len(steps) == 6


def test_metric_collection_holding_the_per_task_metric_logs_its_compute(app):
    seen = [app("logging", rank)["seen"] for rank in (0, 1)]
    for epoch, logged in enumerate(_epoch_logs(app("logging", 0)["logged"])):
        expected = _weighted(_records(seen[0], epoch) + _records(seen[1], epoch), reduction="sum")
        assert {key: logged[f"total_{key}"] for key in KEYS} == pytest.approx(expected, rel=1e-12)


def test_bf16_true_keeps_the_states_float64(app):
    seen = [app("bf16", rank)["seen"] for rank in (0, 1)]
    for rank in (0, 1):
        result = app("bf16", rank)
        probe = result["probe"]
        assert probe["tower"] == "torch.bfloat16"
        assert probe["states"] == ["torch.float64"]
        # 20,000 updates of 0.6 and 0.8 per rank, in a module Lightning cast to bfloat16.
        assert probe["local_total_weight"] == 20_000
        assert probe["mean"] == pytest.approx(0.7, rel=1e-14)
        logged = _epoch_logs(result["logged"])[0]
        assert logged["train_loss"] == pytest.approx(
            _weighted(_records(seen[0]) + _records(seen[1]))["loss"], rel=1e-12
        )


def _resumed_epoch(app, variant):
    """What the resumed run logged for the interrupted epoch, and the records before the save."""
    saved = [_records(app(f"save_{variant}", rank)["seen"]) for rank in (0, 1)]
    after = [_records(app(f"resume_{variant}", rank)["seen"]) for rank in (0, 1)]
    logged = [_epoch_logs(app(f"resume_{variant}", rank)["logged"])[0] for rank in (0, 1)]
    return saved, after, logged


def test_fit_from_a_mid_epoch_checkpoint_resumes_exactly_with_the_callback(app):
    saved, after, logged = _resumed_epoch(app, "synced")
    assert [len(records) for records in saved] == [2, 2]  # saved after the second batch
    assert [len(records) for records in after] == [1, 1]  # the resumed run ran the third
    expected = _weighted(saved[0] + saved[1] + after[0] + after[1])
    totals = _weighted(saved[0] + saved[1] + after[0] + after[1], reduction="sum")
    ranking = _ranking(
        [entry for variant in ("save", "resume") for rank in (0, 1) for entry in _resumed_entries(app, variant, rank)]
    )
    for values in logged:
        assert values["train_loss"] == pytest.approx(expected["loss"], rel=1e-12)
        assert {key: values[f"{key}_epoch"] for key in KEYS} == pytest.approx(expected, rel=1e-12)
        assert {key: values[f"total_{key}"] for key in KEYS} == pytest.approx(totals, rel=1e-12)
        assert {key: values[key] for key in RANKING_KEYS} == pytest.approx(ranking, rel=1e-6)


def _resumed_entries(app, phase, rank):
    return _entries(app(f"{phase}_synced", rank)["seen"])


def test_fit_from_a_mid_epoch_checkpoint_without_the_callback_counts_nothing_twice(app):
    # Without a sync before the save, rank 0's file holds rank 0's records only: rank 1's records
    # before the save are lost (as the docs say) and nothing is counted twice.
    saved, after, logged = _resumed_epoch(app, "plain")
    kept = _weighted(saved[0] + after[0] + after[1])
    everything = _weighted(saved[0] + saved[1] + after[0] + after[1])
    for values in logged:
        assert values["train_loss"] == pytest.approx(kept["loss"], rel=1e-12)
        assert values["train_loss"] != pytest.approx(everything["loss"], rel=1e-6)


class _CollectionLoggedWhole(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.tower = torch.nn.Linear(3, 2)
        self.loss = MultiTaskLoss(["fav", "reply"])
        self.totals = MetricCollection({"per_task": MultiTaskGlobalLoss(["fav", "reply"])})

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.loss(self.tower(x), y)
        self.totals.update(out, weight=x.shape[0])
        self.log_dict(self.totals, on_step=False, on_epoch=True)
        return out["loss"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        x = torch.randn(8, 3)
        return DataLoader(TensorDataset(x, (x[:, :2] > 0).float()), batch_size=4)


def test_logging_a_collection_that_holds_the_per_task_metric_whole_says_what_works():
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(TypeError, match=r"logged as 'per_task'.*self\.log_dict\(collection\.compute\(\)\)"):
        trainer.fit(_CollectionLoggedWhole())
