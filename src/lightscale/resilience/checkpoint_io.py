"""Checkpoint files that a crash cannot truncate and that cannot run code when loaded.

Lightning's ``TorchCheckpointIO`` serialises the whole checkpoint into memory and writes it through an fsspec
transaction: on a local disk that is a plain write into a temporary file and a rename, without ``fsync``, so
after a power loss or a full disk the renamed file can still be empty or short. Loading uses whatever
``torch.load`` defaults to and surfaces a refused pickle as a many-line traceback. :class:`SafeCheckpointIO`
adds what is missing, and the CLI installs it in every run:

- **Atomic writes**: stream ``torch.save`` into a temporary file in the target's directory, flush, ``fsync``,
  ``os.replace`` onto the target, ``fsync`` the directory. A process killed at any instant leaves either the
  old complete file or the new complete file, plus at worst a stray ``.<name>.*.tmp`` that is never read.
- **Safe loads**: ``torch.load(weights_only=True)`` with a short allow-list of the plain-data types that real
  checkpoints hold (numpy arrays and scalars, paths, ``pathlib`` paths). A file that carries any
  other pickled object, i.e. possibly code, is refused with one line naming the file and the type, never run.
- **One-line errors**: a truncated or corrupt file raises :class:`CheckpointError` (a ``UserError``: the CLI
  prints it as one line and exits 2).
"""

import io
import pickle
import re
import stat
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightscale.core.errors import UserError
from lightscale.core.files import atomic_file


class CheckpointError(UserError):
    """A checkpoint that cannot be written, read or used (names the file and what to do)."""


def _numpy_globals() -> list[Any]:
    """numpy arrays, scalars and dtypes: what user callbacks and DataModules commonly put into their state."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return []
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core to np._core
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8)]
    dtypes += [type(np.dtype(t)) for t in (np.uint64, np.uint32, np.uint16, np.uint8, np.bool_)]
    return [np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar, *dtypes]


def safe_globals() -> list[Any]:
    """The types, beyond torch's own allow-list, that a checkpoint may contain: plain data only."""
    import pathlib

    paths = [pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath]
    return [*paths, *_numpy_globals()]


def _refused_global(message: str) -> str | None:
    """The type torch's weights-only unpickler refused, from its (long, multi-line) message."""
    match = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", message) or re.search(
        r"but got <class '([\w.]+)'>", message
    )
    return match.group(1) if match else None


