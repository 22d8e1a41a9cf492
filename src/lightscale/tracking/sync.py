"""``lightscale sync [--watch] [RUN_DIR_OR_ROOT ...]``: upload offline W&B runs, also while they are still being
written, from a machine with a network (a cluster's login node) while the jobs run on compute nodes without one.

Every ``offline-run-*`` folder under the given paths (default ``runs/``) is uploaded with ``wandb sync``
whenever its ``.wandb`` file has grown since the last upload; W&B resumes the same run each time, so the
dashboard follows the job with a delay of one ``--interval``. A run is uploaded a last time and then left
alone once it has ended: its process closed the W&B run (``core.run_dir.mark_wandb_run_finished`` leaves a
marker when the CLI closes it; the run then shows its real exit state), or its file has not changed for
``--stale-minutes`` (a process killed without closing it; W&B then shows it as crashed). The watcher needs no
signal from the jobs and keeps no state but a small ``.lightscale-synced`` file in each finished run's folder.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from lightscale.core.errors import UserError
from lightscale.core.run_dir import WANDB_FINISHED_MARKER
from lightscale.tracking.wandb_access import check_online

SYNCED_MARKER = ".lightscale-synced"  # uploaded after it finished: nothing more to send
UPLOAD_TIMEOUT_S = 600.0  # wandb sync retries for ever when the network goes; give up and try again later


def find_offline_runs(paths: Iterable[Path]) -> list[Path]:
    """``offline-run-*`` folders under ``paths`` (or the paths themselves), oldest first within each run."""
    found: set[Path] = set()
    for path in paths:
        if path.name.startswith("offline-run-") and path.is_dir():
            found.add(path)
        else:
            found.update(p for p in path.rglob("offline-run-*") if p.is_dir() and p.parent.name == "wandb")
    return sorted(found)


def wandb_file(run: Path) -> Path | None:
    return next(iter(sorted(run.glob("run-*.wandb"))), None)


@dataclass
class Upload:
    """What one upload sends: the offline run's folder, the size of its ``.wandb`` file, whether it is the last."""

    run: Path
    size: int
    final: bool


def upload_with_wandb(
    upload: Upload, entity: str | None = None, project: str | None = None, timeout: float = UPLOAD_TIMEOUT_S
) -> str | None:
    """Run ``wandb sync`` on one offline run; ``None`` on success, else why it failed (one line)."""
    command = [sys.executable, "-m", "wandb", "sync", "--include-synced"]
    command += [*(["--entity", entity] if entity else []), *(["--project", project] if project else [])]
    try:
        done = subprocess.run(
            # in the run's wandb/ folder: wandb sync leaves its own logs in ./wandb, not in the user's folder
            [*command, str(upload.run.absolute())],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=upload.run.parent,
        )
    except subprocess.TimeoutExpired:
        return f"wandb sync did not finish within {timeout:.0f} s (network?); trying again later"
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}").splitlines()[-1]
        return f"wandb sync failed: {last}"
    return None


class Watcher:
    """Decides what to upload and when; ``upload`` does it (``wandb sync``, or a stand-in in tests).

    Args:
        paths: run directories or folders holding them.
        upload: sends one :class:`Upload`; returns ``None`` or why it failed.
        stale_seconds: a run without a finish marker whose file has not been written for this long is uploaded
            a last time and left.
        now: the wall clock (file modification times are compared with it).
    """

    def __init__(
        self,
        paths: list[Path],
        upload: Callable[[Upload], str | None],
        stale_seconds: float = 3600.0,
        now: Callable[[], float] = time.time,
        say: Callable[[str], None] = print,
    ) -> None:
        self.paths = paths
        self.upload = upload
        self.stale_seconds = stale_seconds
        self.now = now
        self.say = say
        self.sent: dict[Path, int] = {}  # size of each run's .wandb file at its last successful upload

    def pending(self) -> list[Path]:
        """Offline runs that are not yet uploaded in their final state."""
        return [run for run in find_offline_runs(self.paths) if not (run / SYNCED_MARKER).exists()]

    def step(self) -> int:
        """One pass over every pending run; returns how many uploads failed."""
        failures = 0
        for run in self.pending():
            file = wandb_file(run)
            if file is None:
                continue
            stat = file.stat()
            finished = (run / WANDB_FINISHED_MARKER).exists()
            stale = self.now() - stat.st_mtime >= self.stale_seconds
            final = finished or stale
            if self.sent.get(run) != stat.st_size:
                error = self.upload(Upload(run, stat.st_size, final))
                if error is not None:
                    failures += 1
                    self.say(f"lightscale sync: {run}: {error}")
                    continue
                self.sent[run] = stat.st_size
            if final:
                (run / SYNCED_MARKER).write_text(f"{stat.st_size}\n")
                how = "finished" if finished else f"not written for {self.stale_seconds / 60:.0f} min and never closed"
                self.say(f"lightscale sync: {run}: uploaded, {how}")
        return failures

    def watch(self, interval: float, until_done: bool = False, sleep: Callable[[float], None] = time.sleep) -> None:
        """Pass after pass, ``interval`` seconds apart; with ``until_done``, stop once runs were found and all of
        them are done."""
        while True:
            self.step()
            if until_done and find_offline_runs(self.paths) and not self.pending():
                return
            sleep(interval)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lightscale sync", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[Path("runs")], help="run directories or roots")
    parser.add_argument("--watch", action="store_true", help="keep uploading as the runs grow (Ctrl-C to stop)")
    parser.add_argument("--interval", type=_positive, default=60.0, help="seconds between passes (--watch)")
    parser.add_argument("--stale-minutes", type=_positive, default=60.0, help="unchanged this long: the run ended")
    parser.add_argument("--entity", default=None)
    parser.add_argument("--project", default=None)
    options = parser.parse_args(args)
    try:
        missing = [str(p) for p in options.paths if not p.exists()]
        if missing:
            raise UserError(f"lightscale sync: no such run directory or folder: {', '.join(missing)}")
        if not options.watch and not find_offline_runs(options.paths):
            raise UserError(f"lightscale sync: no offline W&B runs under {', '.join(map(str, options.paths))}")
        check_online(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai", purpose="W&B sync")
    except UserError as error:
        print(f"lightscale: error: {error}", file=sys.stderr)
        sys.exit(2)

    def upload(item: Upload) -> str | None:
        return upload_with_wandb(item, options.entity, options.project)

    watcher = Watcher(options.paths, upload, stale_seconds=60 * options.stale_minutes)
    if not options.watch:
        sys.exit(1 if watcher.step() else 0)
    print(f"lightscale sync: watching {', '.join(map(str, options.paths))} every {options.interval:.0f} s", flush=True)
    try:
        watcher.watch(options.interval)
    except KeyboardInterrupt:
        print("lightscale sync: stopped", file=sys.stderr)
