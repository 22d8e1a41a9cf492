"""Lightning's W&B logger with one ``mode`` switch, offline by default, and a run id that survives restarts."""

import os
import secrets
from pathlib import Path
from typing import Any, Literal

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_warn

Mode = Literal["online", "offline", "disabled"]
RUN_ID_FILE = "wandb-run-id"


class WandbLogger(_LightningWandbLogger):
    """W&B logging that needs no account or network unless asked for.

    - ``mode``: ``offline`` (default; ``wandb sync`` uploads later), ``online`` or ``disabled``; when unset,
      ``WANDB_MODE`` from the environment decides.
    - The run id is stored in ``<save_dir>/wandb-run-id``: a job that is requeued, or resumed into the same
      run directory, continues the same W&B run instead of starting a new one.
    - ``log_model`` (checkpoints as artifacts) needs online mode; elsewhere it is switched off with a warning
      rather than refusing to start.
    """

    def __init__(
        self,
        project: str = "lightscale",
        name: str | None = None,
        save_dir: str = ".",
        mode: Mode | None = None,
        group: str | None = None,
        job_type: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        entity: str | None = None,
        log_model: bool | Literal["all"] = False,
        **kwargs: Any,
    ) -> None:
        mode = mode or os.environ.get("WANDB_MODE", "offline")  # type: ignore[assignment]
        if mode == "dryrun":
            mode = "offline"
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"trainer.logger WandbLogger: mode must be online, offline or disabled, got {mode!r}")
        if log_model and mode != "online":
            rank_zero_warn(f"W&B log_model needs mode=online; checkpoints are not uploaded in mode={mode}.")
            log_model = False
        self.mode = mode
        self.run_id_file = Path(save_dir) / RUN_ID_FILE
        run_id = self.run_id_file.read_text().strip() if self.run_id_file.is_file() else secrets.token_hex(4)
        # jsonargparse passes every wandb.init keyword it knows, mostly as None: drop those so they do not
        # override Lightning's choices (e.g. resume="allow", which lets a requeued job continue its run).
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        extra = {"mode": "disabled"} if mode == "disabled" else {}
        super().__init__(
            name=name or Path(save_dir).name,
            save_dir=save_dir,
            id=run_id,
            offline=mode == "offline",
            project=project,
            log_model=log_model,
            group=group,
            job_type=job_type,
            tags=tags,
            notes=notes,
            entity=entity,
            **extra,
            **kwargs,
        )

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None:
            os.environ.setdefault("WANDB_SILENT", "true")
            Path(self.save_dir).mkdir(parents=True, exist_ok=True)
            self.run_id_file.write_text(f"{self._id}\n")
        return super().experiment
