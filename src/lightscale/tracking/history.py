"""Keep a run's ``metrics.csv`` whole across restarts: the history a resumed run continues is the one its
checkpoint saw, and the steps after that checkpoint are logged again by the resumed run, once."""

import lightning as L
from lightning.pytorch.callbacks import Callback

from lightscale.tracking.csv import CSVLogger, HistoryWriter


def _writers(trainer: L.Trainer) -> list[HistoryWriter]:
    return [
        logger.experiment
        for logger in trainer.loggers
        if isinstance(logger, CSVLogger) and isinstance(logger.experiment, HistoryWriter)  # rank 0 only
    ]


class History(Callback):
    """Flushes the CSV log whenever a checkpoint is written (so a crash loses no row the checkpoint saw), and when
    the first training batch starts drops the rows of the steps the run will log again: those at or after the
    global step it resumed from (all of them on a fresh start into a directory that held an earlier, unfinished
    attempt). Waiting for the first batch means a resume refused at start changes nothing.

    Lightning and the template's callbacks log a row at the index of the optimizer step it belongs to
    (``trainer.global_step - 1`` once that step is done), so "at or after the resumed step" is exact."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        for writer in _writers(trainer):
            writer.flush()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        vars(self).pop("on_train_batch_start", None)  # armed for this fit's first batch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, idx: int) -> None:
        for writer in _writers(trainer):
            writer.truncate(before_step=trainer.global_step)
        self.on_train_batch_start = None  # type: ignore[assignment]  # Lightning skips a hook that is not callable
