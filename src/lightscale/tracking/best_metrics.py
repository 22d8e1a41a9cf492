"""Put the best checkpoint's metrics into the W&B run summary.

W&B's run table shows each metric's *last* value by default; after over-fitting or a late divergence that is not
the model anyone keeps. This callback adds ``best/<metric>`` for every validation metric of the validation that
produced the best checkpoint, plus ``best/step``, ``best/epoch`` and ``best/checkpoint``, so runs can be sorted
and compared by what they deliver.
"""

from __future__ import annotations

import math
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    return float(value) if isinstance(value, (int, float)) else None


class BestMetrics(Callback):
    """Keeps the validation metrics of every validation of the fit (one ``.item()`` per metric per validation,
    never per step) and, when the fit ends, writes those of the best checkpoint to every W&B logger's summary.

    The best validation is the first whose monitored value equals the checkpoint callback's
    ``best_model_score`` (Lightning replaces the best only on strict improvement). A run resumed from a
    checkpoint may not have seen that validation; it then reports just the monitored value.
    """

    def __init__(self, prefixes: tuple[str, ...] = ("val/",)) -> None:
        self.prefixes = prefixes
        self.history: list[dict[str, float]] = []
        self.best: dict[str, Any] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        monitor = getattr(trainer.checkpoint_callback, "monitor", None)
        snapshot: dict[str, float] = {}
        for key, value in trainer.callback_metrics.items():
            if key.startswith(self.prefixes) or key == monitor:
                number = _number(value)
                if number is not None:
                    snapshot[key] = number
        if snapshot:
            snapshot.update({"step": trainer.global_step, "epoch": trainer.current_epoch})
            self.history.append(snapshot)

    def best_metrics(self, trainer: L.Trainer) -> dict[str, Any]:
        """``best/...`` entries for the best checkpoint ({} when no checkpoint tracks a best)."""
        checkpoint = trainer.checkpoint_callback
        if not isinstance(checkpoint, ModelCheckpoint) or not checkpoint.best_model_path or not checkpoint.monitor:
            return {}
        score = _number(checkpoint.best_model_score)
        best: dict[str, Any] = {
            "best/checkpoint": os.path.relpath(checkpoint.best_model_path, trainer.default_root_dir),
        }
        if score is not None:
            best[f"best/{checkpoint.monitor}"] = score
        for snapshot in self.history:
            value = snapshot.get(checkpoint.monitor)
            if score is not None and value is not None and math.isclose(value, score, rel_tol=1e-6, abs_tol=1e-12):
                best.update({f"best/{key}": value for key, value in snapshot.items()})
                break
        return best

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self.best = self.best_metrics(trainer)
        if not self.best:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(self.best)
