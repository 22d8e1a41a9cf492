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

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only

from lightscale.checkpoint_io import CheckpointError, remove_stale_temporaries, safe_load

RESUME_MODES = ("auto", "last")
SHARDED_META = "meta.pt"  # Lightning's metadata file inside a distributed (sharded) checkpoint folder


@rank_zero_only
def report(message: str) -> None:
    """One line on stderr (a Python warning would add a second line with the source)."""
    print(message, file=sys.stderr, flush=True)


@dataclass
class Candidate:
    path: Path
    mtime: float


def find_candidates(run_dir: Path) -> list[Candidate]:
    """Checkpoint files and sharded checkpoint folders of a run, newest first."""
    paths: list[Path] = []
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir():
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


def load_resumable(path: Path) -> dict[str, Any]:
    """Load the parts of a checkpoint needed to judge it (tensors memory-mapped, not read) and check that it can
    resume training: it must hold the model's ``state_dict`` and the loops' progress."""
    if path.is_dir():  # sharded (torch.distributed.checkpoint) folder: judge Lightning's metadata file
        meta = safe_load(path / SHARDED_META)
        if not (path / ".metadata").is_file():
            raise CheckpointError(f"sharded checkpoint {path} has no .metadata file (an interrupted save)")
        if "loops" not in meta:
            raise CheckpointError(f"checkpoint {path} holds no training progress (loops)")
        return meta
    checkpoint = safe_load(path, mmap=True)
    missing = [key for key in ("state_dict", "loops") if key not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {path} cannot resume training: it has no {' or '.join(missing)}")
    return checkpoint


def resolve_resume_path(run_dir: str | Path, mode: str = "auto") -> Path | None:
    """The newest valid checkpoint of ``run_dir`` (see module docstring), or ``None`` for a fresh start."""
    run_dir = Path(run_dir)
    removed = remove_stale_temporaries(run_dir / "checkpoints")
    if removed:
        report(f"lightscale: removed {len(removed)} partial checkpoint file(s) left by an interrupted save")
    for candidate in find_candidates(run_dir):
        try:
            load_resumable(candidate.path)
        except CheckpointError as error:
            report(f"lightscale: warning: skipping {error}")
            continue
        report(f"lightscale: resuming from {candidate.path}")
        return candidate.path
    message = f"no valid checkpoint in {run_dir}; starting from scratch"
    if mode == "auto":
        report(f"lightscale: {message}")
    else:
        report(f"lightscale: warning: --ckpt_path last: {message}")
    return None


def _describe(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def check_compatible(model: torch.nn.Module, checkpoint: dict[str, Any], path: str | Path) -> None:
    """Raise one line naming what differs when ``checkpoint`` was written by another model or architecture.

    Compares the class recorded in the checkpoint's hyper-parameters and the names and shapes of the weights;
    models that build layers lazily (``configure_model``) or load non-strictly are only checked by class.
    """
    hparams = checkpoint.get("hyper_parameters") or {}
    ckpt_class = hparams.get("_class_path")
    model_class = f"{type(model).__module__}.{type(model).__qualname__}"
    if ckpt_class and ckpt_class.rsplit(".", 1)[-1] != type(model).__qualname__:
        raise CheckpointError(
            f"checkpoint {path} was written by {ckpt_class}, but the config trains {model_class}; pass the same "
            "--model as the run that wrote it, or start a new run without --ckpt_path"
        )
    expected = model.state_dict()
    saved = checkpoint.get("state_dict")
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
