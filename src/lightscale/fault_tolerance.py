"""The CLI's fault-tolerance layer, as a LightningCLI mixin: exact resume, safe checkpoints, pre-flight checks.

``class LightscaleCLI(FaultTolerance, LightningCLI)`` gets:

- ``--ckpt_path auto`` (newest valid checkpoint of the run directory, or a fresh start) and ``--ckpt_path last``
  (the same, warning when there is none), resolved before the Trainer runs (:mod:`lightscale.resume`);
  an explicit checkpoint path is opened safely first (a malicious or truncated file is one line, exit 2);
  a checkpoint of another model or architecture is refused with the mismatching keys and shapes.
- :class:`~lightscale.checkpoint_io.SafeCheckpointIO` (atomic, fsync'd writes; weights-only loads) on the
  Trainer's strategy, unless the config chose a ``CheckpointIO`` plugin itself.
- Callbacks in every run: :class:`~lightscale.callbacks.exact_resume.ExactResume` (generator states and the
  data position, exactly restored) and :class:`~lightscale.callbacks.batch_check.FirstBatchCheck` (wrong
  dtypes/shapes from the data in one line); the ``nonfinite`` group
  (:class:`~lightscale.callbacks.nonfinite.NonFiniteGuard`).
- The checks of :mod:`lightscale.checks`: devices, precision and secrets right after parsing; the run
  directory (writable, ``run.min_free_gb`` free) before any class is instantiated.

The subclass must call ``super().add_arguments_to_parser(parser)`` at the end of its own (after the
``checkpoint`` group exists) and ``super()`` in any ``before_<subcommand>`` / ``instantiate_classes`` it adds.
"""

import contextlib
from pathlib import Path
from typing import Any

from jsonargparse.typing import NonNegativeFloat
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

from lightscale.callbacks.batch_check import FirstBatchCheck
from lightscale.callbacks.exact_resume import ExactResume
from lightscale.callbacks.nonfinite import NonFiniteGuard
from lightscale.checkpoint_io import CheckpointError, SafeCheckpointIO, open_checkpoint
from lightscale.checks import check_config
from lightscale.resume import (
    RESUME_MODES,
    check_compatible,
    check_lightning_checkpoint,
    check_model_class,
    differing_hparams,
    has_hpc_checkpoint,
    report,
    resolve_resume_path,
)

# ckpt_path values that Lightning resolves itself (not files); "hpc" is resolved here, like auto and last
_LIGHTNING_KEYWORDS = ("best", "registry")
LAST_EVERY_MINUTES_DEFAULT = 10.0


def install_checkpoint_io(trainer: Any) -> None:
    """Give the Trainer's strategy :class:`SafeCheckpointIO`, unless another ``CheckpointIO`` was configured.

    Strategies that write sharded checkpoints themselves (``ModelParallelStrategy`` / FSDP with
    ``save_distributed_checkpoint=True``, DeepSpeed) bypass any ``CheckpointIO`` for those files.
    """
    strategy = trainer.strategy
    current = getattr(strategy, "_checkpoint_io", None)
    if current is None or type(current) is TorchCheckpointIO:
        with contextlib.suppress(TypeError):  # XLA strategies accept only their own CheckpointIO
            strategy.checkpoint_io = SafeCheckpointIO()
    elif isinstance(current, _WrappingCheckpointIO) and type(current.checkpoint_io) in (type(None), TorchCheckpointIO):
        current.checkpoint_io = SafeCheckpointIO()  # e.g. AsyncCheckpointIO around the default


def _apply_hyperparameters(cli: Any, subcommand: str, checkpoint: dict[str, Any]) -> None:
    """What LightningCLI does with an explicit ``--ckpt_path`` file: the checkpoint's model hyper-parameters fill
    in the config (so validate/test/predict need not restate the architecture). Here from the checkpoint already
    opened safely, instead of Lightning's second, full ``torch.load`` of the file."""
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    if not hparams:
        return
    if "_class_path" in hparams:
        hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
    cli.config = cli.parser.parse_object({subcommand: {"model": hparams}}, cli.config)


def _trusted(config: Any) -> bool:
    """``--weights_only false``: the user vouches for the checkpoint; it is loaded with full pickle on every path
    (explicit, auto, last, hpc), which runs whatever code it holds."""
    return config.get("weights_only") is False


def _is_checkpoint_file(ckpt_path: Any) -> bool:
    return isinstance(ckpt_path, (str, Path)) and str(ckpt_path) not in (*_LIGHTNING_KEYWORDS, *RESUME_MODES)


