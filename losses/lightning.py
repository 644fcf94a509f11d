"""Lightning support: a callback that makes checkpoints of the metrics exact on any number of ranks.

Importing this module imports ``lightning``; ``import losses`` never does, so Lightning stays an
optional dependency.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from losses._metric_sync import SumMetric
from losses.metrics import sync_for_checkpoint


class SyncMetricsOnCheckpoint(pl.Callback):
    r"""Sync the metrics of the module whenever Lightning saves a checkpoint, so that it resumes exactly.

    Lightning builds a checkpoint on every rank and writes rank 0's. Rank 0's metric states hold
    the global sums of the last ``compute()`` plus rank 0's own records since then; the other ranks'
    records since that sync are not in them. This callback runs on every rank while the checkpoint
    is built: one ``all_reduce`` for all :class:`~losses.GlobalLoss` and
    :class:`~losses.MultiTaskGlobalLoss` metrics of the module (:func:`~losses.sync_for_checkpoint`),
    then it writes their new entries into ``checkpoint["state_dict"]``, which Lightning dumped just
    before. ``fit(ckpt_path=...)`` on any number of ranks then continues every running number
    exactly, also from a save in the middle of an epoch.

    Lightning calls callbacks only for full checkpoints: with ``save_weights_only=True`` the metrics
    are saved as they are (nothing counted twice; other ranks' records since the last sync lost).

    Example::

        from losses.lightning import SyncMetricsOnCheckpoint

        trainer = L.Trainer(strategy="ddp", callbacks=[SyncMetricsOnCheckpoint()])
    """

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        sync_for_checkpoint(pl_module)
        saved = checkpoint.get("state_dict")
        if not isinstance(saved, dict):
            return
        for name, module in pl_module.named_modules():
            if isinstance(module, SumMetric):
                fresh = module.state_dict(prefix=f"{name}." if name else "")
                # Only the entries Lightning saved: a module may leave some metrics out on purpose.
                saved.update({key: value for key, value in fresh.items() if key in saved})
