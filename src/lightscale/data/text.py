"""Language-model data: a text corpus (:mod:`~lightscale.data.corpus`) served as token windows
(:mod:`~lightscale.data.windows`).

Preparation (``prepare_data``, local rank 0 only) tokenizes the corpus once into cached shards; training reads
random windows of ``block_size + 1`` tokens straight from them; validation uses a fixed, seeded set of windows.
"""

import json
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, OpenUnitInterval, PositiveInt
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from lightscale.data.corpus import (
    CorpusFile,
    corpus_key,
    default_cache_dir,
    list_corpus,
    prepare_shards,
    scan_alphabet,
)
from lightscale.data.tokenizers import CharTokenizer, Tokenizer, TokenizerName, build_tokenizer
from lightscale.data.windows import TokenWindows, WindowSampler, passthrough, stack_prompts

# ------------------------------------------------------------------------------------------------ DataModule


class TextDataModule(L.LightningDataModule):
    """Next-token prediction on a text corpus (default: the Python standard library's source, on any machine).

    Args:
        path: a text file or a folder of them (searched recursively for ``pattern``); ``None``: the Python
            standard library's ``.py`` files.
        tokenizer: ``byte`` (vocab 256, any input), ``char`` (the corpus's characters) or ``gpt2`` (BPE; needs
            ``tiktoken``).
        block_size: context length of the training windows.
        batch_size: windows per batch, per device.
        val_fraction: the last fraction of the corpus's tokens is the validation split.
        train_samples_per_epoch: windows in one training "epoch", over all ranks (windows are drawn at
            random, so an epoch is a bookkeeping unit; >= max_steps x batch_size x devices is one epoch).
        val_batches: the validation set is this many batches of fixed, seeded windows.
        max_bytes: stop adding corpus files after this many bytes (``None``: all files; the standard-library
            corpus defaults to 20 MB).
        pattern: glob for files inside a folder (default: all non-hidden files; ``*.py`` for the stdlib).
        prompts: what ``predict`` continues.
        cache_dir: where token shards are cached (default ``$LIGHTSCALE_CACHE/tokens`` or
            ``~/.cache/lightscale/tokens``).
        seed: picks the windows (training and validation).
    """

    def __init__(
        self,
        path: str | None = None,
        tokenizer: TokenizerName = "byte",
        block_size: PositiveInt = 256,
        batch_size: PositiveInt = 32,
        val_fraction: OpenUnitInterval = 0.1,
        train_samples_per_epoch: PositiveInt = 1_000_000,
        val_batches: PositiveInt = 20,
        max_bytes: PositiveInt | None = None,
        pattern: str | None = None,
        prompts: Sequence[str] = ("\n",),
        num_workers: NonNegativeInt = 0,
        pin_memory: bool | None = None,
        cache_dir: str | None = None,
        seed: NonNegativeInt = 0,
    ) -> None:
        super().__init__()
        if path is not None and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"data.path {path!r} does not exist")
        if any(not p for p in prompts):
            raise ValueError("data.prompts must be non-empty strings")
        self.save_hyperparameters()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self._files: list[CorpusFile] | None = None
        self._shard_dir: Path | None = None
        self._tokenizer: Tokenizer | None = None
        self.train_set: TokenWindows | None = None
        self.val_set: TokenWindows | None = None

    # -- corpus and tokenizer (available right after __init__, so the CLI can link vocab_size) --------------

    @property
    def files(self) -> list[CorpusFile]:
        if self._files is None:
            self._files = list_corpus(self.hparams.path, self.hparams.pattern, self.hparams.max_bytes)
        return self._files

    @property
    def shard_dir(self) -> Path:
        """Cache folder of this corpus + tokenizer + split."""
        if self._shard_dir is None:
            key = corpus_key(self.files, self.hparams.tokenizer, self.hparams.val_fraction, self.cache_dir)
            self._shard_dir = self.cache_dir / f"{self.hparams.tokenizer}-{key}"
        return self._shard_dir

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            chars = None
            if self.hparams.tokenizer == "char":
                vocab = self.shard_dir / "vocab.json"
                chars = CharTokenizer.load(vocab).chars if vocab.exists() else self._scan_alphabet()
            self._tokenizer = build_tokenizer(self.hparams.tokenizer, chars)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def block_size(self) -> int:
        return self.hparams.block_size

    def _scan_alphabet(self) -> str:
        alphabet = scan_alphabet(self.files, skip_invalid=self.hparams.path is None)
        if not alphabet:
            raise ValueError(f"the corpus at {self.hparams.path!r} holds no text")
        return alphabet

    # -- Lightning hooks ---------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        prepare_shards(self.files, self.tokenizer, self.hparams.val_fraction, self.shard_dir, self.hparams.path is None)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None or stage == "predict":
            return
        meta_path = self.shard_dir / "meta.json"
        if not meta_path.exists():  # used outside a Trainer, or prepare_data ran on another node only
            self.prepare_data()
        meta = json.loads(meta_path.read_text())
        hp, corpus = self.hparams, self.hparams.path or "the standard library"
        for split, what in (("train", "a longer corpus"), ("val", "a larger data.val_fraction")):
            if meta[f"{split}_tokens"] < hp.block_size + 1:
                raise ValueError(
                    f"the {split} split of {corpus} has {meta[f'{split}_tokens']} tokens, fewer than "
                    f"block_size + 1 = {hp.block_size + 1}: use a smaller data.block_size or {what}"
                )
        self.train_set = TokenWindows(
            self.shard_dir / "train.bin", meta["dtype"], hp.block_size, hp.train_samples_per_epoch, hp.seed
        )
        # a different key than training, and fixed: the same windows in every run and every validation
        self.val_set = TokenWindows(
            self.shard_dir / "val.bin",
            meta["dtype"],
            hp.block_size,
            hp.val_batches * hp.batch_size,
            hp.seed + 1,
        )

    def _loader(self, dataset: Dataset, sampler: DistributedSampler | None = None, **kwargs) -> StatefulDataLoader:
        workers = self.hparams.num_workers
        pin = torch.cuda.is_available() if self.hparams.pin_memory is None else self.hparams.pin_memory
        kwargs.setdefault("collate_fn", passthrough)
        return StatefulDataLoader(
            dataset,
            batch_size=kwargs.pop("batch_size", self.hparams.batch_size),
            sampler=sampler,
            shuffle=False,
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=workers > 0,
            **kwargs,
        )

    def train_loader_for(self, num_replicas: int, rank: int) -> StatefulDataLoader:
        """The training loader of data-parallel rank ``rank`` of ``num_replicas``."""
        if self.train_set is None:
            raise RuntimeError("call setup() first")
        return self._loader(self.train_set, WindowSampler(self.train_set, num_replicas, rank))

    def train_dataloader(self) -> StatefulDataLoader:
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        kwargs = kwargs or {"num_replicas": 1, "rank": 0}
        return self.train_loader_for(kwargs["num_replicas"], kwargs["rank"])

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.val_set)  # Lightning adds a DistributedSampler (no shuffle) across ranks

    def predict_dataloader(self) -> StatefulDataLoader:
        processes = self.trainer.world_size if self.trainer is not None else 1
        if len(self.hparams.prompts) < processes:  # Lightning cannot give a process no prompt at all
            raise ValueError(
                f"data.prompts: {len(self.hparams.prompts)} prompt(s) for {processes} processes; give at least "
                f"one per process, or predict with --trainer.devices {len(self.hparams.prompts)}"
            )
        tokenizer = self.tokenizer
        prompts = [torch.from_numpy(tokenizer.encode(p).astype(np.int64)) for p in self.hparams.prompts]
        return self._loader(prompts, batch_size=1, collate_fn=stack_prompts)
