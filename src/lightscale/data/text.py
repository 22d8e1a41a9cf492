"""Language-model data: a text corpus tokenized once into memory-mapped shards, served as token windows.

Preparation (``prepare_data``, local rank 0 only) streams the corpus through the tokenizer into
``train.bin`` / ``val.bin`` (raw numpy arrays of the smallest unsigned dtype that holds the vocabulary) in a
cache folder named by a hash of the corpus files' paths, sizes and modification times, the tokenizer and
the split. It is written to a temporary folder and renamed into place, so a crash never leaves half a
cache and every later call is a no-op.

Training reads windows of ``block_size + 1`` tokens straight from the memory map (the corpus is never
loaded into RAM). The start of the window with sample id ``i`` is a hash of ``(seed, i)``; the sampler
hands every (epoch, data-parallel rank) its own range of ids. So the stream is deterministic, different on
every rank and in every epoch, and a torchdata ``StatefulDataLoader`` resumes it exactly mid-epoch.
"""

import contextlib
import hashlib
import json
import os
import shutil
import sysconfig
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, OpenUnitInterval, PositiveInt
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from lightscale.data.tokenizers import CharTokenizer, Tokenizer, TokenizerName, build_tokenizer

FORMAT_VERSION = 2  # bump when the shard layout changes, so old caches are not reused
STDLIB_MAX_BYTES = 20_000_000  # default cap for the stdlib corpus: preparation stays a few seconds on a CPU
_READ_CHUNK = 16 << 20
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def default_cache_dir() -> Path:
    """``$LIGHTSCALE_CACHE/tokens``, else ``~/.cache/lightscale/tokens``."""
    return Path(os.environ.get("LIGHTSCALE_CACHE") or "~/.cache/lightscale").expanduser() / "tokens"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds ids below ``vocab_size``."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


# ----------------------------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    size: int
    mtime_ns: int
    ctime_ns: int = 0
    inode: int = 0

    @property
    def stamp(self) -> str:
        """Changes whenever the file's content may have: size, inode and both times (the ctime cannot be set back)."""
        return f"{self.size}:{self.mtime_ns}:{self.ctime_ns}:{self.inode}"


def list_corpus(path: str | Path | None, pattern: str | None = None, max_bytes: int | None = None) -> list[CorpusFile]:
    """The files of a corpus in a deterministic (sorted) order.

    ``path`` is a file, or a folder searched recursively for ``pattern`` (default: every file, hidden ones
    excluded); ``None`` means the Python standard library's own ``.py`` sources. Files are taken in order
    until ``max_bytes`` is reached (``None``: no cap, except 20 MB for the standard library).
    """
    if path is None:
        root, pattern = Path(sysconfig.get_paths()["stdlib"]), pattern or "*.py"
        max_bytes = STDLIB_MAX_BYTES if max_bytes is None else max_bytes
        skip = _SKIP_DIRS
    else:
        root, pattern, skip = Path(path).expanduser(), pattern or "*", set()
        if not root.exists():
            raise FileNotFoundError(f"corpus path {str(root)!r} does not exist")
    if root.is_file():
        candidates = [root]
    else:
        candidates = sorted(
            p
            for p in root.rglob(pattern)
            if not any(part.startswith(".") or part in skip for part in p.relative_to(root).parts) and p.is_file()
        )
    files, total = [], 0
    for candidate in candidates:
        if max_bytes is not None and total >= max_bytes:
            break
        stat = candidate.stat()
        files.append(CorpusFile(candidate, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino))
        total += stat.st_size
    if total == 0:
        raise ValueError(f"the corpus at {str(root)!r} is empty (no non-empty files matching {pattern!r})")
    return files


def content_hash(file: CorpusFile, memo: dict[str, list[str]]) -> str:
    """SHA-256 of the file's bytes, read again only when its :attr:`CorpusFile.stamp` changed (``memo`` holds
    ``path -> [stamp, hash]`` between runs)."""
    key = str(file.path.absolute())
    known = memo.get(key)
    if known and known[0] == file.stamp:
        return known[1]
    digest = hashlib.sha256()
    for block in _read_bytes(file.path):
        digest.update(block)
    memo[key] = [file.stamp, digest.hexdigest()]
    return memo[key][1]


