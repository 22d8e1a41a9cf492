"""Which checkpoint a run resumes from (``--ckpt_path auto|last``), and whether it fits the configured model.

Lightning resolves ``ckpt_path="last"`` to the newest ``last*.ckpt`` of its checkpoint callbacks without
opening it, and ``"hpc"`` (also chosen by itself under SLURM when ``ckpt_path`` is ``None``) to the
highest-numbered ``hpc_ckpt_N.ckpt``, erroring when there is none. Neither survives a truncated file or
handles a first run. Here both ``auto`` and ``last`` mean: the newest checkpoint of *this run directory*
(``last.ckpt``, step and best checkpoints, ``hpc_ckpt_*.ckpt``, sharded checkpoint folders) that loads
safely and holds a resumable state; damaged ones are reported in one line each and skipped; ``None`` (a fresh
start) when there is none. Because the result is an explicit path, Lightning's own SLURM lookup is not used;
and a requeued SLURM job started without ``--ckpt_path`` (where Lightning would pick ``hpc_ckpt_N.ckpt`` by
its number alone) is resolved the same way, so both ways of requeueing end up at the same checkpoint.
"""

import copy
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from lightscale.core.errors import UserError
from lightscale.core.files import remove_stale_temporaries
from lightscale.resilience.checkpoint_io import SHARDED_META, CheckpointError, open_checkpoint
from lightscale.resilience.sharded_checkpoint import recover_interrupted_swaps

RESUME_MODES = ("auto", "last", "hpc")
INVALID_PREFIX = "invalid-"  # a damaged hpc_ckpt_N.ckpt is renamed so that Lightning's own SLURM lookup skips it


@rank_zero_only
def report(message: str) -> None:
    """One line on stderr (a Python warning would add a second line with the source)."""
    print(message, file=sys.stderr, flush=True)


@dataclass
class Candidate:
    path: Path
    mtime: float


def find_candidates(run_dir: Path, only_hpc: bool = False) -> list[Candidate]:
    """Checkpoint files and sharded checkpoint folders of a run, newest first."""
    paths: list[Path] = []
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and not only_hpc:
        paths += [p for p in checkpoints.iterdir() if p.suffix == ".ckpt" and not p.name.startswith(".")]
    if run_dir.is_dir():
        paths += [p for p in run_dir.glob("hpc_ckpt_*.ckpt")]
    candidates = []
    for path in paths:
        try:
            stat = (path / SHARDED_META if path.is_dir() else path).stat()  # follows save_last="link" symlinks
        except OSError:
            continue  # a dangling link, or a folder without metadata: not a checkpoint
        candidates.append(Candidate(path, stat.st_mtime))
    # newest first; among equal times prefer last.ckpt, then hpc checkpoints (written by a requeue signal)
    return sorted(candidates, key=lambda c: (c.mtime, c.path.name.startswith("last"), "hpc" in c.path.name))[::-1]


def has_hpc_checkpoint(run_dir: str | Path) -> bool:
    """Whether Lightning's SLURM logic would resume from ``run_dir`` by itself (``hpc_ckpt_N.ckpt`` there)."""
    return any(Path(run_dir).glob("hpc_ckpt_*.ckpt"))


def load_resumable(path: Path, trusted: bool = False) -> dict[str, Any]:
    """Open the parts of a checkpoint needed to judge it (tensors memory-mapped, not read; nothing of it run, see
    :func:`~lightscale.resilience.checkpoint_io.open_checkpoint`) and check that it can resume training: the model's
    ``state_dict`` (a sharded folder keeps it in its shards) and the loops' progress."""
    checkpoint = open_checkpoint(path, trusted=trusted)
    missing = [
        key for key in ("state_dict", "loops") if key not in checkpoint and not (key == "state_dict" and path.is_dir())
    ]
    if missing:
        raise CheckpointError(f"checkpoint {path} cannot resume training: it has no {' or '.join(missing)}")
    return checkpoint


def quarantine(path: Path) -> Path | None:
    """Rename a damaged ``hpc_ckpt_N.ckpt`` to ``invalid-hpc-ckpt-N.ckpt`` (kept for inspection): Lightning resumes a
    restarted SLURM job from the highest-numbered ``hpc_ckpt_*`` without opening it first."""
    if not path.name.startswith("hpc_ckpt_"):
        return None
    # Lightning matches any file name that *contains* "hpc_ckpt_": the new name must not
    target = path.with_name(INVALID_PREFIX + path.name.replace("hpc_ckpt_", "hpc-ckpt-"))
    try:
        path.rename(target)
    except OSError:
        return None
    return target