class FaultTolerance:
    """LightningCLI mixin; see the module docstring."""

    run_dir: Path

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        defaults = dict(kwargs.get("trainer_defaults") or {})
        defaults["callbacks"] = [*defaults.get("callbacks", []), ExactResume(), FirstBatchCheck()]
        kwargs["trainer_defaults"] = defaults
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--run.min_free_gb",
            type=NonNegativeFloat,
            default=1.0,
            help="Refuse to start when the run directory's disk has less free space than this (GB).",
        )
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        with contextlib.suppress(KeyError):  # no checkpoint group (yet): keep the class default
            parser.set_defaults({"checkpoint.last_every_minutes": LAST_EVERY_MINUTES_DEFAULT})

    # ------------------------------------------------------------------ right after parsing
    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Check devices, precision and secrets as soon as the config is known (before seeding and building)."""
        super().parse_arguments(parser, args)  # type: ignore[misc]
        subcommand = self.config.get("subcommand")  # type: ignore[attr-defined]
        if subcommand:
            check_config(self.config[subcommand])  # type: ignore[attr-defined]

    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's reading of an explicit ``--ckpt_path`` right after parsing (a bare ``torch.load``
        whose hyper-parameters then fill in the config): the file is opened safely, and a missing, damaged,
        malicious or foreign one (another model class, a bare state_dict, a pipe) is one line, not a traceback
        or a silently replaced config."""
        subcommand = self.config.get("subcommand")  # type: ignore[attr-defined]
        if not subcommand:
            return
        config = self.config[subcommand]  # type: ignore[attr-defined]
        ckpt_path, trusted = config.get("ckpt_path"), _trusted(config)
        if _is_checkpoint_file(ckpt_path):
            if not Path(str(ckpt_path)).exists():
                raise CheckpointError(
                    f"checkpoint {ckpt_path} (--ckpt_path) does not exist; --ckpt_path auto resumes a run"
                )
            if trusted:
                report(
                    f"lightscale: warning: --weights_only false: loading {ckpt_path} with full pickle (it can run code)"
                )
            checkpoint = open_checkpoint(ckpt_path, trusted=trusted)
            check_lightning_checkpoint(checkpoint, ckpt_path, resume=subcommand == "fit")
            check_model_class(checkpoint, config.model.class_path, ckpt_path)
            _apply_hyperparameters(self, subcommand, checkpoint)

    # ------------------------------------------------------------------ pre-flight, then the Trainer's IO plugin
    def instantiate_classes(self) -> None:
        super().instantiate_classes()  # type: ignore[misc]
        install_checkpoint_io(self.trainer)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ which checkpoint, and does it fit
    def _prepare_checkpoint(self, subcommand: str) -> None:
        config = self.config_init[subcommand]  # type: ignore[attr-defined]
        ckpt_path, trusted = config.get("ckpt_path"), _trusted(config)
        if ckpt_path is None and subcommand == "fit" and SLURMEnvironment.detect() and has_hpc_checkpoint(self.run_dir):
            # Lightning would resume from the highest hpc_ckpt_N.ckpt without opening it; choose as `auto` does
            ckpt_path = "auto"
        if ckpt_path in RESUME_MODES:
            resolved = resolve_resume_path(self.run_dir, ckpt_path, trusted=trusted)
            if resolved is None and subcommand != "fit":
                raise CheckpointError(f"--ckpt_path {ckpt_path}: no valid checkpoint in {self.run_dir} to {subcommand}")
            config.ckpt_path = ckpt_path = str(resolved) if resolved else None
        if _is_checkpoint_file(ckpt_path):
            checkpoint = open_checkpoint(ckpt_path, trusted=trusted)
            if Path(str(ckpt_path)).is_file():
                check_compatible(self.model, checkpoint, ckpt_path)  # type: ignore[attr-defined]
            changed = differing_hparams(checkpoint, self.model)  # type: ignore[attr-defined]
            if changed and subcommand == "fit":
                report(f"lightscale: warning: the model settings differ from the checkpoint's: {'; '.join(changed)}")

    def before_fit(self) -> None:
        self._prepare_checkpoint("fit")

    def before_validate(self) -> None:
        self._prepare_checkpoint("validate")

    def before_test(self) -> None:
        self._prepare_checkpoint("test")

    def before_predict(self) -> None:
        self._prepare_checkpoint("predict")
