"""Random token windows for throughput benchmarks: GPT-2's vocabulary and context without a corpus or a tokenizer
download (the GPU machine has no network). Usable from the CLI as ``--data.class_path synthetic.RandomTokens``
when ``benchmarks/`` is on ``PYTHONPATH``.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


class _Windows(Dataset):
    def __init__(self, tokens: torch.Tensor, length: int) -> None:
        self.tokens, self.length = tokens, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.tokens[index % len(self.tokens)]


class RandomTokens(L.LightningDataModule):
    """``samples`` windows of ``block_size + 1`` uniformly random token ids (seeded), repeated to ``length``.

    Random tokens make the loss meaningless but the work identical to real text: same shapes, same kernels.
    """

    def __init__(
        self,
        vocab_size: int = 50304,
        block_size: int = 1024,
        batch_size: int = 12,
        length: int = 1_000_000,
        samples: int = 256,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._vocab_size = vocab_size
        self._block_size = block_size
        self.tokens: torch.Tensor | None = None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def block_size(self) -> int:
        return self._block_size

    def setup(self, stage: str | None = None) -> None:
        if self.tokens is None:
            generator = torch.Generator().manual_seed(self.hparams.seed)
            shape = (self.hparams.samples, self.hparams.block_size + 1)
            self.tokens = torch.randint(0, self.hparams.vocab_size, shape, generator=generator)

    def _loader(self, length: int) -> DataLoader:
        return DataLoader(
            _Windows(self.tokens, length),
            batch_size=self.hparams.batch_size,
            shuffle=False,
            num_workers=self.hparams.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.length)

    def val_dataloader(self) -> DataLoader:
        return self._loader(4 * self.hparams.batch_size)
