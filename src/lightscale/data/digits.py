"""scikit-learn's bundled 8x8 handwritten digits: 1,797 real images that ship with the package (no download)."""

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, OpenUnitInterval, PositiveInt
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from lightscale.data.tensor_dataset import BatchedTensorDataset, passthrough_collate


class DigitsDataModule(L.LightningDataModule):
    """Deterministic train/val/test split from ``seed``; normalisation statistics come from train only.

    The whole set is ~0.5 MB, so it lives in memory as tensors; batches are gathered with one index
    operation (see :class:`BatchedTensorDataset`). Loaders are torchdata ``StatefulDataLoader``s so a
    checkpoint taken mid-epoch resumes with exactly the remaining batches.
    """

    num_classes = 10
    image_shape = (1, 8, 8)

    def __init__(
        self,
        batch_size: PositiveInt = 64,
        val_fraction: OpenUnitInterval = 0.15,
        test_fraction: OpenUnitInterval = 0.15,
        seed: NonNegativeInt = 0,
        num_workers: NonNegativeInt = 0,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if val_fraction + test_fraction >= 1:
            raise ValueError(
                f"data.val_fraction + data.test_fraction must be < 1, got {val_fraction} + {test_fraction}"
            )
        self.save_hyperparameters()
        self.splits: dict[str, BatchedTensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from sklearn.datasets import load_digits  # imported here: sklearn adds ~1 s to CLI start-up

        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1)
        labels = torch.from_numpy(digits.target.astype(np.int64))
        n = len(labels)
        order = torch.from_numpy(np.random.default_rng(self.hparams.seed).permutation(n))
        n_val, n_test = round(n * self.hparams.val_fraction), round(n * self.hparams.test_fraction)
        parts = {
            "test": order[:n_test],
            "val": order[n_test : n_test + n_val],
            "train": order[n_test + n_val :],
        }
        train_images = images[parts["train"]]
        mean, std = train_images.mean(), train_images.std()
        for name, index in parts.items():
            self.splits[name] = BatchedTensorDataset((images[index] - mean) / std, labels[index])

    def _loader(self, split: str, shuffle: bool) -> StatefulDataLoader:
        workers = self.hparams.num_workers
        pin = torch.cuda.is_available() if self.hparams.pin_memory is None else self.hparams.pin_memory
        dataset = self.splits[split]
        sampler = None
        if shuffle and torch.distributed.is_available() and torch.distributed.is_initialized():
            # torchdata's RandomSampler is not torch's, so Lightning would wrap it in a DistributedSamplerWrapper
            # whose order is drawn from the global generator when each epoch's iterator is created; a mid-epoch
            # resume creates it at another moment and sees other batches. A seeded DistributedSampler (epoch set
            # by Lightning) is replayed exactly by StatefulDataLoader.
            sampler = DistributedSampler(dataset, shuffle=True, seed=self.hparams.seed)
        return StatefulDataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle if sampler is None else None,
            sampler=sampler,
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=workers > 0,
            collate_fn=passthrough_collate,
        )

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> StatefulDataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> StatefulDataLoader:
        return self._loader("test", shuffle=False)
