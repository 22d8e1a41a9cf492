"""ModelCheckpoint that tolerates models which do not log the monitored metric."""

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn


class Checkpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with one difference: when the monitored key (``val/loss`` by default)
    is never logged, as with a user's own LightningModule that names its metrics differently, the run keeps
    only ``last.ckpt`` and warns once, instead of crashing after the first validation. The template's
    defaults then work for any ``class_path`` without edits; set ``--checkpoint.monitor`` to track "best".
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._warned_missing_monitor = False

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        if self.monitor is not None and self.save_top_k != 0 and self.monitor not in monitor_candidates:
            if not self._warned_missing_monitor:
                rank_zero_warn(
                    f"checkpoint.monitor={self.monitor!r} is not logged by this model; keeping only last.ckpt. "
                    f"Logged keys: {sorted(monitor_candidates)}"
                )
                self._warned_missing_monitor = True
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)
