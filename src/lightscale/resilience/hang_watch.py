"""A run that stops making progress ends with the stalled rank's name, host and step, and every rank's Python
stack, instead of waiting in a collective until the wall-clock limit.

Every rank counts its progress events (training batch start, before and after backward, batch end, each
validation / test / predict batch, each checkpoint) in the training thread: an integer and a clock, nothing
more. A daemon thread per rank writes them every ``heartbeat_seconds`` to
``<run_dir>/diagnostics/heartbeat.rank<R>.json`` and watches its own rank. When a rank has had no progress for
``stall_seconds``, its thread writes the rank's stack (all threads, ``faulthandler``) to ``stacks.rank<R>.txt``.
Because all ranks execute the same sequence of events, the rank with the fewest events is the one the others
wait for: in data parallel training the others wait in the next collective (a buffer broadcast in the forward,
the gradient all-reduce in the backward) while the stalled rank has not reached it. Rank 0 (or, if rank 0's own
thread is frozen, the lowest rank whose heartbeat is fresh) names it in ``hang.json``, in ``summary.json``
(status ``hung``) and in one line on stderr; then every rank exits with :data:`HUNG_EXIT_CODE`.

A rank whose watchdog thread cannot run at all (stuck in C code that holds the interpreter lock) is covered by
``faulthandler.dump_traceback_later``, re-armed by that thread at each heartbeat: it prints the rank's stacks
to stderr (the job log) and exits.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse.typing import PositiveFloat
from lightning.pytorch.callbacks import Callback

from lightscale.core.files import write_atomic
from lightscale.core.hardware import node_name
from lightscale.core.run_dir import DIAGNOSTICS_DIR, update_summary

HUNG_EXIT_CODE = 3
FIRST_STEP_FACTOR = 3  # until the first training batch ends (compilation, first collectives): a longer leash


def heartbeat_path(run_dir: Path, rank: int) -> Path:
    return run_dir / DIAGNOSTICS_DIR / f"heartbeat.rank{rank}.json"


def stacks_path(run_dir: Path, rank: int) -> Path:
    return run_dir / DIAGNOSTICS_DIR / f"stacks.rank{rank}.txt"


DEBUGGERS = ("bdb", "pdb", "pydevd", "debugpy")  # a rank stopped at a breakpoint is not hung


def in_debugger(thread_id: int | None) -> bool:
    """Whether the thread ``thread_id`` is stopped in a debugger (pdb, an IDE's): its stack runs through one."""
    frame = sys._current_frames().get(thread_id) if thread_id is not None else None
    while frame is not None:
        if frame.f_globals.get("__name__", "").split(".")[0] in DEBUGGERS:
            return True
        frame = frame.f_back
    return False


_BEAT_FIELDS = {"rank": int, "host": str, "pid": int, "step": int, "events": int, "where": str,
                "idle_seconds": (int, float), "time": (int, float)}  # fmt: skip


def read_heartbeats(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Every rank's last heartbeat that can be read (a rank on a node that does not share the run directory is
    missing)."""
    beats = {}
    for path in (run_dir / DIAGNOSTICS_DIR).glob("heartbeat.rank*.json"):
        with contextlib.suppress(OSError, ValueError):
            beat = json.loads(path.read_text())
            if isinstance(beat, dict) and all(isinstance(beat.get(key), kind) for key, kind in _BEAT_FIELDS.items()):
                beats[beat["rank"]] = beat  # anything else (half a file, another program's) is not a heartbeat
    return beats


def stalled_ranks(beats: dict[int, dict[str, Any]]) -> list[int]:
    """The ranks furthest behind (fewest progress events); empty when every rank is at the same point."""
    if not beats:
        return []
    fewest = min(beat["events"] for beat in beats.values())
    behind = sorted(rank for rank, beat in beats.items() if beat["events"] == fewest)
    return [] if len(behind) == len(beats) and len(beats) > 1 else behind


def describe_hang(beats: dict[int, dict[str, Any]], world_size: int, stacks: Path) -> str:
    """One line: who stopped where, for how long, and what the others are doing."""
    behind = stalled_ranks(beats)
    if world_size == 1 or len(beats) == 1:
        beat = next(iter(beats.values()))
        return (
            f"no progress for {beat['idle_seconds']:.0f} s on rank {beat['rank']} ({beat['host']}) at global step "
            f"{beat['step']} ({beat['where']}); its stack is in {stacks}"
        )
    if not behind:
        beat = beats[min(beats)]
        return (
            f"all {len(beats)} ranks stopped at global step {beat['step']} ({beat['where']}) with no progress for "
            f"{beat['idle_seconds']:.0f} s; no rank is behind the others: the stacks are in {stacks}"
        )
    named = ", ".join(f"rank {r} ({beats[r]['host']})" for r in behind)
    first = beats[behind[0]]
    ahead = [r for r in sorted(beats) if r not in behind]
    others = beats[ahead[0]]
    verb = "is" if len(behind) == 1 else "are"
    return (
        f"{named} {verb} stalled at global step {first['step']} ({first['where']}), no progress for "
        f"{first['idle_seconds']:.0f} s, while {len(ahead)} other rank(s) wait at global step {others['step']} "
        f"({others['where']}); the stacks of every rank are in {stacks}"
    )


class HangWatch(Callback):
    """Heartbeats of every rank and a watchdog that ends a stalled run with one line (see the module docstring).

    Args:
        stall_seconds: a rank with no progress for this long ends the run (three times as long before the
            first training batch has ended). A single step, validation batch or checkpoint write that takes
            longer counts as a hang: raise it for those. ``None`` switches the watchdog off.
        heartbeat_seconds: how often each rank writes its heartbeat and checks itself.
    """

    def __init__(self, stall_seconds: PositiveFloat | None = 300.0, heartbeat_seconds: PositiveFloat = 5.0) -> None:
        self.stall_seconds = stall_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self._events = 0
        self._where = "starting up"
        self._advanced = time.monotonic()
        self._trained_a_batch = False
        self._trainer: L.Trainer | None = None
        self._training_thread: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Copies (StochasticWeightAveraging deep-copies the module, which can reach the Trainer's callbacks) and
        # pickles get the settings and counters, not the watching thread or its lock.
        return {**self.__dict__, "_stop": None, "_thread": None, "_trainer": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _stop=threading.Event())

    # ------------------------------------------------------------------ progress (training thread)
    def _advance(self, where: str) -> None:
        """A progress event; ``where`` is what the rank does until the next one."""
        self._events += 1
        self._where = where
        self._advanced = time.monotonic()

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._advance("in the forward")

    def on_before_backward(self, *args: Any) -> None:
        self._advance("in the backward")

    def on_after_backward(self, *args: Any) -> None:
        self._advance("in the optimizer step")

    def on_train_batch_end(self, *args: Any) -> None:
        self._trained_a_batch = True
        self._advance("loading the next batch or in batch hooks")

    def on_validation_batch_end(self, *args: Any) -> None:
        self._advance("validating")

    def on_test_batch_end(self, *args: Any) -> None:
        self._advance("testing")

    def on_predict_batch_end(self, *args: Any) -> None:
        self._advance("predicting")

    def on_save_checkpoint(self, *args: Any) -> None:
        self._advance("writing a checkpoint")

    # ------------------------------------------------------------------ the watchdog thread
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.stall_seconds is None or self._thread is not None:
            return
        self._trainer = trainer
        self._training_thread = threading.get_ident()
        self._stop.clear()
        self._advance("starting up")
        self._thread = threading.Thread(target=self._watch, name="lightscale-hang-watch", daemon=True)
        self._thread.start()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._end_watch()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._end_watch()  # Lightning does not call teardown after an error; the process may go on (tests, sweeps)

    def _end_watch(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=2 * self.heartbeat_seconds)
        self._thread = None
        faulthandler.cancel_dump_traceback_later()
        self._beat(time.monotonic())  # the last word: where this rank ended

    def _limit(self) -> float:
        assert self.stall_seconds is not None
        return self.stall_seconds * (1 if self._trained_a_batch else FIRST_STEP_FACTOR)

    def _beat(self, now: float) -> dict[str, Any]:
        trainer = self._trainer
        assert trainer is not None
        beat = {
            "rank": trainer.global_rank,
            "host": node_name(),
            "pid": os.getpid(),
            "step": trainer.global_step,
            "events": self._events,
            "where": self._where,
            "idle_seconds": round(now - self._advanced, 3),
            "time": time.time(),
        }
        with contextlib.suppress(OSError):  # a full or vanished disk must not kill a healthy run
            write_atomic(heartbeat_path(Path(trainer.default_root_dir), trainer.global_rank), json.dumps(beat))
        return beat

    def _watch(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            now = time.monotonic()
            self._beat(now)
            # If this thread is frozen with the rest of the process, faulthandler's own C thread still dumps
            # the stacks (to stderr) and ends the process.
            faulthandler.dump_traceback_later(self._limit() + 3 * self.heartbeat_seconds, exit=True)
            if now - self._advanced > self._limit() and not self._stop.is_set():
                if in_debugger(self._training_thread):  # a breakpoint: the user is looking, not a hang
                    self._advanced = now
                    continue
                self._on_stall()
                return

    def _on_stall(self) -> None:
        """Leave the stacks and the line, then end the process, whatever goes wrong on the way (a full disk, a
        foreign file among the heartbeats): a rank that stays would hang the job again."""
        try:
            self._report_stall()
        finally:
            sys.stdout.flush()
            os._exit(HUNG_EXIT_CODE)

    def _report_stall(self) -> None:
        trainer = self._trainer
        assert trainer is not None
        faulthandler.cancel_dump_traceback_later()
        run_dir = Path(trainer.default_root_dir)
        rank, world = trainer.global_rank, trainer.world_size
        beat = self._beat(time.monotonic())
        stacks = stacks_path(run_dir, rank)
        with contextlib.suppress(OSError), open(stacks, "w") as file:
            file.write(
                f"rank {rank} ({beat['host']}, pid {beat['pid']}): no progress for {beat['idle_seconds']:.0f} s at "
                f"global step {beat['step']} ({beat['where']})\n\n"
            )
            file.flush()
            faulthandler.dump_traceback(file, all_threads=True)
        if self._reports(run_dir, rank):
            deadline = time.monotonic() + 3 * self.heartbeat_seconds
            while time.monotonic() < deadline and not all(stacks_path(run_dir, r).exists() for r in range(world)):
                time.sleep(0.2)  # the other ranks' threads see the same stall within one heartbeat
            beats = read_heartbeats(run_dir)
            beats[rank] = beat
            message = describe_hang(beats, world, run_dir / DIAGNOSTICS_DIR)
            with contextlib.suppress(OSError):
                record = {"message": message, "stalled_ranks": stalled_ranks(beats), "heartbeats": beats}
                write_atomic(run_dir / DIAGNOSTICS_DIR / "hang.json", json.dumps(record, indent=1))
                update_summary(run_dir, {"status": "hung", "error": message})
            print(f"lightscale: error: {message}", file=sys.stderr, flush=True)
        else:
            time.sleep(6 * self.heartbeat_seconds)  # let the reporting rank read this one's files and speak first

    def _reports(self, run_dir: Path, rank: int) -> bool:
        """Rank 0 speaks for the job; when its heartbeat is stale (its process is frozen), the lowest rank whose
        heartbeat is fresh does."""
        if rank == 0:
            return True
        fresh = time.time() - 3 * self.heartbeat_seconds
        live = [r for r, beat in read_heartbeats(run_dir).items() if beat["time"] >= fresh]
        return 0 not in live and rank == min([*live, rank])
