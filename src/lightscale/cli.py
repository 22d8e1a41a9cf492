"""The ``lightscale`` command: LightningCLI with the template's defaults, run directories and error handling.

``lightscale fit|validate|test|predict --config a.yaml --config b.yaml --model.lr 1e-3``. Any importable
LightningModule / LightningDataModule can be named by ``class_path``; the experiment configs under
``configs/experiment/`` name them, the trainer / logger presets layer on top.
"""

import contextlib
import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentError, Namespace
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightscale import __version__
from lightscale.callbacks import BestMetrics, Checkpoint, EpochStats, History, Provenance, RunSummary, SaveRunConfig
from lightscale.callbacks.graceful_stop import GracefulStop, JobRequeued, Terminated
from lightscale.callbacks.predictions import PredictionWriter
from lightscale.callbacks.progress import progress_settings
from lightscale.checks import check_output_dir
from lightscale.config_files import check_config_files, given_on_command_line, where_set
from lightscale.errors import UserError, one_line
from lightscale.fault_tolerance import FaultTolerance
from lightscale.loggers import CSVLogger, WandbLogger
from lightscale.parallel import ShardingCheck
from lightscale.perf import skip_noop_batch_hooks, speed_settings
from lightscale.precision import install_unscaled_mixed_precision
from lightscale.resume import ResumeCheck, has_hpc_checkpoint
from lightscale.run_dir import (
    RUN_DIR_ENV,
    RunLock,
    check_run_name,
    has_checkpoints,
    has_run_artifacts,
    resolve_run_dir,
    update_summary,
)
from lightscale.slurm import check_srun

SUBCOMMANDS = ("fit", "validate", "test", "predict")
TRACEBACK_ENV = "LIGHTSCALE_TRACEBACK"


def register_config_types() -> None:
    """Teach jsonargparse and PyYAML the values a saved ``config.yaml`` must be able to hold, so a run can always be
    repeated from it (called when the CLI is built; importing this module changes nothing).

    - ``torch.device`` (e.g. ``StochasticWeightAveraging(device=...)``): written as ``cpu`` / ``cuda:0``.
    - jsonargparse keeps init_args that also fit a newly chosen class_path; a kept value validated by a restricted
      type (``PositiveFloat``, ...) is a float/int subclass that PyYAML's safe dumper rejects ("cannot represent
      an object"): represent such subclasses as the plain numbers they are.
    """
    from jsonargparse.typing import register_type

    register_type(torch.device, serializer=str, deserializer=torch.device, fail_already_registered=False)
    yaml.SafeDumper.add_multi_representer(float, yaml.SafeDumper.represent_float)
    yaml.SafeDumper.add_multi_representer(int, yaml.SafeDumper.represent_int)


def silence_dependency_chatter() -> None:
    """Hide warnings from inside torch, Lightning and W&B that users cannot act on (printed at every start)."""
    for message in (
        ".*set_vital.*",
        ".*LeafSpec.*",
        ".*litlogger.*",
        ".*Previous log files in this directory will be deleted.*",
        ".*anonymous.*",
    ):
        warnings.filterwarnings("ignore", message=message)


