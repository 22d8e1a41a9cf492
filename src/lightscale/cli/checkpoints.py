"""Which checkpoint a command loads, opened safely before Lightning touches it, and the Trainer's checkpoint IO.

- ``--ckpt_path auto|last|hpc`` resolve to the newest valid checkpoint of the run directory (or a fresh start for
  ``fit``) before the Trainer runs (:mod:`lightscale.resilience.resume`); a restarted SLURM job without
  ``--ckpt_path`` resolves as ``auto`` instead of Lightning's unopened ``hpc_ckpt_N.ckpt``.
- An explicit path is opened safely right after parsing: a missing, damaged, malicious or foreign file (another
  model class, a bare state_dict, a pipe) is one line, and its hyper-parameters fill in the config as LightningCLI
  would, without a second, unrestricted ``torch.load``.
- ``--weights_only false`` means the same on every path: the user vouches for the file; it is loaded with full
  pickle, which runs whatever it holds.
- :class:`~lightscale.resilience.checkpoint_io.SafeCheckpointIO` on the Trainer's strategy.
"""

import contextlib
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

from lightscale.resilience.checkpoint_io import CheckpointError, SafeCheckpointIO, open_checkpoint
from lightscale.resilience.resume import (
    RESUME_MODES,
    check_compatible,
    check_lightning_checkpoint,
    check_model_class,
    differing_hparams,
    has_hpc_checkpoint,
    report,
    resolve_resume_path,
)

LIGHTNING_KEYWORDS = ("best", "registry")  # ckpt_path values that Lightning resolves itself


def trusted(config: Any) -> bool:
    """``--weights_only false``: load with full pickle on every path (documented as running any code inside)."""
    return config.get("weights_only") is False


def is_checkpoint_path(ckpt_path: Any) -> bool:
    return isinstance(ckpt_path, (str, Path)) and str(ckpt_path) not in (*LIGHTNING_KEYWORDS, *RESUME_MODES)


def resumes(subcommand: str, config: Any, run_dir: Path) -> bool:
    """Whether this ``fit`` continues the run in ``run_dir`` (a checkpoint given, or a restarted SLURM job that
    left ``hpc_ckpt_N.ckpt`` behind: Lightning's own convention)."""
    if subcommand != "fit":
        return False
    return bool(config.get("ckpt_path")) or (SLURMEnvironment.detect() and has_hpc_checkpoint(run_dir))


def model_settings_from_checkpoint(config: Any, subcommand: str) -> dict[str, Any] | None:
    """Open an explicit ``--ckpt_path`` safely (see module docstring) and return the model config it implies
    (``{"class_path": ..., "dict_kwargs": ...}``), to be merged into the parsed config; ``None`` for none."""
    ckpt_path = config.get("ckpt_path")
    if not is_checkpoint_path(ckpt_path):
        return None
    if not Path(str(ckpt_path)).exists():
        raise CheckpointError(f"checkpoint {ckpt_path} (--ckpt_path) does not exist; --ckpt_path auto resumes a run")
    if trusted(config):
        report(f"lightscale: warning: --weights_only false: loading {ckpt_path} with full pickle (it can run code)")
    checkpoint = open_checkpoint(ckpt_path, trusted=trusted(config))
    check_lightning_checkpoint(checkpoint, ckpt_path, resume=subcommand == "fit")
    check_model_class(checkpoint, config.model.class_path, ckpt_path)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    if not hparams:
        return None
    if "_class_path" in hparams:
        return {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
    return hparams


def resolve_checkpoint(subcommand: str, config: Any, run_dir: Path, model: Any) -> None:
    """Set ``config.ckpt_path`` to the checkpoint this command loads (see module docstring), checked against the
    configured model; differing settings are reported in one line."""
    ckpt_path = config.get("ckpt_path")
    if ckpt_path is None and subcommand == "fit" and SLURMEnvironment.detect() and has_hpc_checkpoint(run_dir):
        ckpt_path = "auto"
    if ckpt_path in RESUME_MODES:
        resolved = resolve_resume_path(run_dir, ckpt_path, trusted=trusted(config))
        if resolved is None and subcommand != "fit":
            raise CheckpointError(f"--ckpt_path {ckpt_path}: no valid checkpoint in {run_dir} to {subcommand}")
        config.ckpt_path = ckpt_path = str(resolved) if resolved else None
    if not is_checkpoint_path(ckpt_path):
        return
    checkpoint = open_checkpoint(ckpt_path, trusted=trusted(config))
    if Path(str(ckpt_path)).is_file():
        check_compatible(model, checkpoint, ckpt_path)
    changed = differing_hparams(checkpoint, model)
    if changed and subcommand == "fit":
        report(f"lightscale: warning: the model settings differ from the checkpoint's: {'; '.join(changed)}")


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
