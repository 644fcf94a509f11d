"""A LightningModule that logs GlobalLoss with ``self.log``; run by tests/test_lightning.py on 2 CPU processes.

Usage: python tests/lightning_app.py OUT_DIR. Each rank writes the (loss, batch size) pairs it saw;
rank 0 also writes what Lightning logged.
"""

import gc
import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from losses import GlobalLoss, MultiTaskLoss


class Ranker(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tower = torch.nn.Linear(4, 2)
        self.loss = MultiTaskLoss(["fav", "reply"], pos_weights=[1.0, 2.0])
        self.train_loss = GlobalLoss()
        self.seen: list[tuple[float, int]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.loss(self.tower(x), y)
        self.train_loss.update(out["loss"], weight=x.shape[0])
        self.log("train_loss", self.train_loss, on_step=False, on_epoch=True)
        self.seen.append((out["loss"].item(), x.shape[0]))
        return out["loss"]

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


def main(out_dir: Path) -> None:
    model = Ranker()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(model)
    (out_dir / f"seen{trainer.global_rank}.json").write_text(json.dumps(model.seen))
    if trainer.global_rank == 0:
        logged = {name: value.item() for name, value in trainer.callback_metrics.items()}
        (out_dir / "logged.json").write_text(json.dumps(logged))
    # Lightning leaves the process group up; a gloo group still alive beside a DDP model at
    # interpreter exit can abort in its destructors, so tear down explicitly and together.
    del trainer, model
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
