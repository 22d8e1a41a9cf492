"""ModelCheckpoint that keeps ``last.ckpt`` current (every validation, and every N steps / M minutes) and
tolerates models which do not log the monitored metric."""

import time
from typing import Any

import lightning as L
import torch
from jsonargparse.typing import PositiveFloat, PositiveInt
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from lightscale.resilience.async_save import BackgroundCheckpointIO


class Checkpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (best-k by ``monitor``, ``last.ckpt``) with three differences:

    - When the monitored key (``val/loss`` by default) is never logged, as with a user's own LightningModule
      that names its metrics differently, the run keeps only ``last.ckpt`` and warns once, instead of crashing
      after the first validation. The template's defaults then work for any ``class_path``.
    - ``last.ckpt`` is rewritten at every validation (or epoch end), whether or not the monitored metric
      improved. Lightning 2.6 writes it only together with a new top-k checkpoint, so after a crash "last"
      could be many epochs old.
    - ``last_every_n_steps`` / ``last_every_minutes`` also refresh ``last.ckpt`` in the middle of an epoch,
      so a crash costs at most that much work; the best-k checkpoints stay tied to validation. (Lightning's
      ``every_n_train_steps`` / ``train_time_interval`` are mutually exclusive and move the best-k selection to
      training steps, where ``val/loss`` is stale.) The saved checkpoint holds the loops' progress and the
      ``StatefulDataLoader`` position, so a resume continues with the next batch of the epoch.

    Args:
        async_save: write single-file checkpoints on a background thread
            (:class:`~lightscale.resilience.async_save.BackgroundCheckpointIO`): the step pays for a copy into host
            memory instead of the whole write; sharded checkpoints too, under
            :class:`lightscale.training.ModelParallelStrategy`.
        last_every_n_steps: refresh ``last.ckpt`` every this many optimizer steps (``None``: off).
        last_every_minutes: refresh ``last.ckpt`` when this much training time has passed since the last
            refresh (``None``: off). Under DDP, rank 0's clock decides, checked at the logging cadence.
        **kwargs: ``ModelCheckpoint`` arguments.
    """

    def __init__(
        self,
        *args: Any,
        async_save: bool = False,
        last_every_n_steps: PositiveInt | None = None,
        last_every_minutes: PositiveFloat | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.async_save = async_save
        self.last_every_n_steps = last_every_n_steps
        self.last_every_minutes = last_every_minutes
        self._warned_missing_monitor = False
        self._validated = False  # a validation ran in this fit (before that, no monitored value can exist)
        self._last_saves = 0  # number of writes of last.ckpt, to tell whether Lightning wrote it in a hook
        self._refreshed_step = -1
        self._refresh_time: float | None = None
        self._prev_batch_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not self.async_save or stage != "fit":
            return
        strategy = trainer.strategy
        save_in_background = getattr(strategy, "save_in_background", None)  # lightscale's ModelParallelStrategy
        if save_in_background is not None:
            save_in_background()
        elif isinstance(strategy, ModelParallelStrategy):
            rank_zero_warn(
                "checkpoint.async_save: Lightning's ModelParallelStrategy writes sharded checkpoints in the "
                "foreground; name lightscale.training.ModelParallelStrategy (as configs/trainer/fsdp.yaml does)"
            )
        if not isinstance(strategy.checkpoint_io, BackgroundCheckpointIO):  # full checkpoints (rank 0's file)
            strategy.checkpoint_io = BackgroundCheckpointIO(strategy.checkpoint_io)

    # ------------------------------------------------------------------ monitor tolerance
    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        if self.monitor is not None and self.save_top_k != 0 and self.monitor not in monitor_candidates:
            if self._validated and not self._warned_missing_monitor:
                rank_zero_warn(
                    f"checkpoint.monitor={self.monitor!r} is not logged by this model; keeping only last.ckpt. "
                    f"Logged keys: {sorted(monitor_candidates)}"
                )
                self._warned_missing_monitor = True
            return
        current = monitor_candidates.get(self.monitor) if self.monitor is not None else None
        if current is not None and not bool(torch.isfinite(torch.as_tensor(current)).all()):
            rank_zero_warn(
                f"checkpoint.monitor={self.monitor} is {float(current)} at step {trainer.global_step}: not a "
                "candidate for the best checkpoint"
            )
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    # ------------------------------------------------------------------ last.ckpt after every validation
    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._note_last_written(trainer)

    def _note_last_written(self, trainer: L.Trainer) -> None:
        self._last_saves += 1
        self._refreshed_step = trainer.global_step
        self._refresh_time = time.monotonic()

    def _can_save(self, trainer: L.Trainer) -> bool:
        return bool(
            self.save_last
            and not trainer.fast_dev_run
            and trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
        )

    def _ensure_last(self, trainer: L.Trainer, saves_before: int) -> None:
        """Write last.ckpt if the hook that just ran did not (Lightning skips it when top-k did not change)."""
        if self._last_saves == saves_before and self._can_save(trainer) and trainer.global_step > 0:
            self._write_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validated = self._validated or not trainer.sanity_checking
        saves = self._last_saves
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._ensure_last(trainer, saves)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        saves = self._last_saves
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._ensure_last(trainer, saves)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:
            return  # Lightning's on_train_end writes last.ckpt even in fast_dev_run, which promises no checkpoints
        if self.save_last and self._refreshed_step == trainer.global_step:
            return  # last.ckpt already holds this step (Lightning would write it again when no top-k was saved)
        super().on_train_end(trainer, pl_module)

    # ------------------------------------------------------------------ mid-epoch refresh of last.ckpt
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._refresh_time = time.monotonic()
        self._prev_batch_step = trainer.global_step

    def _refresh_due(self, trainer: L.Trainer) -> bool:
        step = trainer.global_step
        stepped, self._prev_batch_step = step != self._prev_batch_step, step
        if not stepped or step == self._refreshed_step:  # accumulating gradients, or already saved
            return False
        if self.last_every_n_steps and step % self.last_every_n_steps == 0:
            return True
        if self.last_every_minutes is None or self._refresh_time is None:
            return False
        if trainer.world_size > 1:
            # ranks' clocks differ: rank 0 decides, at the logging cadence (a broadcast is a collective)
            if step % max(1, trainer.log_every_n_steps) != 0:
                return False
            late = time.monotonic() - self._refresh_time >= 60 * self.last_every_minutes
            return bool(trainer.strategy.broadcast(late))
        return time.monotonic() - self._refresh_time >= 60 * self.last_every_minutes

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # ModelCheckpoint's own per-step cadences; with neither set its hook only returns (~20 us per step)
        if self._every_n_train_steps >= 1 or self._train_time_interval is not None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        refresh = self.last_every_n_steps is not None or self.last_every_minutes is not None
        if refresh and self._refresh_due(trainer) and self._can_save(trainer):
            self._write_last(trainer)

    def _write_last(self, trainer: L.Trainer) -> None:
        """Write last.ckpt without marking the step as saved, so the validation-end save of the same step (best-k,
        and last with the validation results) still happens; always a real file, also with save_last='link'."""
        candidates = self._monitor_candidates(trainer)
        filepath = self.format_checkpoint_name(candidates, self.CHECKPOINT_NAME_LAST)
        previous, self.last_model_path = self.last_model_path, filepath
        step_saved, path_saved = self._last_global_step_saved, self._last_checkpoint_saved
        self._save_checkpoint(trainer, filepath)
        self._last_global_step_saved, self._last_checkpoint_saved = step_saved, path_saved
        self._note_last_written(trainer)
        if previous and self._should_remove_checkpoint(trainer, previous, filepath):
            self._remove_checkpoint(trainer, previous)
