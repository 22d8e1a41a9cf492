"""Checkpoints written in the background (``checkpoint.async_save: true``), so training does not wait for the disk.

Written here rather than taken from Lightning's experimental ``AsyncCheckpointIO``, which lacks what a run that
may be killed at any moment needs:

- the snapshot is taken in host memory (a GPU tensor is copied to the CPU before the step goes on), not as a second
  copy of the whole training state on the accelerator, into buffers kept from one save to the next (pinned when
  there is a GPU): allocating them afresh costs more than the copy itself. So one write is in flight at a time:
  a save that comes while the previous one is still being written waits for it, which bounds the memory;
- removing an old checkpoint waits for the writes queued before it, so a kill between the two never leaves neither
  the old best checkpoint nor the new one (Lightning's removes at once, while the new file is still being written);
- a checkpoint is read only after the writes queued before it are on disk;
- each write is the wrapped writer's (:class:`~lightscale.resilience.checkpoint_io.SafeCheckpointIO` by default:
  temporary file, fsync, rename), so a kill during a background write leaves the previous file as it was.

A failed background write (e.g. a full disk) is raised once, at the next save or when the run ends, with the message
a foreground write would give.
"""

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO

from lightscale.resilience.checkpoint_io import SafeCheckpointIO


class BackgroundCheckpointIO(CheckpointIO):
    """Write checkpoints on one background thread, in order: the training loop pays only for a host copy.

    Args:
        checkpoint_io: the writer used on the thread (:class:`SafeCheckpointIO` when ``None``).
    """

    def __init__(self, checkpoint_io: CheckpointIO | None = None) -> None:
        self.checkpoint_io = checkpoint_io if checkpoint_io is not None else SafeCheckpointIO()
        self._executor: ThreadPoolExecutor | None = None
        self._error: BaseException | None = None
        self._buffers: dict[tuple, torch.Tensor] = {}  # host copies, by position in the checkpoint

    def _submit(self, work: Any, *args: Any) -> None:
        self._raise_pending()
        if self._executor is None:  # created lazily: Lightning tears the plugin down between fit and test
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._executor.submit(self._guarded, work, *args)

    def _guarded(self, work: Any, *args: Any) -> None:
        try:
            work(*args)
        except BaseException as error:  # kept for the training thread: an exception here would vanish
            self._error = self._error or error

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.wait()  # the previous write still reads the buffers
        snapshot = self._snapshot(checkpoint, (), {})
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the device-to-host copies were queued without waiting
        self._submit(self.checkpoint_io.save_checkpoint, snapshot, path, storage_options)

    def _snapshot(self, value: Any, where: tuple, seen: dict[int, torch.Tensor]) -> Any:
        """``value`` with every tensor replaced by its copy in a host buffer (reused when the shape matches); a
        tensor that appears twice (a tied weight) is copied once and stays shared, as ``torch.save`` keeps it."""
        if isinstance(value, torch.Tensor):
            if id(value) in seen:
                return seen[id(value)]
            buffer = self._buffers.get(where)
            if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                pin = value.device.type == "cuda"
                buffer = self._buffers[where] = torch.empty(value.shape, dtype=value.dtype, pin_memory=pin)
            seen[id(value)] = buffer.copy_(value.detach(), non_blocking=True)
            return buffer
        if isinstance(value, dict):
            return type(value)((key, self._snapshot(item, (*where, key), seen)) for key, item in value.items())
        if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
            return type(value)(self._snapshot(item, (*where, i), seen) for i, item in enumerate(value))
        return value

    def remove_checkpoint(self, path: Any) -> None:
        self._submit(self.checkpoint_io.remove_checkpoint, path)

    def wait(self) -> None:
        """Block until every queued write and removal is done; raise the first failure, if any."""
        if self._executor is not None:
            self._executor.submit(lambda: None).result()
        self._raise_pending()

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.wait()
        return self.checkpoint_io.load_checkpoint(*args, **kwargs)

    def teardown(self) -> None:
        """Finish the queued writes (the run's end waits for its last checkpoint), then stop the thread."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        self.checkpoint_io.teardown()
        self._raise_pending()


def wait_for_checkpoints(trainer: Any) -> None:
    """Block until the checkpoints this trainer has saved are on disk (a stop or requeue must not exit first)."""
    checkpoint_io = trainer.strategy.checkpoint_io
    if isinstance(checkpoint_io, BackgroundCheckpointIO):
        checkpoint_io.wait()
    sharded = getattr(trainer.strategy, "wait_for_checkpoints", None)  # lightscale's ModelParallelStrategy
    if sharded is not None:
        sharded()
