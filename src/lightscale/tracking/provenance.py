"""Provenance: which code, command, software, hardware and job produced a run, stored with the run.

A metric without its provenance cannot be reproduced or trusted: was it the committed code or a local edit,
which torch, which GPU, which SLURM job (and how often was it requeued)? This callback records all of it once
per run, on rank 0, into ``<run_dir>/provenance.json`` and into every logger's hyper-parameters under the
``provenance`` key (so in W&B it is part of the run config: filterable, e.g. ``provenance.git.commit``).
Uncommitted changes are saved as a patch, ``<run_dir>/git.diff``, that ``git apply`` restores.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightscale.cluster.slurm import job_info
from lightscale.core.hardware import cpu_name

PACKAGES = ("lightscale", "torch", "lightning", "torchmetrics", "torchdata", "jsonargparse", "wandb", "numpy")
_GIT_TIMEOUT_S = 10


def _git(cwd: str | Path, *args: str, strip: bool = True) -> str:
    # GIT_OPTIONAL_LOCKS=0: `git status` must not take the index lock while another run or the user's git works.
    out = subprocess.run(
        ["git", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=_GIT_TIMEOUT_S,
        check=True,
        env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
    ).stdout
    return out.strip() if strip else out


def _without_credentials(url: str) -> str:
    """``https://user:token@host/x`` -> ``https://host/x``: a remote URL may embed a token."""
    return re.sub(r"^(\w+://)[^/@]+@", r"\1", url)


def git_info(where: str | Path) -> tuple[dict[str, Any] | None, str]:
    """``(info, diff)`` for the git work tree containing ``where``, or ``(None, "")`` outside one.

    ``info`` has ``root``, ``commit`` (``None`` before the first commit), ``branch`` (``None`` when detached),
    ``dirty`` (tracked files differ from HEAD) and ``remote``; ``diff`` is ``git diff HEAD`` when dirty.
    """
    try:
        root = _git(where, "rev-parse", "--show-toplevel")
    except (OSError, subprocess.SubprocessError):
        return None, ""  # not a repository, git missing, or a repository git refuses (foreign owner)
    info: dict[str, Any] = {"root": root, "commit": None, "branch": None, "dirty": False, "remote": None}
    with contextlib.suppress(subprocess.SubprocessError):  # fails before the first commit
        info["commit"] = _git(root, "rev-parse", "HEAD")
    try:
        branch = _git(root, "rev-parse", "--abbrev-ref", "HEAD")
        info["branch"] = None if branch == "HEAD" else branch
    except subprocess.SubprocessError:
        pass
    with contextlib.suppress(subprocess.SubprocessError):  # no remote
        info["remote"] = _without_credentials(_git(root, "config", "--get", "remote.origin.url"))
    diff = ""
    try:
        info["dirty"] = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
        if info["dirty"] and info["commit"]:
            diff = _git(root, "diff", "HEAD", "--binary", strip=False)
    except subprocess.SubprocessError:
        pass
    return info, diff


def package_versions() -> dict[str, str | None]:
    """Python, the main libraries, and the CUDA / cuDNN / NCCL that torch was built with."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["torch"] = torch.__version__
    versions["cuda"] = torch.version.cuda
    versions["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    versions["nccl"] = None
    if torch.cuda.is_available() and hasattr(torch.cuda, "nccl"):
        with contextlib.suppress(Exception):
            versions["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return versions


def hardware_info(trainer: L.Trainer | None = None) -> dict[str, Any]:
    """Host, CPU and GPU names (this node), and how the Trainer uses them."""
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpus": [],
    }
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            info["gpus"].append({"name": props.name, "memory_gb": round(props.total_memory / 1e9, 1)})
    if trainer is not None:
        info.update(
            accelerator=type(trainer.accelerator).__name__,
            strategy=type(trainer.strategy).__name__,
            precision=str(trainer.precision),
            devices=trainer.num_devices,
            num_nodes=trainer.num_nodes,
            world_size=trainer.world_size,
        )
    return info


def parameter_counts(module: torch.nn.Module) -> dict[str, int]:
    """Total, trainable and frozen parameter counts (global sizes, also for sharded parameters)."""
    total = trainable = 0
    for param in module.parameters():
        n = param.numel()
        total += n
        trainable += n if param.requires_grad else 0
    return {"total": total, "trainable": trainable, "non_trainable": total - trainable}


def _unique_path(run_dir: Path, stem: str, suffix: str) -> Path:
    """``stem.suffix``, or ``stem.<time>.suffix`` when a resumed run already wrote the first one."""
    path = run_dir / f"{stem}{suffix}"
    return path if not path.exists() else run_dir / f"{stem}.{time.strftime('%Y%m%d-%H%M%S')}{suffix}"


class Provenance(Callback):
    """Records and logs the run's provenance once, when the first fit/validate/test/predict starts (by then
    ``configure_model`` has built the parameters and the devices are known).

    Args:
        argv: the command-line arguments of the run (without the program name); default ``sys.argv[1:]``.
            The CLI passes what it parsed, which differs from ``sys.argv`` when it is called in-process.
        program: the command name shown in ``provenance.command``.
    """

    def __init__(self, argv: Sequence[str] | None = None, program: str = "lightscale") -> None:
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.program = program
        self.info: dict[str, Any] | None = None

    def collect(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[dict[str, Any], str]:
        """``(provenance, git diff)``: git state of the working directory's repository (else the repository
        lightscale itself was installed from), command, versions, hardware, parameters and SLURM job."""
        repo, diff = git_info(Path.cwd())
        if repo is None:
            repo, diff = git_info(Path(__file__).resolve().parent)
        info: dict[str, Any] = {
            "git": repo,
            "command": shlex.join([self.program, *self.argv]),
            "cwd": str(Path.cwd()),
            "python_executable": sys.executable,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": package_versions(),
            "hardware": hardware_info(trainer),
            "parameters": parameter_counts(pl_module),
            "model_class": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
            "slurm": job_info(),
        }
        return info, diff

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.info is not None or not trainer.is_global_zero:
            return
        info, diff = self.collect(trainer, pl_module)
        run_dir = Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if diff and info["git"] is not None:
            diff_path = _unique_path(run_dir, "git", ".diff")
            diff_path.write_text(diff)
            info["git"]["diff_file"] = diff_path.name
        _unique_path(run_dir, "provenance", ".json").write_text(json.dumps(info, indent=2) + "\n")
        self.info = info
        for logger in trainer.loggers:
            logger.log_hyperparams({"provenance": info})

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, pl_module)
