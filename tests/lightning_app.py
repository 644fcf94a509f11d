"""Lightning apps for tests/test_lightning.py, all run in one launch on 2 CPU processes (DDP, gloo).

Usage: python tests/lightning_app.py OUT_DIR. Several fits run one after the other in the same
processes (Lightning reuses the process group):

1. ``logging``: two epochs of every logging pattern docs/logging.rst shows (``Ranker``).
2. ``bf16``: ``precision="bf16-true"`` casts the module to bfloat16; the metric states stay float64.
3. ``save`` and ``resume``: ``trainer.save_checkpoint`` in the middle of the epoch, then
   ``fit(ckpt_path=...)`` on a new trainer, with and without ``SyncMetricsOnCheckpoint``.

Each rank writes ``<fit>_rank<r>.json`` with what it recorded and what its logger received.
"""

import gc
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MetricCollection

from losses import GlobalLoss, MultiTaskGlobalLoss, MultiTaskLoss, MultiTaskRankingMetrics
from losses._metric_sync import SumMetric
from losses.lightning import SyncMetricsOnCheckpoint

TASKS = ["fav", "reply"]


class Ranker(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tower = torch.nn.Linear(4, 2)
        self.loss = MultiTaskLoss(TASKS, pos_weights=[1.0, 2.0])
        self.train_loss = GlobalLoss()
        self.step_loss = GlobalLoss()
        self.per_task = MultiTaskGlobalLoss(TASKS)
        self.totals = MetricCollection({"sum": MultiTaskGlobalLoss(TASKS, reduction="sum")}, prefix="total_")
        self.ranking = MultiTaskRankingMetrics(TASKS, auc_bins=4096)
        self.seen: list[dict[str, Any]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.tower(x)
        out = self.loss(logits, y)
        # One number for the epoch: the metric object itself, computed (and synced) at epoch end.
        self.train_loss.update(out["loss"], weight=x.shape[0])
        self.log("train_loss", self.train_loss, on_step=False, on_epoch=True)
        # A value per step: update() records the batch value, which Lightning logs on_step.
        self.step_loss.update(out["loss"], weight=x.shape[0])
        self.log("step_loss", self.step_loss, on_step=True, on_epoch=False)
        # Every task: log_dict takes the metric, a mapping of one metric per entry.
        self.per_task.update(out, weight=x.shape[0])
        self.log_dict(self.per_task, on_step=True, on_epoch=True)
        # A MetricCollection: updated here, computed and logged at the end of the epoch.
        self.totals.update(out, weight=x.shape[0])
        # Ranking metrics of every task: log_dict takes this metric too, one sync per epoch.
        self.ranking.update(logits, y, groups=torch.arange(x.shape[0]) // 2)  # requests of 2 rows
        self.log_dict(self.ranking, on_step=False, on_epoch=True)
        self.record(batch_idx, out, x.shape[0], logits, y)
        return out["loss"]

    def on_train_epoch_end(self) -> None:
        self.log_dict(self.totals.compute())
        self.totals.reset()

    def record(
        self, batch_idx: int, out: dict[str, torch.Tensor], batch: int, logits: torch.Tensor, labels: torch.Tensor
    ) -> None:
        values = {key: value.item() for key, value in out.items()}
        self.seen.append(
            {
                "epoch": self.current_epoch,
                "batch_idx": batch_idx,
                "weight": batch,
                "values": values,
                "logits": logits.float().tolist(),
                "labels": labels.float().tolist(),
            }
        )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        # Ranks see different batch sizes (5, 5, 5 against 7, 7, 4) but the same number of steps.
        rank = self.global_rank
        rows = 15 + 3 * rank
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(rows, 4, generator=gen)
        y = (torch.rand(rows, 2, generator=gen) < 0.5).float()
        return DataLoader(TensorDataset(x, y), batch_size=5 + 2 * rank)


class Bf16Ranker(Ranker):
    """Trained with precision="bf16-true": Lightning casts the whole module to bfloat16."""

    def on_train_start(self) -> None:
        self.probe = {"tower": str(self.tower.weight.dtype)}
        self.probe["states"] = sorted({str(getattr(self.train_loss, name).dtype) for name in self.train_loss._defaults})
        counter = GlobalLoss().to(self.device)
        self.add_module("counter", counter)
        self.to(torch.bfloat16)  # a module holding the metric, cast again after it was added
        low, high = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
        for step in range(20_000):
            counter.update(low if step % 2 else high, weight=1)
        self.probe["local_total_weight"] = counter.total_weight.item()
        self.probe["mean"] = counter.compute().item()


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call on this rank."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.history.append({"step": step, **{key: float(value) for key, value in metrics.items()}})


class SaveInTheMiddle(L.Callback):
    """``trainer.save_checkpoint`` after the second batch of the first epoch, on every rank."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == 0 and batch_idx == 1:
            trainer.save_checkpoint(self.path)
            pl_module.seen.append({"saved": True})


#: How many times each metric synced, by attribute name (counted by wrapping the base's sync).
SYNCS: Counter = Counter()


def _count_syncs(model: L.LightningModule) -> None:
    names = {id(module): name for name, module in model.named_modules() if isinstance(module, SumMetric)}
    real = SumMetric._sync_dist

    def counting(self, *args, **kwargs):
        SYNCS[names.get(id(self), "?")] += 1
        return real(self, *args, **kwargs)

    SumMetric._sync_dist = counting


def _trainer(callbacks=(), **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=MemoryLogger(),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=list(callbacks),
        **kwargs,
    )


def _write(out_dir: Path, fit: str, trainer: L.Trainer, model: Ranker, **extra: Any) -> None:
    result = {"seen": model.seen, "logged": trainer.logger.history, **extra}
    (out_dir / f"{fit}_rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main(out_dir: Path) -> None:
    model = Ranker()
    _count_syncs(model)
    trainer = _trainer(max_epochs=2)
    trainer.fit(model)
    _write(out_dir, "logging", trainer, model, syncs=dict(SYNCS))

    model = Bf16Ranker()
    trainer = _trainer(max_epochs=1, precision="bf16-true")
    trainer.fit(model)
    _write(out_dir, "bf16", trainer, model, probe=model.probe)

    for variant, callbacks in (("synced", [SyncMetricsOnCheckpoint()]), ("plain", [])):
        path = out_dir / f"{variant}.ckpt"
        model = Ranker()
        trainer = _trainer(callbacks=[SaveInTheMiddle(path), *callbacks], max_epochs=1)
        trainer.fit(model)
        _write(out_dir, f"save_{variant}", trainer, model)
        model = Ranker()
        trainer = _trainer(callbacks=callbacks, max_epochs=1)
        trainer.fit(model, ckpt_path=path)
        _write(out_dir, f"resume_{variant}", trainer, model)

    # Lightning leaves the process group up; a gloo group still alive beside a DDP model at
    # interpreter exit can abort in its destructors, so tear down explicitly and together.
    del trainer, model
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
