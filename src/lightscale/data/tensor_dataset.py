"""An in-memory dataset that is indexed a whole batch at a time."""

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset


class BatchedTensorDataset(Dataset):
    """Like ``TensorDataset`` but with ``__getitems__``: the DataLoader fetches a batch with one fancy-index
    per tensor instead of one Python call and one ``torch.stack`` per sample, which for small in-memory
    data sets is most of the loading cost. Use it with :func:`passthrough_collate`.
    """

    def __init__(self, *tensors: torch.Tensor) -> None:
        if not tensors or any(len(t) != len(tensors[0]) for t in tensors):
            raise ValueError("BatchedTensorDataset needs tensors of equal length")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[index] for t in self.tensors)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[index] for t in self.tensors)


def passthrough_collate(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The batch is already collated by ``__getitems__``."""
    return batch
