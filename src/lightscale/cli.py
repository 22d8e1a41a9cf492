"""The ``lightscale`` command: LightningCLI with the template's defaults, run directories and error handling.

``lightscale fit|validate|test|predict --config a.yaml --config b.yaml --model.lr 1e-3``. Any importable
LightningModule / LightningDataModule can be named by ``class_path``; the experiment configs under
``configs/experiment/`` name them, the trainer / logger presets layer on top.
"""

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightscale.callbacks import BestMetrics, Checkpoint, EpochStats, Provenance, RunSummary, SaveRunConfig
from lightscale.callbacks.progress import progress_settings
from lightscale.callbacks.requeue import SlurmRequeue
from lightscale.errors import UserError, one_line
from lightscale.fault_tolerance import FaultTolerance
from lightscale.loggers import WandbLogger
from lightscale.perf import skip_noop_batch_hooks, speed_settings
from lightscale.run_dir import RUN_DIR_ENV, has_run_artifacts, resolve_run_dir
from lightscale.slurm import check_srun

SUBCOMMANDS = ("fit", "validate", "test", "predict")
TRACEBACK_ENV = "LIGHTSCALE_TRACEBACK"

# jsonargparse keeps init_args that also fit a newly chosen class_path; a kept value validated by a restricted
# type (PositiveFloat, ...) is a float/int subclass that PyYAML's safe dumper rejects ("cannot represent an
# object") when Lightning dumps the config. Represent such subclasses as the plain numbers they are.
yaml.SafeDumper.add_multi_representer(float, yaml.SafeDumper.represent_float)
yaml.SafeDumper.add_multi_representer(int, yaml.SafeDumper.represent_int)


