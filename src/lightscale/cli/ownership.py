"""The life of a run directory as one command sees it: claimed at start, released at the end, and left saying
what happened when the command fails or is stopped."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from lightscale.core.errors import UserError, one_line
from lightscale.core.run_dir import RUN_DIR_ENV, RunLock, has_checkpoints, has_run_artifacts, update_summary
from lightscale.resilience.graceful_stop import JobRequeued, Terminated


class RunDirectory:
    """One command's hold on its run directory.

    :meth:`claim` (the run's first process only) locks it, creating it, and refuses one that holds another run
    unless this command resumes it; :meth:`export` tells the processes Lightning launches for DDP where it is;
    :meth:`release` unlocks it and puts the environment back; :meth:`outcome` records how a failed or stopped
    command ended.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.created = False
        self._created_root: Path | None = None  # the outermost folder the claim created (runs/, runs/<name>/)
        self._lock: RunLock | None = None
        self._previous_env = os.environ.get(RUN_DIR_ENV)

    def claim(self, resume: bool) -> None:
        created = not self.path.exists()
        self._created_root = next((p for p in reversed(self.path.absolute().parents) if not p.exists()), self.path)
        lock = RunLock(self.path)
        try:
            lock.acquire()
            if not created and has_run_artifacts(self.path) and not resume:
                raise UserError(
                    f"run.dir {self.path} already holds a run; pass --ckpt_path auto to resume it, "
                    "or leave run.dir unset for a new run"
                )
        except UserError:
            lock.release(remove=lock.created)
            if created:
                self.remove()
            raise
        self._lock, self.created = lock, created

    def export(self) -> None:
        """``LIGHTSCALE_RUN_DIR`` for the processes this one launches (DDP re-runs the same command line)."""
        os.environ[RUN_DIR_ENV] = str(self.path)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._previous_env is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = self._previous_env

    def remove(self) -> None:
        """Remove the directory this command created, and the parents it created for it if they are now empty."""
        shutil.rmtree(self.path, ignore_errors=True)
        parent = self.path.absolute().parent
        root = self._created_root
        while root is not None and root in (parent, *parent.parents) and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent

    def ending(self, error: BaseException, trained: bool) -> dict[str, Any] | None:
        """How a command that raised ``error`` ended, as ``summary.json`` fields (``None``: nothing to record):

        - ``terminated`` (a stop signal; with the signal and the checkpoint it saved) or ``requeued``;
        - ``failed`` with the error, when this command trained at least one step or created the run;
        - nothing for a resume that failed before its first step (the run stays as it was), or for a directory
          this command created that holds no checkpoint: :meth:`record` removes that one (bad input found after
          start-up leaves no stray run behind).
        """
        if isinstance(error, Terminated):
            return {"status": "terminated", "signal": error.signal_name, "checkpoint": str(error.checkpoint)}
        if isinstance(error, JobRequeued):
            return {"status": "requeued"}
        if isinstance(error, SystemExit) and not error.code:
            return None
        if (self.created and not has_checkpoints(self.path)) or (not trained and not self.created):
            return None
        return {"status": "failed", "error": f"{type(error).__name__}: {one_line(str(error))}"[:2000]}

    def record(self, fields: dict[str, Any] | None) -> None:
        """Write :meth:`ending`'s fields into ``summary.json``; remove a created directory that has nothing."""
        if not self.path.is_dir():
            return
        if fields is None:
            if self.created and not has_checkpoints(self.path):
                self.remove()
            return
        with contextlib.suppress(OSError):  # a full disk must not hide the error itself
            update_summary(self.path, fields)