def resolve_resume_path(run_dir: str | Path, mode: str = "auto", trusted: bool = False) -> Path | None:
    """The newest valid checkpoint of ``run_dir`` (see module docstring; ``hpc``: among ``hpc_ckpt_*`` only),
    or ``None`` for a fresh start. Damaged ``hpc_ckpt_*`` files are renamed aside (:func:`quarantine`)."""
    run_dir = Path(run_dir)
    for restored in [*recover_interrupted_swaps(run_dir / "checkpoints"), *recover_interrupted_swaps(run_dir)]:
        report(f"lightscale: put back {restored.name}, which a kill left aside while replacing it")
    removed = remove_stale_temporaries(run_dir / "checkpoints")
    if removed:
        report(f"lightscale: removed {len(removed)} partial checkpoint file(s) left by an interrupted save")
    for candidate in find_candidates(run_dir, only_hpc=mode == "hpc"):
        try:
            load_resumable(candidate.path, trusted=trusted)
        except CheckpointError as error:
            moved = quarantine(candidate.path)
            report(f"lightscale: warning: skipping {error}" + (f" (renamed to {moved.name})" if moved else ""))
            continue
        report(f"lightscale: resuming from {candidate.path}")
        return candidate.path
    message = f"no valid checkpoint in {run_dir}; starting from scratch"
    if mode == "auto":
        report(f"lightscale: {message}")
    else:
        report(f"lightscale: warning: --ckpt_path {mode}: {message}")
    return None


def check_lightning_checkpoint(checkpoint: dict[str, Any], path: str | Path, resume: bool) -> None:
    """A file given as ``--ckpt_path`` must be a Lightning checkpoint (and, to resume ``fit``, hold the loops)."""
    if Path(str(path)).is_dir():
        return
    if "state_dict" not in checkpoint:
        if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
            raise CheckpointError(
                f"{path} is a bare state_dict (weights only), not a Lightning checkpoint: load it into your model "
                "(model.load_state_dict) or pass a checkpoint that Lightning wrote"
            )
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it has no state_dict)")
    if resume and "loops" not in checkpoint:
        raise CheckpointError(
            f"checkpoint {path} cannot resume training: it has no loops (it was saved with weights only); "
            "use it with validate/test/predict, or start a new fit"
        )


def check_model_class(checkpoint: dict[str, Any], class_path: str, path: str | Path) -> None:
    """Refuse a checkpoint written by another LightningModule class than the config trains."""
    ckpt_class = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    if ckpt_class and ckpt_class.rsplit(".", 1)[-1] != str(class_path).rsplit(".", 1)[-1]:
        raise CheckpointError(
            f"checkpoint {path} was written by {ckpt_class}, but the config trains {class_path}; pass the same "
            "--model as the run that wrote it, or start a new run without --ckpt_path"
        )