class LightscaleCLI(FaultTolerance, LightningCLI):
    """LightningCLI in subclass mode for model and data, plus a ``run`` group (name, root, dir, test)."""

    def __init__(self, args: Any = None, run: bool = True) -> None:
        register_config_types()
        self.run_dir: Path | None = None
        self._created_run_dir = False
        self._created_root: Path | None = None  # the outermost folder this run created (runs/, runs/<name>/, ...)
        self._lock: RunLock | None = None
        self._previous_env = os.environ.get(RUN_DIR_ENV)
        try:
            super().__init__(
                model_class=LightningModule,
                datamodule_class=LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                save_config_callback=SaveRunConfig,
                trainer_defaults={
                    "callbacks": [
                        RunSummary(),
                        History(),
                        Provenance(args if isinstance(args, (list, tuple)) else None),
                        EpochStats(),
                        BestMetrics(),
                        GracefulStop(),
                        PredictionWriter(),
                        ShardingCheck(),
                        ResumeCheck(),
                    ]
                },
                seed_everything_default=42,
                auto_configure_optimizers=False,
                parser_kwargs={
                    "description": "lightscale: train Lightning models from a laptop to a SLURM cluster. Other "
                    "commands: `lightscale report RUN_DIR ...` (report.md and plots for runs), `lightscale "
                    "preflight ...` (check a SLURM job before it queues).",
                    "prog": "lightscale",
                    "version": __version__,
                    "exit_on_error": False,
                    **{name: {"exit_on_error": False} for name in SUBCOMMANDS},
                },
                args=args,
                run=run,
            )
        except BaseException as error:
            with contextlib.suppress(Exception):  # recording the failure must not hide it
                self._after_failure(error)
            raise
        finally:
            self._release_run_dir()

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
        parser.add_subclass_arguments(
            EarlyStopping,
            "early_stopping",
            required=False,
            fail_untyped=False,
            help="Early stopping (default: on val/loss, patience 8); `early_stopping: null` switches it off.",
        )
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
                "early_stopping": _spec(EarlyStopping, monitor="val/loss", mode="min", patience=8, strict=False),
                "trainer.callbacks": [
                    _spec(LearningRateMonitor, logging_interval="step"),
                    {"class_path": "lightscale.callbacks.ThroughputLogger", "init_args": {}},
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
        check_run_name(name)
        run_dir = resolve_run_dir(config.run.root, name, config.run.dir)
        check_output_dir(run_dir, config.run.get("min_free_gb", 1.0))
        if rank_zero_only.rank == 0:  # the run's first process owns the directory; the other ranks follow it
            # a restarted SLURM job resumes even without --ckpt_path (Lightning's own convention; see fault_tolerance)
            requeued = SLURMEnvironment.detect() and has_hpc_checkpoint(run_dir)
            resume = self.subcommand == "fit" and (bool(config.get("ckpt_path")) or requeued)
            self.claim_run_dir(run_dir, resume=resume)
        os.environ[RUN_DIR_ENV] = str(run_dir)  # DDP workers re-run this command line: same directory
        self.run_dir = run_dir
        config.trainer.default_root_dir = str(run_dir)
        config.checkpoint.dirpath = str(run_dir / "checkpoints")
        for logger in _as_list(config.trainer.logger):
            _point_logger_at(logger, run_dir)
        for callback in _as_list(config.trainer.callbacks):
            if _short_name(callback) in ("ModelCheckpoint", "Checkpoint") and callback.init_args.get("dirpath") is None:
                callback.init_args.dirpath = str(run_dir / "checkpoints")

    def claim_run_dir(self, run_dir: Path, resume: bool) -> None:
        """Lock the run directory (creating it), then refuse it if it holds another run and this is no resume.

        Called on the run's first process only; ``lightscale preflight`` overrides it to plan a run without
        creating anything."""
        created = not run_dir.exists()
        self._created_root = next((p for p in reversed(run_dir.absolute().parents) if not p.exists()), run_dir)
        lock = RunLock(run_dir)
        try:
            lock.acquire()
            if not created and has_run_artifacts(run_dir) and not resume:
                raise UserError(
                    f"run.dir {run_dir} already holds a run; pass --ckpt_path auto to resume it, "
                    "or leave run.dir unset for a new run"
                )
        except UserError:
            lock.release(remove=lock.created)
            if created:
                self._remove_run_dir(run_dir)
            raise
        self._lock, self._created_run_dir = lock, created
        self.run_dir = run_dir

    def _remove_run_dir(self, run_dir: Path) -> None:
        """Remove a run directory this run created, and the parents it created for it if they are now empty."""
        shutil.rmtree(run_dir, ignore_errors=True)
        parent = run_dir.absolute().parent
        while self._created_root in (parent, *parent.parents) and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent

    def _release_run_dir(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._previous_env is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = self._previous_env

    def _after_failure(self, error: BaseException) -> None:
        """Leave the run directory in a state that says what happened: ``summary.json`` ``status`` is
        ``terminated`` (a stop signal, with the checkpoint it saved), ``requeued``, or ``failed`` (with the error);
        a directory this run created and that holds no checkpoint is removed (nothing of value, nothing to resume:
        bad input found after start-up leaves no stray run behind)."""
        run_dir = self.run_dir
        if run_dir is None or rank_zero_only.rank != 0 or not run_dir.is_dir():
            return
        trainer = getattr(self, "trainer", None)
        summary = next((c for c in getattr(trainer, "callbacks", []) if isinstance(c, RunSummary)), None)
        trained = summary is not None and summary.samples > 0  # this attempt ran at least one training batch
        if isinstance(error, Terminated):
            fields = {"status": "terminated", "signal": error.signal_name, "checkpoint": str(error.checkpoint)}
        elif isinstance(error, JobRequeued):
            fields = {"status": "requeued"}
        elif isinstance(error, SystemExit) and not error.code:
            return
        elif self._created_run_dir and not has_checkpoints(run_dir):
            _finish_wandb(exit_code=1)
            self._remove_run_dir(run_dir)
            return
        elif not trained and not self._created_run_dir:
            return  # a resume that failed before its first step: the run is as it was
        else:
            fields = {"status": "failed", "error": f"{type(error).__name__}: {one_line(str(error))}"[:2000]}
        with contextlib.suppress(OSError):
            update_summary(run_dir, fields)
        _finish_wandb(exit_code=getattr(error, "code", 1) if fields["status"] != "requeued" else 0, status=fields)

    def _require(self, subcommand: str, step: str, loader: str, split: str) -> None:
        """Refuse, before anything runs, a subcommand the model or the data cannot do."""
        if not is_overridden(step, self.model, LightningModule):
            raise UserError(f"{type(self.model).__name__} defines no {step}, so it cannot {subcommand}")
        if self.datamodule is not None and not is_overridden(loader, self.datamodule, LightningDataModule):
            hint = "; use `lightscale validate`" if subcommand == "test" else ""
            raise UserError(f"{type(self.datamodule).__name__} has no {split} split (no {loader}){hint}")

    def before_validate(self) -> None:
        self._require("validate", "validation_step", "val_dataloader", "validation")
        super().before_validate()

    def before_test(self) -> None:
        self._require("test", "test_step", "test_dataloader", "test")
        super().before_test()

    def after_fit(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        if (
            config.run.test_after_fit
            and self.datamodule is not None
            and is_overridden("test_dataloader", self.datamodule, LightningDataModule)
            and is_overridden("test_step", self.model, LightningModule)
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
        config_init = self.config_init.get(str(self.subcommand), self.config_init)
        trainer_config = dict(config_init.get("trainer", {}))
        early_stopping = config_init.get("early_stopping")
        if early_stopping is not None:
            trainer_config["callbacks"] = [*_as_list(trainer_config.get("callbacks")), early_stopping]
        defaults = {**progress_settings(trainer_config), **speed_settings(trainer_config)}  # perf.py: TF32, profiler
        defaults.setdefault("callbacks", trainer_config.get("callbacks"))
        trainer = super().instantiate_trainer(**{**defaults, **kwargs})
        skip_noop_batch_hooks(trainer)  # perf.py: Lightning would call every callback's empty hooks every step
        install_unscaled_mixed_precision(trainer)  # bf16 + a fused optimizer + gradient clipping
        return trainer

    def _report_end(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        if not self.trainer.is_global_zero:
            return
        files = ["summary.json", "config.yaml"]
        fields: dict[str, Any] = {"status": "finished"}
        writer = next((c for c in self.trainer.callbacks if isinstance(c, PredictionWriter)), None)
        if self.subcommand == "predict" and writer is not None and writer.path is not None:
            fields["predict"] = {"file": writer.path.name, "rows": writer.count}
            files.insert(0, writer.path.name)
        update_summary(self.run_dir, fields)
        if config.run.get("report", True):
            from lightscale.report import write_report_safely  # matplotlib only when a run ends

            write_report_safely(self.run_dir)
        rank_zero_info(f"lightscale: run finished; results in {self.run_dir} ({', '.join(files)})")


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


def _finish_wandb(exit_code: int = 0, status: dict[str, Any] | None = None) -> None:
    """Close the W&B run (so the next run in this process starts its own), with the exit code and, for a run
    that did not finish, its status in the W&B summary."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return
    with contextlib.suppress(Exception):  # W&B trouble must not hide the run's own outcome
        if status:
            run.summary.update({f"lightscale/{key}": value for key, value in status.items()})
        wandb.finish(exit_code=exit_code)


def _with_location(message: str, argv: list[str]) -> str:
    """Add the file and line that set the key a config error names (with several --config files, users should
    not have to guess which one)."""
    match = re.search(r"does not accept option '([^']+)'", message) or re.match(r"([\w.\[\]]+): ", message)
    if match and not given_on_command_line(match.group(1), argv):
        where = where_set(match.group(1), argv)
        if where:
            return f"{message} (set in {where})"
    return message


def _quiet_lightning_tips() -> None:
    """Lightning prints an advertisement (the litlogger tip) through its info logger at every start."""

    class _NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "litlogger" not in str(record.msg)

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in target.filters):
            target.addFilter(_NoTips())


def main(args: Any = None) -> None:
    """Console entry point: configuration and input errors become one line on stderr and exit code 2; a run
    stopped by a signal exits with ``128 + signal`` after saving its checkpoint.

    ``LIGHTSCALE_TRACEBACK=1`` re-raises them with the full traceback, for debugging the template itself.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["report"]:  # not a Trainer subcommand: no LightningCLI
        from lightscale.report import main as report_main

        return report_main(argv[1:])
    if argv[:1] == ["preflight"]:  # checks a config, runs no Trainer
        from lightscale.preflight import main as preflight_main

        return preflight_main(argv[1:])
    silence_dependency_chatter()
    _quiet_lightning_tips()
    try:
        check_config_files(argv)
        check_srun()
        LightscaleCLI(args=None if args is None else argv)  # None: LightningCLI reads sys.argv itself
        _finish_wandb()
    except Terminated as stop:
        _finish_wandb(exit_code=int(stop.code or 1))
        print(f"lightscale: stopped by {stop.signal_name}; resume with --ckpt_path auto", file=sys.stderr)
        sys.exit(stop.code)
    except (ArgumentError, UserError, ValueError, OSError, MisconfigurationException) as error:
        if os.environ.get(TRACEBACK_ENV):
            raise
        message = _with_location(one_line(str(error)), argv)
        print(f"lightscale: error: {message}", file=sys.stderr)
        sys.exit(2)
