"""``LightscaleCLI``: LightningCLI with the template's defaults (``defaults.yaml``), one run directory per command,
safe checkpoint loading, and the checks that turn mistakes into one line before anything runs."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from jsonargparse.typing import NonNegativeFloat
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightscale import __version__
from lightscale.cli.checkpoints import (
    install_checkpoint_io,
    model_settings_from_checkpoint,
    resolve_checkpoint,
    resumes,
)
from lightscale.cli.checks import check_config, check_output_dir
from lightscale.cli.ownership import RunDirectory
from lightscale.cluster.launch import launch_id
from lightscale.core.errors import UserError
from lightscale.core.run_dir import check_run_name, resolve_run_dir, update_summary
from lightscale.resilience.checkpoint import Checkpoint
from lightscale.resilience.hang_watch import HangWatch
from lightscale.resilience.nonfinite import NonFiniteGuard
from lightscale.tracking.memory import MemoryWatch
from lightscale.tracking.predictions import PredictionWriter
from lightscale.tracking.progress import progress_settings
from lightscale.tracking.provenance import Provenance
from lightscale.tracking.save_config import SaveRunConfig
from lightscale.tracking.summary import RunSummary
from lightscale.training.perf import skip_noop_batch_hooks, speed_settings
from lightscale.training.precision import install_unscaled_mixed_precision

SUBCOMMANDS = ("fit", "validate", "test", "predict")
DEFAULTS = Path(__file__).with_name("defaults.yaml")
DESCRIPTION = (
    "lightscale: train Lightning models from a laptop to a SLURM cluster. Every run starts from the template's "
    f"defaults ({DEFAULTS}); `--print_config` shows the merged result. Other commands: `lightscale report RUN_DIR "
    "[RUN_DIR ...]` (report.md and plots of a run, or a comparison; no RUN_DIR: the newest run), `lightscale "
    "preflight --config CONFIG [--sbatch FILE]` (check a SLURM job before it queues), `lightscale sync [--watch] "
    "[RUN_DIR ...]` (upload offline W&B runs, also while they run)."
)


def register_config_types() -> None:
    """Teach jsonargparse and PyYAML the values a saved ``config.yaml`` must be able to hold, so a run can always be
    repeated from it (called when the CLI is built; importing this module changes nothing).

    - ``torch.device`` (e.g. ``StochasticWeightAveraging(device=...)``): written as ``cpu`` / ``cuda:0``.
    - jsonargparse keeps init_args that also fit a newly chosen class_path; a kept value validated by a restricted
      type (``PositiveFloat``, ...) is a float/int subclass that PyYAML's safe dumper rejects ("cannot represent
      an object"): represent such subclasses as the plain numbers they are.
    - ``str`` enums as defaults (``Timer(interval=Interval.step)``): the same rejection; written as their value.
    """
    from jsonargparse.typing import register_type

    register_type(torch.device, serializer=str, deserializer=torch.device, fail_already_registered=False)
    yaml.SafeDumper.add_multi_representer(float, yaml.SafeDumper.represent_float)
    yaml.SafeDumper.add_multi_representer(int, yaml.SafeDumper.represent_int)
    yaml.SafeDumper.add_multi_representer(str, lambda dumper, value: dumper.represent_str(str.__str__(value)))


class LightscaleCLI(LightningCLI):
    """``lightscale fit|validate|test|predict``: any LightningModule / LightningDataModule by ``class_path``, with
    the groups ``run`` (where the run goes, the template's callbacks), ``checkpoint``, ``early_stopping``,
    ``nonfinite``, ``memory`` and ``watchdog`` beside ``trainer``, ``model`` and ``data``; their defaults are
    ``defaults.yaml``.

    Args:
        args: the command line without the program name (``None``: ``sys.argv``).
        run: run the subcommand (``False``: only parse and build, as tests and ``lightscale preflight`` do).
    """

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        register_config_types()
        self.argv = list(sys.argv[1:] if args is None else args)
        self.run_directory: RunDirectory | None = None
        try:
            super().__init__(
                model_class=LightningModule,
                datamodule_class=LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                save_config_callback=SaveRunConfig,
                auto_configure_optimizers=False,  # models inject their optimizer and schedule (see models/)
                parser_kwargs={
                    "description": DESCRIPTION,
                    "prog": "lightscale",
                    "version": __version__,
                    "exit_on_error": False,
                    # the defaults go to each subcommand's parser; without subcommands (run=False), to the only one
                    **({} if run else {"default_config_files": [str(DEFAULTS)]}),
                    **{name: {"exit_on_error": False, "default_config_files": [str(DEFAULTS)]} for name in SUBCOMMANDS},
                },
                args=args,
                run=run,
            )
        except BaseException as error:
            with contextlib.suppress(Exception):  # recording the failure must not hide it
                self._record_failure(error)
            raise
        finally:
            if self.run_directory is not None:
                self.run_directory.release()

    def _of(self, config: Namespace) -> Namespace:
        """The part of a parsed config that belongs to this command (all of it without subcommands)."""
        return config[self.subcommand] if self.subcommand else config

    @property
    def run_dir(self) -> Path | None:
        return self.run_directory.path if self.run_directory is not None else None

    # ------------------------------------------------------------------------------------------- arguments
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run.name", type=str | None, default=None, help="Runs go to <run.root>/<run.name>/.")
        parser.add_argument("--run.root", type=str, default="runs", help="Folder that holds all runs.")
        parser.add_argument("--run.dir", type=str | None, default=None, help="This exact run directory (a resume).")
        parser.add_argument("--run.test_after_fit", type=bool, default=True, help="After fit, test the best model.")
        parser.add_argument("--run.report", type=bool, default=True, help="Write report.md and plots at the end.")
        parser.add_argument(
            "--run.min_free_gb", type=NonNegativeFloat, default=1.0, help="Refuse to start with less free disk."
        )
        parser.add_argument(
            "--run.callbacks", type=list[Callback], default=[], help="The template's own callbacks (defaults.yaml)."
        )
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        parser.add_lightning_class_args(MemoryWatch, "memory")
        parser.add_lightning_class_args(HangWatch, "watchdog")
        parser.add_subclass_arguments(
            EarlyStopping, "early_stopping", required=False, fail_untyped=False, help="`null` switches it off."
        )
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Check devices, precision, launch, loggers and secrets as soon as the config is known."""
        super().parse_arguments(parser, args)
        if self.config.get("subcommand"):
            check_config(self.config[self.config.subcommand])

    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's reading of an explicit ``--ckpt_path`` (a bare ``torch.load`` whose
        hyper-parameters then fill in the config): see :func:`model_settings_from_checkpoint`."""
        subcommand = self.config.get("subcommand")
        model = model_settings_from_checkpoint(self.config[subcommand], subcommand) if subcommand else None
        if model is not None:
            self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    # ------------------------------------------------------------------------------------- run directory
    def before_instantiate_classes(self) -> None:
        subcommand = str(self.subcommand or "fit")
        config = self._of(self.config)
        name = config.run.name or config.model.class_path.rsplit(".", 1)[-1].lower()
        check_run_name(name)
        run_dir = resolve_run_dir(config.run.root, name, config.run.dir, shared_id=launch_id())
        check_output_dir(run_dir, config.run.min_free_gb)
        self.run_directory = RunDirectory(run_dir)
        if rank_zero_only.rank == 0:  # the run's first process owns the directory; the other ranks follow it
            self.claim_run_dir(resume=resumes(subcommand, config, run_dir))
        self.run_directory.export()
        config.trainer.default_root_dir = str(run_dir)
        config.checkpoint.dirpath = str(run_dir / "checkpoints")
        for logger in _as_list(config.trainer.logger):
            _point_logger_at(logger, run_dir)
        for callback in _as_list(config.trainer.callbacks):
            if _short_name(callback) in ("ModelCheckpoint", "Checkpoint") and callback.init_args.get("dirpath") is None:
                callback.init_args.dirpath = str(run_dir / "checkpoints")

    def claim_run_dir(self, resume: bool) -> None:
        """Lock the run directory for this command (``lightscale preflight`` overrides it: it creates nothing)."""
        assert self.run_directory is not None
        self.run_directory.claim(resume)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The Trainer with the config's callbacks, early stopping and the template's own (``run.callbacks``); a
        progress bar in a terminal and one-line logs elsewhere unless the config chose; safe checkpoint IO."""
        config = self._of(self.config_init)
        trainer_config = dict(config.get("trainer", {}))
        early_stopping = [config.early_stopping] if config.get("early_stopping") is not None else []
        callbacks = [*_as_list(trainer_config.get("callbacks")), *early_stopping, *config.run.callbacks]
        for callback in callbacks:
            if isinstance(callback, Provenance):
                callback.argv = self.argv  # what was run, also when called in-process
        trainer_config["callbacks"] = callbacks
        defaults = {**progress_settings(trainer_config), **speed_settings(trainer_config)}
        defaults.setdefault("callbacks", callbacks)
        trainer = super().instantiate_trainer(**{**defaults, **kwargs})
        skip_noop_batch_hooks(trainer)  # Lightning would call every callback's empty per-batch hooks
        install_unscaled_mixed_precision(trainer)  # bf16 + a fused optimizer + gradient clipping
        install_checkpoint_io(trainer)
        return trainer

    # ------------------------------------------------------------------------------------ the subcommands
    def _require(self, subcommand: str, step: str, loader: str, split: str) -> None:
        """Refuse, before anything runs, a subcommand the model or the data cannot do."""
        if not is_overridden(step, self.model, LightningModule):
            raise UserError(f"{type(self.model).__name__} defines no {step}, so it cannot {subcommand}")
        if self.datamodule is not None and not is_overridden(loader, self.datamodule, LightningDataModule):
            hint = "; use `lightscale validate`" if subcommand == "test" else ""
            raise UserError(f"{type(self.datamodule).__name__} has no {split} split (no {loader}){hint}")

    def _resolve_checkpoint(self) -> None:
        subcommand = str(self.subcommand)
        assert self.run_dir is not None
        resolve_checkpoint(subcommand, self._of(self.config_init), self.run_dir, self.model)

    def before_fit(self) -> None:
        self._resolve_checkpoint()

    def before_validate(self) -> None:
        self._require("validate", "validation_step", "val_dataloader", "validation")
        self._resolve_checkpoint()

    def before_test(self) -> None:
        self._require("test", "test_step", "test_dataloader", "test")
        self._resolve_checkpoint()

    def before_predict(self) -> None:
        self._resolve_checkpoint()

    def after_fit(self) -> None:
        config = self._of(self.config)
        testable = is_overridden("test_step", self.model, LightningModule) and (
            self.datamodule is not None and is_overridden("test_dataloader", self.datamodule, LightningDataModule)
        )
        if config.run.test_after_fit and testable:
            checkpoint = self.trainer.checkpoint_callback
            best = "best" if checkpoint is not None and getattr(checkpoint, "best_model_path", "") else None
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best)
        self._finish()

    def after_validate(self) -> None:
        self._finish()

    def after_test(self) -> None:
        self._finish()

    def after_predict(self) -> None:
        self._finish()

    def _finish(self) -> None:
        """Mark the run finished, write its report, and say where it is."""
        if not self.trainer.is_global_zero or self.run_dir is None:
            return
        files = ["summary.json", "config.yaml"]
        fields: dict[str, Any] = {"status": "finished"}
        writer = next((c for c in self.trainer.callbacks if isinstance(c, PredictionWriter)), None)
        if self.subcommand == "predict" and writer is not None and writer.path is not None:
            fields["predict"] = {"file": writer.path.name, "rows": writer.count}
            files.insert(0, writer.path.name)
        update_summary(self.run_dir, fields)
        if self._of(self.config).run.report:
            from lightscale.report import write_report_safely  # matplotlib only when a run ends

            write_report_safely(self.run_dir)
        rank_zero_info(f"lightscale: run finished; results in {self.run_dir} ({', '.join(files)})")

    def _record_failure(self, error: BaseException) -> None:
        """How a failed or stopped command ended, in ``summary.json`` and W&B (see :class:`RunDirectory`)."""
        from lightscale.cli.main import finish_wandb

        if self.run_directory is None or rank_zero_only.rank != 0:
            return
        summary = next(
            (c for c in getattr(getattr(self, "trainer", None), "callbacks", []) if isinstance(c, RunSummary)), None
        )
        fields = self.run_directory.ending(error, trained=summary is not None and summary.samples > 0)
        code = 0 if fields is not None and fields["status"] == "requeued" else (getattr(error, "code", None) or 1)
        finish_wandb(exit_code=int(code) if isinstance(code, int) else 1, status=fields)
        self.run_directory.record(fields)


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
