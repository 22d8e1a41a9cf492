"""Training and validation samples from a token memmap: windows of ``block_size + 1`` tokens, drawn by a hash.

The start of the window with sample id ``i`` is a hash of ``(seed, i)``; the sampler hands every (epoch,
data-parallel rank) its own ids. So the stream is deterministic, different on every rank and in every
epoch, and a torchdata ``StatefulDataLoader`` resumes it exactly mid-epoch; the corpus is never loaded into RAM.
"""

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

# ----------------------------------------------------------------------------------------- windows, sampling


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a cheap, well-mixed hash of uint64 values (vectorised)."""
    x = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class TokenWindows(Dataset):
    """Windows of ``block_size + 1`` tokens (inputs and shifted targets) from a token memmap.

    Sample ``i`` starts at ``hash(seed, i) mod (n_tokens - block_size)``: any integer id is valid, so a
    sampler can give each epoch and rank fresh ids (see :class:`WindowSampler`) while ``len`` stays the
    number of samples per epoch. A batch is read with one ``__getitems__`` call and returned as one int64
    tensor of shape (batch, block_size + 1); the memmap is opened lazily so worker processes open their own.
    """

    def __init__(self, path: str | Path, dtype: str, block_size: int, length: int, seed: int = 0) -> None:
        self.path, self.dtype, self.block_size, self.length = str(path), np.dtype(dtype), block_size, length
        self.n_tokens = os.path.getsize(self.path) // self.dtype.itemsize
        self.n_windows = self.n_tokens - block_size
        if self.n_windows < 1:
            raise ValueError(f"{self.path} holds {self.n_tokens} tokens, fewer than block_size + 1 = {block_size + 1}")
        self._key = _mix64(np.array([seed]))
        self._tokens: np.memmap | None = None

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}  # never pickle the memmap (that would copy the corpus)

    def offsets(self, indices: Sequence[int]) -> np.ndarray:
        ids = np.asarray(indices, dtype=np.uint64)
        return (_mix64(ids ^ self._key) % np.uint64(self.n_windows)).astype(np.int64)

    def __getitems__(self, indices: Sequence[int]) -> torch.Tensor:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        span = self.block_size + 1
        windows = np.stack([self._tokens[o : o + span] for o in self.offsets(indices).tolist()])
        return torch.from_numpy(windows.astype(np.int64))

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.__getitems__([index])[0]


class WindowSampler(DistributedSampler):
    """Sample ids for :class:`TokenWindows`: epoch ``e`` reads the ids ``e * len + j`` in order, dealt out to
    the ``W`` ranks round-robin (rank ``r`` gets ``j = r, r + W, r + 2W, ...``), so no two epochs share a window id.

    Dealing round-robin makes the data stream independent of the number of processes: with a per-rank batch of
    ``B``, optimizer step ``s`` of every layout trains on ids ``j`` in ``[s*W*B, (s+1)*W*B)``, so 2 processes x B
    see the same global batches as 1 process x 2B, and a checkpoint resumes on another world size where it
    stopped (the loader fast-forwards by whole batches of the new size).

    It subclasses ``DistributedSampler`` so Lightning keeps it (instead of injecting its own) and calls
    ``set_epoch`` on it every epoch; a ``StatefulDataLoader`` fast-forwards it exactly on resume.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=True)

    def __iter__(self) -> Iterator[int]:
        start = self.epoch * len(self.dataset) + self.rank  # type: ignore[arg-type]
        return iter(range(start, start + self.num_samples * self.num_replicas, self.num_replicas))


def passthrough(batch: torch.Tensor) -> torch.Tensor:
    """Batches come collated from ``__getitems__``."""
    return batch


def stack_prompts(batch: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(batch)
