"""Save the resolved config into the run directory and hand it to every logger (W&B included)."""

import time
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.cli import SaveConfigCallback

from lightscale.core.files import write_atomic


class SaveRunConfig(SaveConfigCallback):
    """Writes ``config.yaml`` to the run directory and logs the full, nested config as hyper-parameters.

    Lightning's stock callback writes to ``trainer.log_dir`` (which for W&B is the logger's save dir, not the
    run) and logs nothing to the loggers; users then find only the model's hparams in W&B. Here every key of
    the resolved config (``model.init_args.lr``, ``trainer.max_epochs``, ...) becomes a nested W&B config
    entry that can be filtered and swept on. A resumed run keeps the original ``config.yaml`` and writes its
    own config beside it.
    """

    def __init__(self, parser: Any, config: Any, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(parser, config, **kwargs)

    def config_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML types (what a user would write)."""
        return yaml.safe_load(self._dump(skip_link_targets=False))

    def _dump(self, skip_link_targets: bool) -> str:
        # The parser validated this config before the run was built; validating it again for each dump cost
        # ~35 ms per dump on the GPT config, at the start of every run.
        return self.parser.dump(
            self.config, skip_unset=False, skip_validation=True, skip_link_targets=skip_link_targets
        )

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        run_dir = Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"lightscale: run directory {run_dir}", flush=True)
        target = run_dir / "config.yaml"
        if target.exists():
            target = run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml"
        write_atomic(target, self._dump(skip_link_targets=True))
        config = self.config_dict()
        for logger in trainer.loggers:
            logger.log_hyperparams(config)