def silence_dependency_chatter() -> None:
    """Hide deprecation warnings that come from inside torch and Lightning: users cannot act on them."""
    for message in (".*set_vital.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message=message)


silence_dependency_chatter()


class LightscaleCLI(FaultTolerance, LightningCLI):
    """LightningCLI in subclass mode for model and data, plus a ``run`` group (name, root, dir, test)."""

    def __init__(self, args: Any = None, run: bool = True) -> None:
        super().__init__(
            model_class=LightningModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveRunConfig,
            trainer_defaults={
                "callbacks": [
                    RunSummary(),
                    Provenance(args if isinstance(args, (list, tuple)) else None),
                    EpochStats(),
                    BestMetrics(),
                    SlurmRequeue(),  # a no-op outside SLURM
                ]
            },
            seed_everything_default=42,
            auto_configure_optimizers=False,
            parser_kwargs={
                "description": "lightscale: train Lightning models from a laptop to a SLURM cluster. "
                "Also: `lightscale report RUN_DIR [RUN_DIR ...]` writes report.md and plots for a run, "
                "or compares several.",
                "exit_on_error": False,
                **{name: {"exit_on_error": False} for name in SUBCOMMANDS},
            },
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run.name",
            type=str | None,
            default=None,
            help="Experiment name: runs go to <run.root>/<run.name>/<time>-<id>/ (default: the model class name).",
        )
        parser.add_argument("--run.root", type=str, default="runs", help="Folder that holds all runs.")
        parser.add_argument(
            "--run.dir",
            type=str | None,
            default=None,
            help="Use exactly this run directory (to resume a run in place).",
        )
        parser.add_argument(
            "--run.test_after_fit",
            type=bool,
            default=True,
            help="After fit, test the best checkpoint when the data has a test split.",
        )
        parser.add_argument(
            "--run.report",
            type=bool,
            default=True,
            help="At the end, write report.md and PNG plots into the run directory (see `lightscale report`).",
        )
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-{epoch}-{step}",
                "checkpoint.auto_insert_metric_name": False,
                "trainer.max_epochs": 30,
                "trainer.log_every_n_steps": 10,
                "trainer.gradient_clip_val": 1.0,
                "trainer.callbacks": [
                    _spec(EarlyStopping, monitor="val/loss", mode="min", patience=8, strict=False),
                    _spec(LearningRateMonitor, logging_interval="step"),
                    {"class_path": "lightscale.callbacks.throughput.ThroughputLogger", "init_args": {}},
                ],
                # The full config is logged, nested, by SaveRunConfig; Lightning's flat copy of the model and
                # data hparams would duplicate it at the top level of the W&B config.
                "trainer.enable_autolog_hparams": False,
                "trainer.logger": [_spec(WandbLogger), _spec(CSVLogger, save_dir=".")],
            }
        )
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        super().add_arguments_to_parser(parser)  # FaultTolerance: run.min_free_gb, nonfinite, checkpoint cadence

    # ------------------------------------------------------------------ run directory
    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        name = config.run.name or config.model.class_path.rsplit(".", 1)[-1].lower()
        run_dir, inherited = resolve_run_dir(config.run.root, name, config.run.dir)
        if not inherited and has_run_artifacts(run_dir) and not (self.subcommand == "fit" and config.get("ckpt_path")):
            raise UserError(
                f"run.dir {run_dir} already holds a run; pass --ckpt_path last to resume it, "
                "or leave run.dir unset for a new run"
            )
        os.environ[RUN_DIR_ENV] = str(run_dir)  # DDP workers re-run this command line: same directory
        self.run_dir = run_dir
        config.trainer.default_root_dir = str(run_dir)
        config.checkpoint.dirpath = str(run_dir / "checkpoints")
        for logger in _as_list(config.trainer.logger):
            _point_logger_at(logger, run_dir)
        for callback in _as_list(config.trainer.callbacks):
            if _short_name(callback) in ("ModelCheckpoint", "Checkpoint") and callback.init_args.get("dirpath") is None:
                callback.init_args.dirpath = str(run_dir / "checkpoints")

    def after_fit(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        if (
            config.run.test_after_fit
            and self.datamodule is not None
            and is_overridden("test_dataloader", self.datamodule, LightningDataModule)
        ):
            ckpt = (
                "best"
                if self.trainer.checkpoint_callback and self.trainer.checkpoint_callback.best_model_path
                else None
            )
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
        self._report_end()

    def after_validate(self) -> None:
        self._report_end()

    def after_test(self) -> None:
        self._report_end()

    def after_predict(self) -> None:
        self._report_end()

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """Rich progress bar in a terminal, one-line logs in batch jobs, unless the config chose."""
        trainer_config = self.config_init.get(str(self.subcommand), self.config_init).get("trainer", {})
        defaults = {**progress_settings(trainer_config), **speed_settings(trainer_config)}  # perf.py: TF32, profiler
        trainer = super().instantiate_trainer(**{**defaults, **kwargs})
        skip_noop_batch_hooks(trainer)  # perf.py: Lightning would call every callback's empty hooks every step
        return trainer

    def _report_end(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        if config.run.get("report", True) and self.trainer.is_global_zero:
            from lightscale.report import write_report_safely  # matplotlib only when a run ends

            write_report_safely(self.run_dir)
        rank_zero_info(f"lightscale: run finished; results in {self.run_dir} (summary.json, config.yaml)")


def _spec(cls: type, **init_args: Any) -> dict[str, Any]:
    """A ``class_path`` default that ``--print_config`` can show and YAML can override."""
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def _as_list(value: Any) -> list:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, list) else [value]


def _short_name(item: Any) -> str:
    return item.class_path.rsplit(".", 1)[-1] if isinstance(item, Namespace) and "class_path" in item else ""


def _point_logger_at(logger: Any, run_dir: Path) -> None:
    """Make a configured logger write inside the run directory (CSV's metrics.csv directly at the top)."""
    if not isinstance(logger, Namespace) or "init_args" not in logger or "save_dir" not in logger.init_args:
        return
    logger.init_args.save_dir = str(run_dir)
    kind = _short_name(logger)
    if kind == "CSVLogger":
        logger.init_args.name, logger.init_args.version = "", ""
    elif kind == "TensorBoardLogger":
        logger.init_args.name, logger.init_args.version = "tensorboard", ""


def _finish_wandb() -> None:
    """Close the W&B run so the next run in this process (tests, notebooks) starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def main(args: Any = None) -> None:
    """Console entry point: configuration and input errors become one line on stderr and exit code 2.

    ``LIGHTSCALE_TRACEBACK=1`` re-raises them with the full traceback, for debugging the template itself.
    """
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, (list, tuple)) and list(argv[:1]) == ["report"]:  # not a Trainer subcommand: no LightningCLI
        from lightscale.report import main as report_main

        return report_main(argv[1:])
    if isinstance(argv, (list, tuple)) and list(argv[:1]) == ["preflight"]:  # checks a config, runs no Trainer
        from lightscale.preflight import main as preflight_main

        return preflight_main(argv[1:])
    try:
        check_srun()
        LightscaleCLI(args=args)
        _finish_wandb()
    except (ArgumentError, UserError, ValueError, OSError, MisconfigurationException) as error:
        if os.environ.get(TRACEBACK_ENV):
            raise
        message = one_line(str(error))
        print(f"lightscale: error: {message}", file=sys.stderr)
        sys.exit(2)
