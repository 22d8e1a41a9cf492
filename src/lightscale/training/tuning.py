"""Lightning's learning-rate finder and batch-size finder, with their results kept in the run directory.

Both run before training (``on_fit_start``), apply what they found, then training proceeds. Lightning's own
callbacks change the ``lr`` / ``batch_size`` attribute but not the optimizer's LR schedule, which was built from
the old values (a OneCycle or cosine schedule would silently undo the new LR; a new batch size changes the
number of steps the schedule was sized for). These subclasses rebuild the optimizers and schedules after
tuning, and write ``<run_dir>/tuning.json`` (plus ``lr_find.png``, the loss-vs-LR curve with the suggestion).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BatchSizeFinder as _BatchSizeFinder
from lightning.pytorch.callbacks import LearningRateFinder as _LearningRateFinder
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr

TUNING_FILE = "tuning.json"


def record_tuning(trainer: L.Trainer, key: str, result: dict[str, Any]) -> None:
    """Merge ``{key: result}`` into ``<run_dir>/tuning.json`` and log it as ``tuning.<key>`` hyper-parameters."""
    if not trainer.is_global_zero:
        return
    path = Path(trainer.default_root_dir) / TUNING_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = result
    path.write_text(json.dumps(data, indent=2) + "\n")
    short = {k: v for k, v in result.items() if not isinstance(v, list)}
    for logger in trainer.loggers:
        logger.log_hyperparams({"tuning": {key: short}})


def _rebuild_optimizers(trainer: L.Trainer) -> None:
    """Re-run ``configure_optimizers`` so optimizer and LR schedule start from the tuned values."""
    trainer.strategy.setup_optimizers(trainer)


def _lr_attr(pl_module: L.LightningModule, name: str) -> str | None:
    for candidate in [name] if name else ["lr", "learning_rate"]:
        if lightning_hasattr(pl_module, candidate):
            return candidate
    return None


class LRFinder(_LearningRateFinder):
    """Learning-rate range test (Leslie Smith): ``num_training_steps`` steps with the LR growing from
    ``min_lr`` to ``max_lr``; the suggestion (steepest loss descent) becomes the model's ``lr`` for the run.

    ``tuning.json`` gets ``lr_find: {suggested_lr, original_lr, applied, lr: [...], loss: [...]}``.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        attr = _lr_attr(pl_module, self._attr_name)
        original = lightning_getattr(pl_module, attr) if attr else None
        super().on_fit_start(trainer, pl_module)
        finder = self.optimal_lr
        if finder is None or not finder.results:
            return  # skipped (fast_dev_run)
        suggestion = finder.suggestion()
        ran = len(finder.results["lr"])
        if ran < self._num_training_steps:
            rank_zero_warn(
                f"LR finder ran {ran} of {self._num_training_steps} steps: the loss diverged, or max_epochs x "
                "limit_train_batches is shorter than num_training_steps (then the curve stops early)."
            )
        applied = bool(self._update_attr and suggestion is not None)
        if applied:
            _rebuild_optimizers(trainer)
            rank_zero_info(f"LR finder: lr {original} -> {suggestion:.3g} (see tuning.json, lr_find.png)")
        else:
            rank_zero_warn("LR finder found no suggestion (too few steps, or the loss never fell); lr unchanged.")
        result = {
            "suggested_lr": suggestion,
            "original_lr": original,
            "applied": applied,
            "attribute": attr,
            "min_lr": self._min_lr,
            "max_lr": self._max_lr,
            "num_training_steps": self._num_training_steps,
            "lr": [float(x) for x in finder.results["lr"]],
            "loss": [float(x) if math.isfinite(x) else None for x in finder.results["loss"]],
        }
        record_tuning(trainer, "lr_find", result)
        if trainer.is_global_zero:
            self._plot(finder, Path(trainer.default_root_dir) / "lr_find.png")

    @staticmethod
    def _plot(finder: Any, path: Path) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            fig = finder.plot(suggest=True, show=False)
            fig.axes[0].set_title("LR range test: loss vs learning rate (red: suggestion)")
            fig.savefig(path, dpi=110, bbox_inches="tight")
            import matplotlib.pyplot as plt

            plt.close(fig)
        except Exception as error:  # a missing plot must not stop training
            rank_zero_warn(f"LR finder: could not plot {path.name}: {error}")


class BatchSizeFinder(_BatchSizeFinder):
    """Largest batch size that fits (``mode: power`` doubles until out of memory, ``binsearch`` then narrows
    it down), searched on the ``batch_size`` of the model or the DataModule when ``fit`` starts and kept for
    the run (also for its validation and test, which Lightning's callback would search again).

    On a CPU nothing runs out of memory: the search stops at ``max_val`` or at the dataset size, so the result
    only means something on an accelerator. ``tuning.json`` gets ``batch_size_find: {batch_size, original_batch_size}``.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        original = lightning_getattr(pl_module, self._batch_arg_name)
        if trainer.strategy.root_device.type == "cpu":
            rank_zero_warn(
                "Batch-size finder on a CPU: nothing runs out of memory, so the search stops at max_val or at the "
                "dataset size; the result says nothing about a GPU."
            )
        # The trials (steps_per_trial steps at each size) must not advance the run's LR schedule: a schedule with a
        # fixed length (OneCycleLR) would run out on a short run. Lightning restores the weights afterwards.
        schedulers, trainer.strategy.lr_scheduler_configs = trainer.strategy.lr_scheduler_configs, []
        try:
            super().on_fit_start(trainer, pl_module)
        finally:
            trainer.strategy.lr_scheduler_configs = schedulers
        found = self.optimal_batch_size
        if found is not None and found != original:
            _rebuild_optimizers(trainer)  # the schedule's length depends on the number of batches
        record_tuning(
            trainer,
            "batch_size_find",
            {
                "batch_size": found,
                "original_batch_size": original,
                "mode": self._mode,
                "attribute": self._batch_arg_name,
                "accelerator": type(trainer.accelerator).__name__,
            },
        )
        rank_zero_info(f"Batch size finder: {self._batch_arg_name} {original} -> {found} (see tuning.json)")

    # Lightning's callback searches again before validate / test / predict (and after fit's test): here the
    # training batch size found in fit is kept for the whole run instead.
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass
