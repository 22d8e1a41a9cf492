"""Files that are, at every instant, either the old complete version or the new complete one."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO

TMP_SUFFIX = ".tmp"


def fsync_dir(directory: Path) -> None:
    """Persist a rename: the directory entry lives in the directory's own inode."""
    with contextlib.suppress(OSError):  # some filesystems (and Windows) cannot open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, durable: bool = False) -> Iterator[IO[bytes]]:
    """Write ``path`` through a temporary file in the same folder (``.<name>.<random>.tmp``) that replaces it
    only once complete. ``durable`` also ``fsync``\\ s the file and the folder, so a power loss cannot leave an
    empty or short file under the final name (for checkpoints; a summary need not pay for it). On any error the
    temporary is removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, like a plain open()
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            if durable:
                os.fsync(file.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(target.parent)


def write_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (readers see the old or the new file, never a partial one)."""
    with atomic_file(path) as file:
        file.write(text.encode())


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete temporaries left by a process killed mid-write (``.<name>.<random>.tmp``: files, and the folders of
    sharded checkpoints)."""
    removed = []
    directory = Path(directory)
    if directory.is_dir():
        for tmp in directory.glob(f".*{TMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()
                removed.append(tmp)
    return removed
