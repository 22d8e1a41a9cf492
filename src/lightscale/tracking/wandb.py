"""Lightning's W&B logger with one ``mode`` switch, offline by default, and a run id that survives restarts."""

import inspect
import os
import secrets
from pathlib import Path
from typing import Any, Literal

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from lightscale.core.errors import UserError
from lightscale.core.run_dir import WANDB_RUN_ID_FILE
from lightscale.tracking.wandb_access import check_online

Mode = Literal["online", "offline", "disabled"]


def resolve_mode(mode: str | None) -> str:
    """The W&B mode a logger runs in: its own ``mode``, else ``WANDB_MODE``, else offline."""
    mode = mode or os.environ.get("WANDB_MODE") or "offline"
    return "offline" if mode == "dryrun" else mode


def check_settings(mode: str | None, init_kwargs: dict[str, Any] | None) -> None:
    """What the CLI checks before anything starts (errors raised inside a logger's constructor reach users only as
    jsonargparse's "Not a valid subclass of Logger"): ``init_kwargs`` that ``wandb.init`` takes, and for online
    mode an API key and a server that answers."""
    mode = resolve_mode(mode)
    if not init_kwargs and mode != "online":
        return
    import wandb  # only for a run that starts: --help and --print_config never get here

    unknown = sorted(set(init_kwargs or {}) - set(inspect.signature(wandb.init).parameters))
    if unknown:
        raise UserError(f"WandbLogger init_kwargs: wandb.init() takes no argument {', '.join(unknown)}")
    if mode == "online":
        check_online(os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url)


class WandbLogger(_LightningWandbLogger):
    """W&B logging that needs no account or network unless asked for.

    - ``mode``: ``offline`` (default; ``wandb sync`` uploads later), ``online`` or ``disabled``; when unset,
      ``WANDB_MODE`` from the environment decides.
    - The run id is stored in ``<save_dir>/wandb-run-id``: a job that is requeued, or resumed into the same
      run directory, continues the same W&B run instead of starting a new one.
    - ``log_model`` (checkpoints as artifacts) needs online mode; elsewhere it is switched off with a warning
      rather than refusing to start.
    - ``init_kwargs``: any other ``wandb.init`` arguments, e.g. ``{save_code: true, settings: {...}}``. They
      are a plain dict rather than typed options because resolving ``wandb.init``'s signature makes the CLI
      import wandb (2.2 s) for every ``--help``, ``--print_config`` or config error; now wandb is imported only
      when the run starts (benchmarks/startup.py).
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
        init_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        mode = resolve_mode(mode)  # type: ignore[assignment]
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"trainer.logger WandbLogger: mode must be online, offline or disabled, got {mode!r}")
        if log_model and mode != "online":
            rank_zero_warn(f"W&B log_model needs mode=online; checkpoints are not uploaded in mode={mode}.")
            log_model = False
        self.mode = mode
        self.run_id_file = Path(save_dir) / WANDB_RUN_ID_FILE
        run_id = self.run_id_file.read_text().strip() if self.run_id_file.is_file() else secrets.token_hex(4)
        # None means "not given": it must not override Lightning's choices (e.g. resume="allow", which lets a
        # requeued job continue its run). Merged under a new name so jsonargparse does not follow **kwargs into
        # Lightning's and wandb's signatures (that imports wandb at parse time).
        init = {key: value for key, value in {**(init_kwargs or {}), **kwargs}.items() if value is not None}
        extra = {"mode": "disabled"} if mode == "disabled" else {}
        super().__init__(
            name=name or Path(save_dir).name,
            # Absolute: wandb's long-lived service process resolves a relative dir against its own working
            # directory, so a second run in the same process after a chdir would write its .wandb file nowhere.
            save_dir=str(Path(save_dir).absolute()),
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
            **init,
        )
        if self._wandb_init.get("anonymous") is None:  # Lightning passes None; wandb warns about the key itself
            self._wandb_init.pop("anonymous", None)

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None:
            os.environ.setdefault("WANDB_SILENT", "true")
            Path(self.save_dir).mkdir(parents=True, exist_ok=True)
            self.run_id_file.write_text(f"{self._id}\n")
            try:
                return super().experiment
            except Exception as error:
                if type(error).__module__.startswith("wandb"):  # wandb.errors.*: no key, no network, bad setting
                    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
                    raise UserError(f"W&B could not start the run: {reason}") from None
                raise
        return super().experiment