def corpus_key(files: Sequence[CorpusFile], tokenizer: str, val_fraction: float, cache_dir: Path | None = None) -> str:
    """Hash of what determines the shards: the files' contents (in order), the tokenizer and the split. A corpus
    edited in place, even to the same size with its mtime put back, gets new shards; the same content elsewhere
    reuses them. File hashes are remembered in ``<cache_dir>/hashes.json`` so a large corpus is read once."""
    memo_path = cache_dir / "hashes.json" if cache_dir is not None else None
    try:
        memo = json.loads(memo_path.read_text()) if memo_path is not None and memo_path.is_file() else {}
    except (OSError, ValueError):
        memo = {}
    before = json.dumps(memo, sort_keys=True)
    description = {
        "version": FORMAT_VERSION,
        "files": [(f.size, content_hash(f, memo)) for f in files],
        "tokenizer": tokenizer,
        "val_fraction": val_fraction,
    }
    if memo_path is not None and json.dumps(memo, sort_keys=True) != before:
        with contextlib.suppress(OSError):  # a read-only cache still works, it just hashes again next time
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_path.with_name(f".hashes.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_path)
    return hashlib.sha256(json.dumps(description).encode()).hexdigest()[:16]


def _read_bytes(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(_READ_CHUNK):
            yield block


def _read_text(path: Path) -> Iterator[str]:
    """Strict UTF-8 decoding in chunks cut after a newline (or, in a very long line, before a lead byte),
    so no character is split and BPE merges are barely affected."""
    offset, carry = 0, b""
    for block in _read_bytes(path):
        block = carry + block
        cut = block.rfind(b"\n") + 1
        if cut == 0:
            leads = [i for i in range(max(0, len(block) - 4), len(block)) if block[i] & 0xC0 != 0x80]
            cut = leads[-1] if leads else len(block)
        chunk, carry = block[:cut], block[cut:]
        yield _decode(chunk, path, offset)
        offset += len(chunk)
    if carry:
        yield _decode(carry, path, offset)


def _decode(data: bytes, path: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not valid UTF-8 (byte {offset + error.start}); the char and gpt2 tokenizers need "
            "text, the byte tokenizer (data.tokenizer=byte) accepts any bytes"
        ) from None


def _is_utf8(path: Path) -> bool:
    try:
        for _ in _read_text(path):
            pass
    except ValueError:
        return False
    return True


def scan_alphabet(files: Sequence[CorpusFile], skip_invalid: bool = False) -> str:
    """Every character of the corpus, sorted (the char tokenizer's vocabulary)."""
    chars: set[str] = set()
    for file in files:
        if skip_invalid and not _is_utf8(file.path):
            continue
        for text in _read_text(file.path):
            chars.update(text)
    return "".join(sorted(chars))


def _encoded_chunks(files: Sequence[CorpusFile], tokenizer: Tokenizer, skip_invalid: bool) -> Iterator[np.ndarray]:
    for file in files:
        if skip_invalid and not _is_utf8(file.path):
            continue
        if tokenizer.name == "byte" and not skip_invalid:  # raw bytes: nothing to decode or validate
            for block in _read_bytes(file.path):
                yield np.frombuffer(block, dtype=np.uint8)
        else:
            for text in _read_text(file.path):
                yield tokenizer.encode(text)


def prepare_shards(
    files: Sequence[CorpusFile],
    tokenizer: Tokenizer,
    val_fraction: float,
    out_dir: Path,
    skip_invalid: bool = False,
) -> dict:
    """Tokenize ``files`` into ``out_dir/{train,val}.bin`` + ``meta.json`` (+ ``vocab.json`` for char).

    The first ``1 - val_fraction`` of the tokens train, the rest validate (nanoGPT's split). Written into
    a temporary sibling folder and renamed, so ``out_dir`` either holds complete shards or does not exist;
    if another process finished first, its shards are kept. ``skip_invalid`` drops files that are not
    UTF-8 (used for the stdlib corpus, which has a few deliberately mis-encoded test files).
    """
    if (out_dir / "meta.json").exists():
        return json.loads((out_dir / "meta.json").read_text())
    start = time.perf_counter()
    dtype = token_dtype(tokenizer.vocab_size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        n_tokens = 0
        with open(tmp / "train.bin", "wb") as f:
            for ids in _encoded_chunks(files, tokenizer, skip_invalid):
                f.write(ids.astype(dtype, copy=False).tobytes())
                n_tokens += len(ids)
        if n_tokens == 0:
            raise ValueError(f"the corpus ({files[0].path}, ...) holds no text")
        n_train = int(n_tokens * (1 - val_fraction))
        # move the tail into val.bin, then cut it off train.bin
        tokens = np.memmap(tmp / "train.bin", dtype=dtype, mode="r")
        with open(tmp / "val.bin", "wb") as f:
            for begin in range(n_train, n_tokens, _READ_CHUNK):
                f.write(tokens[begin : min(begin + _READ_CHUNK, n_tokens)].tobytes())
        del tokens
        os.truncate(tmp / "train.bin", n_train * dtype.itemsize)
        meta = {
            "version": FORMAT_VERSION,
            "tokenizer": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "dtype": dtype.name,
            "train_tokens": n_train,
            "val_tokens": n_tokens - n_train,
            "files": len(files),
            "bytes": sum(f.size for f in files),
            "source": str(files[0].path.parent if len(files) > 1 else files[0].path),
        }
        if isinstance(tokenizer, CharTokenizer):
            tokenizer.save(tmp / "vocab.json")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process renamed its complete copy into place first
            if not (out_dir / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rank_zero_info(
        f"Tokenized {meta['files']} files ({meta['bytes'] / 1e6:.1f} MB) with {tokenizer.name}: "
        f"{n_train:,} train / {meta['val_tokens']:,} val tokens in {time.perf_counter() - start:.1f} s "
        f"-> {out_dir}"
    )
    return meta


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
    """Sample ids for :class:`TokenWindows`: rank ``r`` of ``W`` in epoch ``e`` gets the ``n = len // W`` ids
    starting at ``(e * W + r) * n``, so no two (epoch, rank) pairs share a window id.

    It subclasses ``DistributedSampler`` so Lightning keeps it (instead of injecting its own) and calls
    ``set_epoch`` on it every epoch; a ``StatefulDataLoader`` fast-forwards it exactly on resume.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=True)

    def __iter__(self) -> Iterator[int]:
        start = (self.epoch * self.num_replicas + self.rank) * self.num_samples
        return iter(range(start, start + self.num_samples))


def _passthrough(batch: torch.Tensor) -> torch.Tensor:
    """Batches come collated from ``__getitems__``."""
    return batch


def _stack(batch: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(batch)


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
        kwargs.setdefault("collate_fn", _passthrough)
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
        tokenizer = self.tokenizer
        prompts = [torch.from_numpy(tokenizer.encode(p).astype(np.int64)) for p in self.hparams.prompts]
        return self._loader(prompts, batch_size=1, collate_fn=_stack)