def _describe(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def _uncompiled(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Keys without the ``_orig_mod.`` that ``torch.compile(module)`` puts into the names of a wrapped module."""
    return {key.replace("_orig_mod.", ""): value for key, value in state_dict.items()}


def check_compatible(model: torch.nn.Module, checkpoint: dict[str, Any], path: str | Path) -> None:
    """Raise one line naming what differs when ``checkpoint`` was written by another model or architecture.

    Compares the class recorded in the checkpoint's hyper-parameters and the names and shapes of the weights;
    models that build layers lazily (``configure_model``) or load non-strictly are only checked by class.
    """
    model_class = f"{type(model).__module__}.{type(model).__qualname__}"
    check_model_class(checkpoint, model_class, path)
    expected = _uncompiled(model.state_dict())
    saved = checkpoint.get("state_dict")
    saved = _uncompiled(saved) if isinstance(saved, dict) else saved
    if not expected or not isinstance(saved, dict) or not getattr(model, "strict_loading", True):
        return
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    mismatched = [
        f"{key} {tuple(saved[key].shape)} vs {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(saved))
        if hasattr(saved[key], "shape") and hasattr(expected[key], "shape") and saved[key].shape != expected[key].shape
    ]
    problems = []
    if mismatched:
        problems.append(f"shapes differ (checkpoint vs model): {_describe(mismatched)}")
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not fit {model_class} (a different architecture): {'; '.join(problems)}. "
            "Use the model settings of the run that wrote it, or start a new run without --ckpt_path"
        )


def differing_hparams(checkpoint: dict[str, Any], model: torch.nn.Module, limit: int = 4) -> list[str]:
    """``name checkpoint -> config`` for each hyper-parameter the configured model sets differently."""
    saved = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    current = dict(getattr(model, "hparams", {}) or {})
    changed = [
        f"{key} {saved[key]!r} -> {current[key]!r}" for key in saved if key in current and saved[key] != current[key]
    ]
    return changed[:limit] + ([f"(+{len(changed) - limit} more)"] if len(changed) > limit else [])


class ResumeCheck(L.Callback):
    """Refuses, in one line and before the first step, a resume whose checkpoint does not fit the run's optimizer
    or LR schedule (Lightning would fail deep inside the restore with e.g. ``KeyError: 'lr_lambdas'`` when a
    config switched from OneCycle to cosine), or whose fixed-length schedule is shorter than the run now asks for.
    """

    def __init__(self) -> None:
        self._checkpoint: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._checkpoint = None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # the checkpoint the fit resumes from, not the hidden temporary one a tuner (BatchSizeFinder, LRFinder)
        # writes and restores around its trials
        if trainer.ckpt_path is not None and not Path(str(trainer.ckpt_path)).name.startswith("."):
            self._checkpoint = checkpoint

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Between creating the optimizers and loading their saved states (strategies that restore after setup,
        e.g. ``ModelParallelStrategy``, load the checkpoint later: only its schedule length is checked)."""
        self._check_states(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._checkpoint is not None:
            check_schedule_length(trainer)
        self._checkpoint = None

    def _check_states(self, trainer: L.Trainer) -> None:
        checkpoint = self._checkpoint
        if checkpoint is None:
            return
        saved = checkpoint.get("lr_schedulers") or []
        configs = trainer.lr_scheduler_configs
        why = ""
        if len(saved) != len(configs):
            why = f"it holds {len(saved)} LR scheduler(s), this run has {len(configs)}"
        for config, state in zip(configs, saved, strict=False):
            try:
                copy.deepcopy(config.scheduler).load_state_dict(state)
            except Exception as error:
                why = f"its LR scheduler state does not fit this run's {type(config.scheduler).__name__} ({error!r})"
        optimizers = checkpoint.get("optimizer_states") or []
        for optimizer, state in zip(trainer.optimizers, optimizers, strict=False):
            groups = [len(group["params"]) for group in optimizer.param_groups]
            saved_groups = [len(group.get("params", [])) for group in state.get("param_groups", [])]
            if saved_groups and groups != saved_groups:
                why = f"its optimizer has parameter groups of sizes {saved_groups}, this run's {groups}"
        if why:
            changed = differing_hparams(checkpoint, trainer.lightning_module)
            hint = f" (settings that differ: {'; '.join(changed)})" if changed else ""
            raise UserError(
                f"cannot resume from this checkpoint: {why}{hint}; resume with the model settings of the run that "
                "wrote it, or start a new run"
            )


def check_schedule_length(trainer: L.Trainer) -> None:
    """Refuse to resume into a longer run than a fixed-length LR schedule was planned for.

    ``OneCycleLR`` keeps its length (``total_steps``) in the checkpoint, so a run resumed with a larger
    ``max_epochs`` / ``max_steps`` would fail with "Tried to step N times" when the old length is used up.
    Schedules computed from the run's length at start-up (warm-up + cosine) are re-planned over the new length
    from the current step instead, and pass."""
    needed_steps = trainer.estimated_stepping_batches
    for config in trainer.lr_scheduler_configs:
        planned = getattr(config.scheduler, "total_steps", None)
        needed = needed_steps if config.interval == "step" else trainer.max_epochs
        if isinstance(planned, int) and needed is not None and math.isfinite(needed) and needed > planned:
            unit = "optimizer steps" if config.interval == "step" else "epochs"
            raise UserError(
                f"the checkpoint's {type(config.scheduler).__name__} was planned for {planned} {unit} and cannot be "
                f"extended to the {int(needed)} this run asks for (trainer.max_epochs / max_steps): resume with the "
                "original length, or use a schedule that re-plans (e.g. cosine) for runs you extend"
            )
