"""Read back a W&B *offline* run so tests can prove what was really logged.

wandb 0.31 ships no Python reader for its ``.wandb`` transaction log (the old
``wandb.sdk.internal.datastore`` and ``wandb sync --view`` are gone; the writer lives in the Go
``wandb-core`` binary), and offline runs write no ``config.yaml`` / ``wandb-summary.json``. So we parse
the file ourselves. The format is LevelDB's log format with plain CRC-32:

* a 7-byte file header: ``b":W&B"``, magic ``0xBEE1`` (u16 little-endian), version byte ``0``;
* the file is cut into 32 KiB blocks (the header counts towards block 0); each chunk is
  ``<crc32 u32><length u16><type u8>`` + payload, with ``crc32 = zlib.crc32(type_byte + payload)``;
* a chunk never crosses a block boundary: a record is split into FIRST/MIDDLE.../LAST chunks, and a block
  tail shorter than a chunk header is zero padding;
* every reassembled record is a serialized ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

__all__ = [
    "BLOCK_SIZE",
    "Chunk",
    "CorruptWandbFileError",
    "OfflineRun",
    "find_offline_runs",
    "iter_chunks",
    "iter_records",
    "read_offline_run",
]

FILE_HEADER = struct.Struct("<4sHB")
FILE_MAGIC = b":W&B"
FILE_MAGIC_NUMBER = 0xBEE1
FILE_VERSION = 0
BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = struct.Struct("<IHB")

ZERO, FULL, FIRST, MIDDLE, LAST = 0, 1, 2, 3, 4
CHUNK_TYPE_NAMES = {ZERO: "ZERO", FULL: "FULL", FIRST: "FIRST", MIDDLE: "MIDDLE", LAST: "LAST"}

INTERNAL_KEY = "_wandb"


class CorruptWandbFileError(ValueError):
    """The ``.wandb`` file is not a well-formed transaction log (bad header, crc, framing or truncation)."""


@dataclass(frozen=True)
class Chunk:
    """One framed piece of a record, as laid out in the file (exposed so tests can check the framing)."""

    offset: int
    type: int
    payload: bytes


@dataclass
class OfflineRun:
    """What an offline run logged, reassembled from its ``.wandb`` file."""

    run_dir: Path
    wandb_file: Path
    run_id: str = ""
    project: str = ""
    entity: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    notes: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    """User config, nested, with wandb's own ``_wandb`` entry moved to :attr:`config_wandb`."""
    config_wandb: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    """One dict per logged step (incl. wandb's ``_step``, ``_runtime``, ``_timestamp``), values decoded."""
    summary: dict[str, Any] = field(default_factory=dict)
    """Final summary after every update/remove, with the ``_wandb`` entry moved to :attr:`summary_wandb`."""
    summary_wandb: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    """Paths (relative to the run's ``files/`` dir) that ``files`` records name, in first-seen order."""
    exit_code: int | None = None
    """From the exit record; ``None`` when the run never finished (crashed or still running)."""
    record_counts: Counter[str] = field(default_factory=Counter)

    def metric(self, key: str) -> list[tuple[int, Any]]:
        """``(step, value)`` for every history row that has the (flat, e.g. ``"train/loss"``) ``key``."""
        return [(row["_step"], row[key]) for row in self.history if key in row]


def find_offline_runs(root: str | Path) -> list[Path]:
    """All ``offline-run-*`` directories under ``root`` (recursively), sorted by name, i.e. by start time."""
    root = Path(root)
    found = {p for p in root.rglob("offline-run-*") if p.is_dir() and not p.is_symlink()}
    if root.name.startswith("offline-run-") and root.is_dir():
        found.add(root)
    return sorted(found, key=lambda p: (p.name, str(p)))


def _wandb_file(run: Path) -> Path:
    if run.is_file():
        return run
    candidates = sorted(run.glob("run-*.wandb"))
    if len(candidates) != 1:
        names = [c.name for c in candidates]
        raise FileNotFoundError(f"expected exactly one run-*.wandb in {run}, found {names}")
    return candidates[0]


def iter_chunks(wandb_file: str | Path, *, allow_truncated_tail: bool = False) -> Iterator[Chunk]:
    """Yield every chunk after checking the file header and each chunk's crc.

    ``allow_truncated_tail`` tolerates a half-written last chunk (a run that is still writing or was killed
    mid-write); otherwise any truncation raises :class:`CorruptWandbFileError`.
    """
    data = Path(wandb_file).read_bytes()
    if len(data) < FILE_HEADER.size:
        raise CorruptWandbFileError(f"{wandb_file}: {len(data)} bytes, shorter than the file header")
    magic, magic_number, version = FILE_HEADER.unpack_from(data, 0)
    if magic != FILE_MAGIC or magic_number != FILE_MAGIC_NUMBER or version != FILE_VERSION:
        raise CorruptWandbFileError(
            f"{wandb_file}: bad header {data[: FILE_HEADER.size]!r} (want :W&B, 0xBEE1, version 0)"
        )
    pos = FILE_HEADER.size
    end = len(data)
    while pos < end:
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER.size:
            pos += left_in_block  # block trailer: zero padding
            continue
        if end - pos < CHUNK_HEADER.size:
            if not any(data[pos:]):
                return  # zero padding at the very end
            if allow_truncated_tail:
                return
            raise CorruptWandbFileError(f"{wandb_file}: truncated chunk header at offset {pos}")
        crc, length, ctype = CHUNK_HEADER.unpack_from(data, pos)
        if ctype == ZERO and length == 0 and crc == 0:
            pos += left_in_block  # preallocated / padded rest of block
            continue
        if CHUNK_HEADER.size + length > left_in_block:
            raise CorruptWandbFileError(
                f"{wandb_file}: chunk at offset {pos} (length {length}) crosses a block boundary"
            )
        start = pos + CHUNK_HEADER.size
        payload = data[start : start + length]
        if len(payload) < length:
            if allow_truncated_tail:
                return
            raise CorruptWandbFileError(f"{wandb_file}: truncated chunk payload at offset {pos}")
        if zlib.crc32(bytes([ctype]) + payload) != crc:
            raise CorruptWandbFileError(f"{wandb_file}: crc mismatch in chunk at offset {pos}")
        if ctype not in (FULL, FIRST, MIDDLE, LAST):
            raise CorruptWandbFileError(f"{wandb_file}: unknown chunk type {ctype} at offset {pos}")
        yield Chunk(offset=pos, type=ctype, payload=payload)
        pos = start + length


