"""Progress display: a rich progress bar in a terminal, periodic one-line logs in batch jobs.

The choice is made when the Trainer is built (:func:`progress_settings`), from whether stdout is a terminal,
and always yields to what the user configured: ``--trainer.enable_progress_bar true|false`` or a progress-bar
callback of their own.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar as _ProgressBarBase

from lightscale.tracking.line_logger import LineLogger


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar without the ``v_num`` entry (a W&B run id fragment that tells nobody
    anything); the metrics shown are those the model logs with ``prog_bar=True``."""

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def progress_settings(trainer_config: Mapping[str, Any], interactive: bool | None = None) -> dict[str, Any]:
    """Trainer keyword arguments (``enable_progress_bar``, ``callbacks``) that pick the progress display.

    - a progress-bar callback already configured: left alone ({}).
    - ``enable_progress_bar`` unset (None): :class:`ProgressBar` when stdout is a terminal, otherwise no bar and
      a :class:`LineLogger`.
    - ``enable_progress_bar: true``: :class:`ProgressBar`; ``false``: no bar, a :class:`LineLogger` (quiet mode).

    ``trainer_config`` is the instantiated trainer config (callbacks as objects); ``interactive`` overrides the
    terminal check (tests).
    """
    callbacks = trainer_config.get("callbacks") or []
    callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    if any(isinstance(callback, _ProgressBarBase) for callback in callbacks):
        return {}
    enabled = trainer_config.get("enable_progress_bar")
    if enabled is None:
        enabled = sys.stdout.isatty() if interactive is None else interactive
    if enabled:
        return {"enable_progress_bar": True, "callbacks": [*callbacks, ProgressBar()]}
    if not any(isinstance(callback, LineLogger) for callback in callbacks):
        callbacks.append(LineLogger())
    return {"enable_progress_bar": False, "callbacks": callbacks}
