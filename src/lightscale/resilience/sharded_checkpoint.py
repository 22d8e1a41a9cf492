"""Sharded checkpoints (``torch.distributed.checkpoint`` folders) that a kill cannot leave half-written, and that
can be written in the background.

Lightning's ``ModelParallelStrategy`` writes every rank's shards straight into the checkpoint's folder, over the
previous checkpoint of the same name (``last.ckpt``): a kill in the middle leaves new shards next to the old
metadata, a folder of two steps that may load without complaint. Here a save goes into a hidden sibling,
``.<name>.<token>.tmp``; once every rank's shards and the metadata are on disk, rank 0 swaps it in (the old folder
is renamed ``.<name>.<token>.old``, the new one takes the name, the old one is deleted). A kill between the two
renames leaves the name missing and the ``.old`` folder whole: :func:`recover_interrupted_swaps`, run before a
resume looks for checkpoints, renames it back.

In the background (:class:`BackgroundShardedWriter`, ``checkpoint.async_save``) the shards are first copied to host
memory by ``torch.distributed.checkpoint.async_save`` (the loop waits for that copy only), written by its thread over
a process group of their own (the training's collectives go on in the default one), and swapped in by rank 0 when
the write is complete. One write is in flight at a time.
"""

import os
import secrets
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from lightscale.core.files import TMP_SUFFIX, fsync_dir

OLD_SUFFIX = ".old"
META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint


def staging_path(path: Path) -> Path:
    """Where a save of ``path`` is written until it is complete (a hidden sibling, removed if left by a kill)."""
    return path.parent / f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}"


def publish(staging: Path, path: Path) -> None:
    """Put the complete folder ``staging`` in the place of ``path`` (rank 0, after every rank has written)."""
    meta = staging / META_FILE
    if meta.is_file():  # the shards are fsync'd by torch.distributed.checkpoint; Lightning's meta.pt is not
        with open(meta, "rb") as file:
            os.fsync(file.fileno())
    fsync_dir(staging)
    old = None
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        old = path.parent / f".{path.name}.{secrets.token_hex(4)}{OLD_SUFFIX}"
        path.rename(old)
    staging.rename(path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_interrupted_swaps(folder: Path) -> list[Path]:
    """Undo what a kill between the two renames of :func:`publish` left: a ``.<name>.<token>.old`` folder whose
    name is free gets it back; one whose name is taken is deleted. Returns the checkpoints put back."""
    restored = []
    if not folder.is_dir():
        return restored
    for old in sorted(folder.glob(f".*{OLD_SUFFIX}")):
        name = old.name[1:].rsplit(".", 2)[0]  # ".<name>.<token>.old" -> "<name>"
        target = folder / name
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(target)
            restored.append(target)
    return restored


class BackgroundShardedWriter:
    """``torch.distributed.checkpoint.async_save`` into a staging folder, swapped in by rank 0 once complete;
    removals of old checkpoints wait for it (see the module docstring)."""

    def __init__(self) -> None:
        self._group: Any = None
        self._pending: Future | None = None  # done when the write in flight is on disk (rank 0: and swapped in)
        self._after: list[Callable[[], None]] = []  # rank 0: removals queued behind the write in flight
        self._lock = threading.Lock()
        self._error: BaseException | None = None

    def save(self, state: dict[str, Any], meta: dict[str, Any], path: Path, staging: Path, is_rank_zero: bool) -> None:
        """Start writing ``state`` (tensors, sharded) and ``meta`` (the rest) as the checkpoint ``path``."""
        import torch.distributed as dist
        from torch.distributed.checkpoint import async_save

        self.wait()
        if self._group is None:  # collective: every rank creates it at its first save
            self._group = dist.new_group(backend="gloo")
        if is_rank_zero:
            staging.mkdir(parents=True, exist_ok=True)
            torch.save(meta, staging / META_FILE)
        written = async_save(state, checkpoint_id=staging, process_group=self._group)
        written = getattr(written, "upload_completion", written)  # newer torch may return an AsyncSaveResponse
        if not is_rank_zero:
            self._pending = written
            return
        self._pending = finished = Future()
        written.add_done_callback(lambda done: self._finish(done, staging, path, finished))

    def _finish(self, written: Future, staging: Path, path: Path, finished: Future) -> None:
        """Rank 0, on the writer's thread: every rank's shards and the metadata are on disk; swap the folder in,
        then run the removals that waited for it."""
        try:
            written.result()
            publish(staging, path)
        except BaseException as error:
            self._error = self._error or error
            shutil.rmtree(staging, ignore_errors=True)
        while True:
            with self._lock:
                after, self._after = self._after, []
                if not after:
                    finished.set_result(None)
                    return
            for work in after:
                self._guarded(work)

    def _guarded(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as error:
            self._error = self._error or error

    def after_pending(self, work: Callable[[], None]) -> None:
        """Run ``work`` (rank 0) once the write in flight is swapped in, or now when there is none."""
        with self._lock:
            queued = self._pending is not None and not self._pending.done()
            if queued:
                self._after.append(work)
        if not queued:
            self._guarded(work)

    def wait(self) -> None:
        """Block until the write in flight is on disk (and swapped in, on rank 0); raise its failure, if any."""
        pending, self._pending = self._pending, None
        if pending is not None:
            error = pending.exception()
            self._error = self._error or error
        if self._error is not None:
            error, self._error = self._error, None
            raise error
