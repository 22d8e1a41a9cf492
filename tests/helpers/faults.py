"""Models and data that fail on purpose, loaded by the CLI through their class paths (``helpers.faults.X``)."""

import json
import time

import torch
from lightning.pytorch.callbacks import Callback

from lightscale.core.files import atomic_file
from lightscale.data import DigitsDataModule
from lightscale.data.tensor_dataset import BatchedTensorDataset
from lightscale.models import Classifier
from lightscale.resilience import checkpoint_io


class NaNClassifier(Classifier):
    """The digits classifier whose loss is NaN at the given global steps (or whose gradient is, with
    ``nan_in="gradient"``)."""

    def __init__(self, nan_at_steps: list[int] | None = None, nan_in: str = "loss", **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.nan_at_steps = set(nan_at_steps or [])
        self.nan_in = nan_in

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.global_step in self.nan_at_steps and self.nan_in == "loss":
            loss = loss * float("nan")
        return loss

    def on_after_backward(self) -> None:
        if self.global_step in self.nan_at_steps and self.nan_in == "gradient":
            next(self.parameters()).grad.view(-1)[0] = float("inf")


class Float64Digits(DigitsDataModule):
    """A user's dataset mistake: images as float64 (the model's weights are float32)."""

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        for name, split in self.splits.items():
            images, labels = split.tensors
            self.splits[name] = BatchedTensorDataset(images.double(), labels)


class BadLabelDigits(DigitsDataModule):
    """Another: labels outside the classes the model has (0..9)."""

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        for name, split in self.splits.items():
            images, labels = split.tensors
            self.splits[name] = BatchedTensorDataset(images, labels + 10)


class ArrayState(Callback):
    """A callback whose checkpoint state holds numpy data (allowed by the safe loader)."""

    def state_dict(self) -> dict:
        import numpy as np

        return {"history": np.arange(3, dtype=np.float32), "best": np.float64(0.5)}


class Crash(RuntimeError):
    """What :class:`CrashAt` raises."""


class CrashAt(Callback):
    """Raise :class:`Crash` at the end of optimizer step ``step`` (before that step's checkpoints), like a crash."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"crash at step {self.step}")


class OutOfMemoryAt(Callback):
    """Raise the error PyTorch raises when a CUDA allocation fails, with its real message, at optimizer step ``step``
    (on a CPU this is the only way to meet it)."""

    MESSAGE = (
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB of which 1.20 GiB is "
        "free. Of the allocated memory 75.10 GiB is allocated by PyTorch, and 1.85 GiB is reserved by PyTorch but "
        "unallocated."
    )

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise torch.OutOfMemoryError(self.MESSAGE)


class AllocateTooMuchAt(Callback):
    """Ask the model's device for a petabyte at optimizer step ``step``: a real out-of-memory error on a GPU."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args: object) -> None:
        if trainer.global_step == self.step:
            torch.empty(2**50, dtype=torch.uint8, device=pl_module.device)


class StallAt(Callback):
    """Rank ``rank`` stops at the start of the batch after optimizer step ``step`` and never goes on (a hung data
    read, a deadlock): the other ranks then wait for it in the next collective."""

    def __init__(self, step: int, rank: int = 0) -> None:
        self.step = step
        self.rank = rank

    def on_train_batch_start(self, trainer, *args: object) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            time.sleep(10_000)


class _SlowReads(BatchedTensorDataset):
    def __init__(self, seconds: float, rank: int, *tensors: torch.Tensor) -> None:
        super().__init__(*tensors)
        self.seconds, self.rank = seconds, rank

    def __getitems__(self, indices):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_rank() == self.rank:
            time.sleep(self.seconds)
        return super().__getitems__(indices)


class SlowReadDigits(DigitsDataModule):
    """Digits whose training batches take ``seconds`` longer to read on rank ``rank`` (a slow disk on one node)."""

    def __init__(self, seconds: float = 0.2, rank: int = 1, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.seconds, self.rank = seconds, rank

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.splits["train"] = _SlowReads(self.seconds, self.rank, *self.splits["train"].tensors)


class _EventLog(Callback):
    """Appends JSON lines (``event``, details, monotonic ``time``) to the file ``events``, for a test to follow."""

    def __init__(self, events: str) -> None:
        self.events = events

    def _event(self, **event: object) -> None:
        with open(self.events, "a") as file:
            file.write(json.dumps({**event, "time": time.monotonic()}) + "\n")


class SlowDisk(_EventLog):
    """Checkpoint writes that take ``seconds`` longer, from the ``from_write``-th on: the bytes are in the temporary
    file, the rename has not happened. Appends what happens to the file ``events`` (JSON lines: ``write-start`` /
    ``write-end`` with the checkpoint's step, ``step`` after each optimizer step), so a test sees what ran during a
    write and can kill the run in the middle of one."""

    def __init__(self, events: str, seconds: float = 1.0, from_write: int = 1) -> None:
        super().__init__(events)
        self.seconds, self.from_write = seconds, from_write
        self._writes = 0
        self._original = None

    def _slow_save(self, checkpoint: dict, path: str) -> None:
        self._writes += 1
        with atomic_file(path, durable=True) as file:
            torch.save(checkpoint, file)
            if self._writes >= self.from_write:
                self._event(event="write-start", step=checkpoint["global_step"], path=str(path))
                time.sleep(self.seconds)
        self._event(event="write-end", step=checkpoint["global_step"], path=str(path))

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._original = checkpoint_io.atomic_save
        checkpoint_io.atomic_save = self._slow_save

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._original is not None:
            checkpoint_io.atomic_save = self._original

    def on_train_batch_end(self, trainer, *args: object) -> None:
        self._event(event="step", step=trainer.global_step)


class HangingShardedWrite(_EventLog):
    """The ``from_write``-th sharded checkpoint save stops for ``seconds`` once every rank has written its shards,
    just before rank 0 writes the metadata that completes the checkpoint (``FileSystemWriter.finish``). Rank 0
    appends ``write-start`` and ``step`` events to ``events`` as :class:`SlowDisk` does."""

    def __init__(self, events: str, seconds: float = 600, from_write: int = 1) -> None:
        super().__init__(events)
        self.seconds, self.from_write = seconds, from_write
        self._writes = 0
        self._original = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        from torch.distributed.checkpoint.filesystem import FileSystemWriter

        self._original = original = FileSystemWriter.finish
        hook = self

        def finish(writer, metadata, results) -> None:
            hook._writes += 1
            if hook._writes >= hook.from_write:
                hook._event(event="write-start", path=str(writer.path))
                time.sleep(hook.seconds)
            original(writer, metadata, results)

        FileSystemWriter.finish = finish

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._original is not None:
            from torch.distributed.checkpoint.filesystem import FileSystemWriter

            FileSystemWriter.finish = self._original

    def on_train_batch_end(self, trainer, *args: object) -> None:
        if trainer.is_global_zero:
            self._event(event="step", step=trainer.global_step)
