"""Save and requeue a SLURM job at a step boundary when it is told to stop (time limit, preemption, USR1)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

TMP_NAME = ".requeue.ckpt.tmp"  # must not contain "hpc_ckpt_": Lightning and resume.py count those
REQUEUE_REASONS = ("TimeLimit", "Preempt")  # a SIGTERM for these requeues; for a plain scancel it does not


class JobRequeued(SystemExit):
    """Raised on every rank once the checkpoint is written and the job is back in the queue: the process ends
    (exit code 0) without the end-of-fit steps (test, report) that belong to the finished run."""


class SlurmRequeue(Callback):
    """SLURM auto-requeue that saves a consistent checkpoint and never interleaves collectives.

    Active in a SLURM job whose ``SLURMEnvironment`` has ``auto_requeue`` on (Lightning's default under
    ``srun``). On the requeue signal (``--signal=SIGUSR1@90`` in ``slurm/train.sbatch``, or
    ``scancel --signal=USR1``) or SIGTERM (time limit, preemption, ``scancel``):

    1. the handler only records the signal (it may run in the middle of a step or a collective);
    2. after the next optimizer step every rank learns, through one all-reduce, that some rank was signalled;
    3. every rank calls ``trainer.save_checkpoint`` into ``<run_dir>/hpc_ckpt_N.ckpt`` (written as a temporary
       and renamed, older ``hpc_ckpt_*`` removed), the state at a step boundary, so a resume repeats nothing;
    4. rank 0 runs ``scontrol requeue`` (for SIGTERM only when SLURM says the reason is the time limit or a
       preemption: a user's ``scancel`` is not undone) and every rank exits with :class:`JobRequeued`.

    The requeued job resumes from that file: ``--ckpt_path auto`` and Lightning's own ``ckpt_path=None``
    lookup both search this run directory only. Lightning's built-in handler is replaced because it saves
    inside the signal handler (mid-step; under DDP its barrier can meet another rank's gradient all-reduce).

    ``check_every_n_steps``: how often ranks agree on the flag (one tiny all-reduce and host sync each time;
    single-process jobs check every step for free). The signal comes ``@90`` seconds early; keep
    ``check_every_n_steps`` x step time well below that.
    """

    def __init__(self, check_every_n_steps: int = 1) -> None:
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.check_every_n_steps = check_every_n_steps
        self.signum: int | None = None
        self._active = False
        self._previous: dict[int, Any] = {}
        self._last_step = -1

    # ----------------------------------------------------------------------------------------- signals
    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None or signum == signal.SIGTERM:  # SIGTERM (the end) outranks a requeue signal
            self.signum = signum

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Install the handlers before Lightning's (a requeue signal then finds one and Lightning adds none)."""
        env = trainer._accelerator_connector.cluster_environment
        self._active = stage == "fit" and isinstance(env, SLURMEnvironment) and env.auto_requeue and os.name != "nt"
        if self._active:
            self._install(env.requeue_signal or signal.SIGUSR1, signal.SIGTERM)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning adds its SIGTERM handler (which broadcasts inside the handler) after ``setup``: replace it."""
        if self._active:
            self._install(signal.SIGTERM)

    def _install(self, *signums: int) -> None:
        for signum in signums:
            self._previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._handler)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    # ------------------------------------------------------------------------------- the step boundary
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active or trainer.global_step == self._last_step:  # accumulating: not a step boundary
            return
        self._last_step = trainer.global_step
        if trainer.world_size > 1 and trainer.global_step % self.check_every_n_steps:
            return
        signalled = trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False)
        if signalled:
            self._save_and_requeue(trainer)

    def _save_and_requeue(self, trainer: L.Trainer) -> None:
        strategy = trainer.strategy
        got_sigterm = strategy.reduce_boolean_decision(self.signum == signal.SIGTERM, all=False)
        root = Path(trainer.default_root_dir)
        final = Path(strategy.broadcast(trainer._checkpoint_connector.hpc_save_path(root), src=0))
        tmp = final.with_name(TMP_NAME)
        _say(trainer, f"signal {_name(self.signum)}: saving {final} at step {trainer.global_step}")
        trainer.save_checkpoint(tmp)  # collective: every rank, same step; ends with a barrier
        if trainer.is_global_zero:
            os.replace(tmp, final)
            for old in root.glob("hpc_ckpt_*.ckpt"):
                if old != final:
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
        strategy.barrier("SlurmRequeue.saved")
        requeued = False
        if trainer.is_global_zero:
            _close_wandb_runs(trainer)
            requeued = _requeue(sigterm=got_sigterm)
        requeued = strategy.broadcast(requeued, src=0)
        if requeued or got_sigterm:
            _say(trainer, "job requeued; exiting" if requeued else "SIGTERM: checkpoint saved; exiting")
            raise JobRequeued(0)
        self.signum = None  # USR1 without a possible requeue: keep training until the time limit


def _close_wandb_runs(trainer: L.Trainer) -> None:
    """Finish the W&B run, marked as preempted, before asking for the requeue: ``scontrol requeue`` ends every
    process of the job, wandb's service among them, and an offline run it had not flushed loses its records.
    A run that goes on (requeue refused) reopens the same W&B run (same id) at its next log call."""
    for logger in trainer.loggers:
        run = getattr(logger, "_experiment", None) if isinstance(logger, WandbLogger) else None
        if run is not None and hasattr(run, "finish"):
            run.mark_preempting()
            run.finish()
            logger._experiment = None


def _name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "?"


def _say(trainer: L.Trainer, message: str) -> None:
    if trainer.is_global_zero:
        print(f"lightscale: {message}", file=sys.stderr, flush=True)


def _slurm_job() -> str:
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{array_task}" if array_job and array_task else os.environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9_]+", job):
        raise RuntimeError(f"unexpected SLURM job id {job!r}")
    return job


def _job_reason(job: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    match = re.search(r"\bReason=(\S+)", out.stdout)
    return match.group(1) if match else ""


def _requeue(sigterm: bool) -> bool:
    """``scontrol requeue`` this job; after a SIGTERM only when SLURM is ending it for time or preemption."""
    job = _slurm_job()
    if sigterm:
        reason = _job_reason(job)
        if not reason.startswith(REQUEUE_REASONS):
            print(f"lightscale: SIGTERM with reason {reason or 'unknown'}: not requeueing", file=sys.stderr)
            return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        print(f"lightscale: could not requeue job {job}: {error}", file=sys.stderr)
        return False
    if result.returncode != 0:
        print(f"lightscale: scontrol requeue {job} failed: {result.stderr.strip()}", file=sys.stderr)
        return False
    return True
