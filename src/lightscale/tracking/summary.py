"""Write ``summary.json``: what a run achieved, in one small file that scripts and people can read."""

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightscale.tracking.batches import batch_size_of


def _plain(value: Any) -> Any:
    """A JSON-friendly scalar (tensors become floats, NaN/inf become strings JSON can hold)."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunSummary(Callback):
    """Final and best metrics, steps, epochs, wall time and training throughput, merged into
    ``<run_dir>/summary.json`` after every fit / validate / test in the run (rank 0 writes).

    Times and sample counts cover the whole run: they are kept in every checkpoint, so a resumed or requeued
    run adds its own to those of the attempts before it (``starts`` counts the attempts). Throughput counts
    samples seen by this rank times the world size, between the first and last training batch of each attempt,
    so start-up and compilation are not averaged in.
    """

    def __init__(self) -> None:
        self.before = {"fit_seconds": 0.0, "train_samples": 0, "train_seconds": 0.0, "starts": 0}
        self.samples = 0
        self.fit_start: float | None = None
        self.first_batch: float | None = None
        self.last_batch: float | None = None
        self._trainer: L.Trainer | None = None

    def totals(self, world_size: int) -> dict[str, float]:
        """This attempt's figures added to those of the attempts before it."""
        now = time.perf_counter()
        train_seconds = 0.0
        if self.first_batch is not None and self.last_batch is not None:
            train_seconds = self.last_batch - self.first_batch
        return {
            "fit_seconds": self.before["fit_seconds"] + (now - self.fit_start if self.fit_start is not None else 0.0),
            "train_samples": self.before["train_samples"] + self.samples * world_size,
            "train_seconds": self.before["train_seconds"] + train_seconds,
            "starts": self.before["starts"] + (1 if self.fit_start is not None else 0),
        }

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        return self.totals(trainer.world_size if trainer is not None else 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = {**self.before, **{k: v for k, v in state_dict.items() if k in self.before}}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_start = time.perf_counter()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.first_batch is None:
            self.first_batch = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.samples += batch_size_of(batch)
        self.last_batch = time.perf_counter()

    def summary(self, trainer: L.Trainer, stage: str) -> dict[str, Any]:
        metrics = {key: _plain(value) for key, value in sorted(trainer.callback_metrics.items())}
        summary: dict[str, Any] = {
            f"{stage}_metrics": metrics,
            "global_step": trainer.global_step,
            "epochs": trainer.current_epoch,
            "world_size": trainer.world_size,
        }
        if stage == "fit":
            totals = self.totals(trainer.world_size)
            summary["fit_seconds"] = round(totals["fit_seconds"], 3)
            summary["starts"] = totals["starts"]
            if totals["train_seconds"] > 0:
                summary["train_samples"] = totals["train_samples"]
                summary["train_samples_per_sec"] = round(totals["train_samples"] / totals["train_seconds"], 2)
            checkpoint = trainer.checkpoint_callback
            if isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_path:
                summary["best"] = {
                    "monitor": checkpoint.monitor,
                    "score": _plain(checkpoint.best_model_score),
                    "checkpoint": os.path.relpath(checkpoint.best_model_path, trainer.default_root_dir),
                }
        return summary

    def _write(self, trainer: L.Trainer, stage: str) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        path = Path(trainer.default_root_dir) / "summary.json"
        existing = json.loads(path.read_text()) if path.exists() else {}
        existing.update(self.summary(trainer, stage))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(existing, indent=2) + "\n")
        tmp.replace(path)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, "fit")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, "test")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer, "validate")