def iter_records(wandb_file: str | Path, *, allow_truncated_tail: bool = False) -> Iterator[pb.Record]:
    """Reassemble chunks into records and decode each as a ``wandb_internal_pb2.Record``."""
    pending: list[bytes] | None = None
    for chunk in iter_chunks(wandb_file, allow_truncated_tail=allow_truncated_tail):
        name = CHUNK_TYPE_NAMES[chunk.type]
        if chunk.type in (FULL, FIRST) and pending is not None:
            raise CorruptWandbFileError(f"{wandb_file}: {name} chunk at {chunk.offset} inside a split record")
        if chunk.type == FULL:
            payload = chunk.payload
        elif chunk.type == FIRST:
            pending = [chunk.payload]
            continue
        else:
            if pending is None:
                raise CorruptWandbFileError(f"{wandb_file}: {name} chunk at {chunk.offset} without a FIRST")
            pending.append(chunk.payload)
            if chunk.type == MIDDLE:
                continue
            payload, pending = b"".join(pending), None
        record = pb.Record()
        record.ParseFromString(payload)
        yield record
    if pending is not None and not allow_truncated_tail:
        raise CorruptWandbFileError(f"{wandb_file}: file ends inside a split record")


def _path(item: Any) -> list[str]:
    """A config/summary/history item names its target by ``key`` or by a ``nested_key`` path."""
    path = list(item.nested_key) or [item.key]
    if not path or path == [""]:
        raise CorruptWandbFileError(f"item without key: {item}")
    return path


def _set(target: dict[str, Any], path: Sequence[str], value: Any) -> None:
    for part in path[:-1]:
        child = target.get(part)
        if not isinstance(child, dict):
            child = target[part] = {}
        target = child
    target[path[-1]] = value


def _remove(target: dict[str, Any], path: Sequence[str]) -> None:
    for part in path[:-1]:
        target = target.get(part)
        if not isinstance(target, dict):
            return
    target.pop(path[-1], None)


def _history_value(item: pb.HistoryItem) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    kind = item.WhichOneof("value")
    if kind is None or kind == "none":
        return None
    if kind == "json":
        return json.loads(item.json)
    return getattr(item, kind)


def _split_internal(tree: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    tree = dict(tree)
    internal = tree.pop(INTERNAL_KEY, {})
    return tree, internal if isinstance(internal, dict) else {"value": internal}


def read_offline_run(run_dir: str | Path, *, allow_truncated_tail: bool = False) -> OfflineRun:
    """Replay an offline run's ``.wandb`` file (``run_dir`` may also be the file itself)."""
    run_dir = Path(run_dir)
    wandb_file = _wandb_file(run_dir)
    run = OfflineRun(run_dir=run_dir if run_dir.is_dir() else run_dir.parent, wandb_file=wandb_file)
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    files: dict[str, None] = {}

    def apply(target: dict[str, Any], rec: pb.ConfigRecord | pb.SummaryRecord) -> None:
        for item in rec.update:
            _set(target, _path(item), json.loads(item.value_json))
        for item in rec.remove:
            _remove(target, _path(item))

    for record in iter_records(wandb_file, allow_truncated_tail=allow_truncated_tail):
        kind = record.WhichOneof("record_type")
        run.record_counts[kind or "<none>"] += 1
        if kind == "run":
            r = record.run
            # A resumed run sends another run record; later non-empty fields win.
            for attr, value in (
                ("run_id", r.run_id),
                ("project", r.project),
                ("entity", r.entity),
                ("name", r.display_name),
                ("group", r.run_group),
                ("job_type", r.job_type),
                ("notes", r.notes),
            ):
                if value:
                    setattr(run, attr, value)
            if r.tags:
                run.tags = list(r.tags)
            apply(config, r.config)
            apply(summary, r.summary)
        elif kind == "config":
            apply(config, record.config)
        elif kind == "summary":
            apply(summary, record.summary)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set(row, _path(item), _history_value(item))
            if "_step" not in row and record.history.HasField("step"):
                row["_step"] = record.history.step.num
            run.history.append(row)
        elif kind == "files":
            for f in record.files.files:
                files.setdefault(f.path, None)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code

    run.config, run.config_wandb = _split_internal(config)
    run.summary, run.summary_wandb = _split_internal(summary)
    run.files = list(files)
    return run