def safe_load(
    path: _PATH,
    map_location: Any = "cpu",
    mmap: bool = False,
    allow: Iterable[Any] = (),
) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with :func:`safe_globals` (plus ``allow``) allowed.

    Raises :class:`CheckpointError` (one line) when the file is missing, truncated, not a checkpoint, or
    holds pickled objects outside the allow-list.
    """
    path_str = str(path)
    fs = get_filesystem(path_str)
    if not fs.exists(path_str):
        raise CheckpointError(f"checkpoint {path_str} does not exist")
    if fs.isdir(path_str):
        raise CheckpointError(f"checkpoint {path_str} is a directory (a sharded checkpoint), not a file")
    try:
        with torch.serialization.safe_globals([*safe_globals(), *allow]):
            if _is_local(path_str):
                checkpoint = torch.load(path_str, map_location=map_location, weights_only=True, mmap=mmap)
            else:
                with fs.open(path_str, "rb") as f:
                    checkpoint = torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise _refuse(path_str, error) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, KeyError, AttributeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"checkpoint {path_str} is truncated or corrupt ({reason}); delete it or resume from another one"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{path_str} is not a Lightning checkpoint (it holds a {type(checkpoint).__name__}, not a dict)"
        )
    return checkpoint


SHARDED_META = "meta.pt"  # Lightning's file of everything but the tensors, inside a sharded checkpoint folder
SHARDED_INDEX = ".metadata"  # torch.distributed.checkpoint's index of the folder, a plain pickle
# What a torch.distributed.checkpoint index holds (torch 2.5 - 2.13): its own dataclasses, shapes, dtypes, paths.
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"LoadItemType", "WriteItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice", "complex"},
}


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles a torch.distributed.checkpoint index, refusing every global that is not plain metadata."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_GLOBALS.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unsupported GLOBAL {module}.{name}")


def _refuse(path: str, error: Exception) -> CheckpointError:
    name = _refused_global(str(error))
    what = f"the pickled object {name!r}" if name else "pickled objects"
    return CheckpointError(
        f"refused to load checkpoint {path}: it contains {what}, which could run code; weights-only "
        "loading accepts tensors and plain data. Only load checkpoints you trust (--weights_only false loads "
        "one anyway, running whatever it contains)"
    )


def read_sharded_index(folder: _PATH) -> Any:
    """The ``torch.distributed.checkpoint`` index (``.metadata``) of a sharded checkpoint folder, unpickled by a
    reader that knows only the index's own metadata classes (torch's reader uses plain ``pickle.load``)."""
    folder = Path(str(folder))
    index = folder / SHARDED_INDEX
    if not index.is_file():
        raise CheckpointError(f"sharded checkpoint {folder} has no {SHARDED_INDEX} file (an interrupted save)")
    try:
        with open(index, "rb") as file:
            metadata = _IndexUnpickler(file).load()
    except pickle.UnpicklingError as error:
        raise _refuse(str(index), error) from None
    except (EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError, OSError) as error:
        raise CheckpointError(f"checkpoint {index} is truncated or corrupt ({error}); delete the folder") from None
    entries = getattr(metadata, "state_dict_metadata", None)
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise CheckpointError(f"{index} is not a torch.distributed.checkpoint index")
    return metadata


def vet_sharded(folder: _PATH, allow: Iterable[Any] = ()) -> dict[str, Any]:
    """Check a sharded (``torch.distributed.checkpoint``) checkpoint folder without running any of its code, and
    return its Lightning metadata (``meta.pt``: loops, callbacks, hyper-parameters).

    ``torch.distributed.checkpoint`` reads the folder's index with a plain ``pickle.load`` and every non-tensor
    entry (optimizer settings, ...) with ``torch.load(weights_only=False)``: either can run code from a crafted
    file. Here the index is read by an unpickler that knows only its metadata classes, and each non-tensor entry
    is opened weights-only, before the strategy loads the folder; a refusal is one line naming the file.
    """
    folder = Path(str(folder))
    meta = safe_load(folder / SHARDED_META, allow=allow)
    index = folder / SHARDED_INDEX
    metadata = read_sharded_index(folder)
    entries, storage = metadata.state_dict_metadata, metadata.storage_data
    for where, info in storage.items():
        fqn = getattr(where, "fqn", None)
        if type(entries.get(fqn)).__name__ != "BytesStorageMetadata":
            continue  # tensors are read weights-only by torch itself
        relative = Path(str(getattr(info, "relative_path", "")))
        if relative.name != str(relative) or relative.name in ("", ".", ".."):
            raise CheckpointError(f"{index} points outside its folder ({relative}): refusing to load it")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(
                f"{index}: entry {fqn} is stored transformed ({info.transform_descriptors}); "
                "it cannot be checked before loading"
            )
        with open(folder / relative, "rb") as file:
            file.seek(int(info.offset))
            data = file.read(int(info.length))
        try:
            with torch.serialization.safe_globals([*safe_globals(), *allow]):
                torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise _refuse(f"{folder / relative} (entry {fqn})", error) from None
        except (RuntimeError, EOFError, ValueError, OSError) as error:
            raise CheckpointError(f"checkpoint {folder / relative} is truncated or corrupt ({error})") from None
    return meta


def open_checkpoint(path: _PATH, trusted: bool = False, allow: Iterable[Any] = ()) -> dict[str, Any]:
    """Everything but the tensors of a checkpoint file (memory-mapped) or sharded folder (its ``meta.pt``),
    opened without running code: :func:`safe_load` / :func:`vet_sharded`. ``trusted`` (``--weights_only false``)
    loads it with full pickle instead, which runs whatever it contains.

    Raises :class:`CheckpointError` (one line) for a missing path, or one that is neither a regular file nor a
    folder (a FIFO would block the reader forever).
    """
    path = Path(str(path))
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise CheckpointError(f"checkpoint {path} does not exist ({error.strerror or error})") from None
    if stat.S_ISDIR(mode):
        if trusted:
            return torch.load(path / SHARDED_META, map_location="cpu", weights_only=False)
        return vet_sharded(path, allow)
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"checkpoint {path} is not a regular file or a checkpoint folder (a pipe or device?)")
    if trusted:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({error})") from None
        if not isinstance(checkpoint, dict):
            raise CheckpointError(f"{path} is not a Lightning checkpoint (it holds a {type(checkpoint).__name__})")
        return checkpoint
    return safe_load(path, mmap=True, allow=allow)


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def atomic_save(checkpoint: Any, path: _PATH) -> None:
    """``torch.save`` streamed into a temporary file that replaces ``path`` once it is complete and on disk
    (:func:`~lightscale.core.files.atomic_file`): at every instant ``path`` is the old file or the new one."""
    with atomic_file(path, durable=True) as file:
        torch.save(checkpoint, file)


def _write_failure(error: BaseException) -> str:
    """Why a write failed: the ``OSError`` behind it (torch's zip writer reports a full disk as "[enforce fail at
    inline_container.cc] unexpected pos", with the ``OSError`` only as its context), else the error's first line."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen.strerror or str(seen)
        seen = seen.__cause__ or seen.__context__
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` plugin: atomic, fsync'd saves and weights-only loads (see module docstring).

    Args:
        allow: extra types a trusted checkpoint of yours needs beyond tensors and plain data (objects or
            ``"module.Name"`` strings), e.g. a custom dataclass stored by a callback.
    """

    def __init__(self, allow: list[str] | None = None) -> None:
        super().__init__()
        self.allow = list(allow or [])

    def _allowed(self) -> list[Any]:
        objects = []
        for item in self.allow:
            if isinstance(item, str):
                module, _, name = item.rpartition(".")
                objects.append(getattr(__import__(module, fromlist=[name]), name))
            else:
                objects.append(item)
        return objects

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote: fsspec's transaction
        try:
            atomic_save(checkpoint, str(path).removeprefix("file://"))
        except (OSError, RuntimeError) as error:
            raise CheckpointError(
                f"could not write checkpoint {path}: {_write_failure(error)}; the previous checkpoint is intact "
                "(free disk space or point run.root at another disk)"
            ) from None

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if weights_only is False:
            # Lightning passes False only when the caller asked for it explicitly (trusted file).
            return super().load_checkpoint(path, map_location=map_location, weights_only=False)
        if Path(str(path)).is_dir() and (Path(str(path)) / SHARDED_META).is_file():
            # a sharded checkpoint resumed by a strategy that does not shard (one device): consolidate it here
            from lightscale.resilience.export import load_sharded

            return load_sharded(path, allow=self._allowed())
        return safe_load(path, map_location=map_location, allow=self._allowed())
