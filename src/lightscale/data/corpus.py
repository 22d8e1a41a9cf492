"""A text corpus tokenized once into memory-mapped shards (``train.bin`` / ``val.bin``), cached by content.

Preparation streams the corpus through the tokenizer into raw numpy arrays of the smallest unsigned dtype that holds
the vocabulary, in a cache folder named by a hash of the files' contents, the tokenizer and the split. It is written
to a temporary folder and renamed into place, so a crash never leaves half a cache and every later call is a no-op.
"""

import contextlib
import fnmatch
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

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from lightscale.data.tokenizers import CharTokenizer, Tokenizer

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
    candidates = [root] if root.is_file() else sorted(_walk(root, pattern, skip))
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


def _walk(root: Path, pattern: str, skip: set[str]) -> Iterator[Path]:
    """Files under ``root`` whose name matches ``pattern``, hidden and ``skip`` folders pruned rather than walked:
    ``Path.rglob`` would walk the whole of a stdlib's site-packages only to drop it (~0.6 s per run)."""
    if "/" in pattern or os.sep in pattern:  # a pattern over paths, not names: let pathlib match it
        for p in root.rglob(pattern):
            if not any(part.startswith(".") or part in skip for part in p.relative_to(root).parts) and p.is_file():
                yield p
        return
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in skip]
        for name in names:
            if not name.startswith(".") and fnmatch.fnmatchcase(name, pattern):
                path = Path(folder, name)
                if path.is_file():
                    yield path


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
