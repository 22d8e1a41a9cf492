"""Stop a run cleanly when it is told to: save a resumable checkpoint at a step boundary, then exit (or requeue).

What asks a run to stop: ``docker stop``, Kubernetes and most schedulers send SIGTERM; Ctrl+C sends SIGINT; SLURM
sends its requeue signal (``--signal=SIGUSR1@90`` in ``slurm/train.sbatch``) before the time limit and SIGTERM at
it or on preemption. Lightning's own handling exits 0 on SIGTERM (as if the run had finished), writes nothing on
SIGINT and is killed outright by SIGUSR1 outside SLURM; under SLURM it saves inside the signal handler, in the
middle of a step or a collective.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from jsonargparse.typing import PositiveInt
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from lightscale.cluster.slurm import requeue
from lightscale.core.run_dir import mark_wandb_run_finished
from lightscale.resilience.async_save import wait_for_checkpoints

TMP_NAME = ".requeue.ckpt.tmp"  # must not contain "hpc_ckpt_": Lightning and resume.py count those
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class JobRequeued(SystemExit):
    """Raised on every rank once the checkpoint is written and the SLURM job is back in the queue: the process
    ends (exit code 0) without the end-of-fit steps (test, report) that belong to the finished run."""


class Terminated(SystemExit):
    """Raised on every rank once a stop signal's checkpoint is written; the exit code is ``128 + signal``, the
    shell's convention for a process ended by that signal (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.checkpoint = checkpoint

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class GracefulStop(Callback):
    """On SIGTERM, SIGINT or SIGUSR1 (and SLURM's requeue signal) during ``fit``:

    1. the handler only records the signal (it may run in the middle of a step or a collective); a second
       SIGINT interrupts at once, as Ctrl+C does without this callback;
    2. after the next optimizer step every rank learns, through one all-reduce, that some rank was signalled
       (a signal often reaches only one process, e.g. the launcher of a DDP run);
    3. every rank saves the state at that step boundary, so a resume repeats nothing: ``checkpoints/last.ckpt``,
       or in a SLURM job ``<run_dir>/hpc_ckpt_N.ckpt`` (written as a temporary file and renamed, older ones
       removed);
    4. in a SLURM job with auto-requeue, rank 0 runs ``scontrol requeue`` (after SIGTERM only when SLURM says the
       reason is the time limit or a preemption: a user's ``scancel`` is not undone) and every rank exits with
       :class:`JobRequeued` (code 0); otherwise every rank exits with :class:`Terminated` (code ``128 + signal``),
       and the CLI marks the run ``terminated`` in ``summary.json`` and in W&B.

    ``--ckpt_path auto`` resumes from that checkpoint bit for bit. ``check_every_n_steps``: how often ranks agree
    on the flag (one tiny all-reduce and host sync each time; single-process runs check every step for free).
    SLURM's signal comes ``@90`` seconds early; keep ``check_every_n_steps`` x step time well below that.
    """

    def __init__(self, check_every_n_steps: PositiveInt = 1) -> None:
        self.check_every_n_steps = check_every_n_steps
        self.signum: int | None = None
        self._active = False
        self._slurm = False
        self._requeue_signal = signal.SIGUSR1
        self._previous: dict[int, Any] = {}
        self._last_step = -1

    # ----------------------------------------------------------------------------------------- signals
    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl+C twice: stop now
        if self.signum is None or signum == signal.SIGTERM:  # SIGTERM (the end) outranks a requeue signal
            self.signum = signum

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Install the handlers before Lightning's (a requeue signal then finds one and Lightning adds none)."""
        self._active = stage == "fit" and os.name != "nt"
        env = trainer._accelerator_connector.cluster_environment
        self._slurm = isinstance(env, SLURMEnvironment) and env.auto_requeue
        if self._slurm and env.requeue_signal is not None:
            self._requeue_signal = env.requeue_signal
        if self._active:
            self.signum = None
            self._install(*STOP_SIGNALS, self._requeue_signal)

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
        if trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False):
            self._stop(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A signal that came after the last step (during the final validation): the run is complete and its last
        checkpoint written, but it was asked to stop, so it ends as terminated rather than going on to test."""
        signalled = self._active and trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False)
        self._restore()
        if signalled:
            self._stop(trainer)

    def _stop(self, trainer: L.Trainer) -> None:
        strategy = trainer.strategy
        signum = self._agreed_signal(trainer)
        if self._slurm:
            self._save_and_requeue(trainer, signum)  # raises, unless training goes on (no requeue possible)
            return
        path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        _say(trainer, f"{_name(signum)}: saving {path} at step {trainer.global_step}, then stopping")
        trainer.save_checkpoint(path)  # collective: every rank, same step
        wait_for_checkpoints(trainer)
        strategy.barrier("GracefulStop.saved")
        self._restore()
        raise Terminated(signum, path)

    def _agreed_signal(self, trainer: L.Trainer) -> int:
        """The signal every rank acts on: SIGTERM if any rank got it, else rank 0's (or SIGTERM if rank 0 got
        none but another rank did)."""
        strategy = trainer.strategy
        if strategy.reduce_boolean_decision(self.signum == signal.SIGTERM, all=False):
            return signal.SIGTERM
        return int(strategy.broadcast(self.signum or signal.SIGTERM, src=0))

    def _save_and_requeue(self, trainer: L.Trainer, signum: int) -> None:
        strategy = trainer.strategy
        root = Path(trainer.default_root_dir)
        final = Path(strategy.broadcast(trainer._checkpoint_connector.hpc_save_path(root), src=0))
        tmp = final.with_name(TMP_NAME)
        _say(trainer, f"signal {_name(signum)}: saving {final} at step {trainer.global_step}")
        trainer.save_checkpoint(tmp)  # collective: every rank, same step; ends with a barrier
        wait_for_checkpoints(trainer)
        if trainer.is_global_zero:
            os.replace(tmp, final)
            for old in root.glob("hpc_ckpt_*.ckpt"):
                if old != final:
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
        strategy.barrier("GracefulStop.saved")
        requeued = False
        if trainer.is_global_zero and signum in (signal.SIGTERM, self._requeue_signal):
            _close_wandb_runs(trainer)
            requeued = requeue(sigterm=signum == signal.SIGTERM)
        requeued = strategy.broadcast(requeued, src=0)
        if requeued:
            _say(trainer, "job requeued; exiting")
            self._restore()
            raise JobRequeued(0)
        if signum == self._requeue_signal and signum != signal.SIGTERM:
            self.signum = None  # a requeue signal without a possible requeue: keep training until the time limit
            return
        self._restore()
        raise Terminated(signum, final)


def _close_wandb_runs(trainer: L.Trainer) -> None:
    """Finish the W&B run, marked as preempted, before asking for the requeue: ``scontrol requeue`` ends every
    process of the job, wandb's service among them, and an offline run it had not flushed loses its records.
    A run that goes on (requeue refused) reopens the same W&B run (same id) at its next log call."""
    for logger in trainer.loggers:
        run = getattr(logger, "_experiment", None) if isinstance(logger, WandbLogger) else None
        if run is not None and hasattr(run, "finish"):
            run.mark_preempting()
            folder = run.dir
            run.finish()
            mark_wandb_run_finished(folder)
            logger._experiment = None


def _name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "?"


def _say(trainer: L.Trainer, message: str) -> None:
    if trainer.is_global_zero:
        print(f"lightscale: {message}", file=sys.stderr, flush=True)
