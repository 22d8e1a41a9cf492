"""``lightscale export RUN_DIR_OR_CKPT [--out DIR]``: a trained model as files that load anywhere, without
lightscale, a process group or the hardware it was trained on.

The export folder holds:

- ``model.ckpt``: one consolidated Lightning checkpoint (weights, optimizer, loops, hyper-parameters), loadable
  by ``lightscale validate|test|predict --ckpt_path`` on one process and by ``Model.load_from_checkpoint``; it
  keeps the optimizer (keyed by position, as ``torch.optim`` saves it) and loops, so one process can resume it.
- ``model.safetensors``: the weights of the model's ``net`` (keys as in ``net.state_dict()``); safetensors holds
  no code, so it is the file to hand to other people and tools. Tied weights (GPT's head and token embedding)
  are stored under both names as separate copies: safetensors refuses shared tensors, and with both names
  ``net.load_state_dict(safetensors.torch.load_file(path))`` works strictly, re-tying by copy.
- ``architecture.json``: the model class and its saved hyper-parameters (and, for a GPT, the ``GPTConfig``
  fields), to build the ``net`` without lightscale's CLI; ``config.yaml``: the run's full config, when known.

Sources: a run directory (its best checkpoint per ``summary.json``, else ``checkpoints/last.ckpt``, else the
newest), a single-file checkpoint, or a sharded ``torch.distributed.checkpoint`` folder (ModelParallelStrategy
with ``save_distributed_checkpoint: true``). A sharded folder is vetted first (:func:`vet_sharded`) and its
entries are then read with an index reader and a weights-only unpickler of our own: torch's default reader
unpickles the index and every non-tensor entry with full pickle, i.e. would run code from a crafted folder.

The export is written into a temporary folder beside the target and renamed into place when complete: a
failure or a kill leaves no half-written export under the final name. An existing target is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import secrets
import shutil
import sys
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from lightscale.core.errors import UserError
from lightscale.core.files import fsync_dir
from lightscale.resilience.checkpoint_io import (
    SHARDED_META,
    CheckpointError,
    atomic_save,
    open_checkpoint,
    read_sharded_index,
    safe_globals,
    vet_sharded,
)

CHECKPOINT_FILE = "model.ckpt"
WEIGHTS_FILE = "model.safetensors"
ARCHITECTURE_FILE = "architecture.json"
CONFIG_FILE = "config.yaml"
NET_PREFIX = "net."  # the plain nn.Module inside a LightningModule, by this template's convention
GPT_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias")


# --------------------------------------------------------------------------------- consolidating a sharded folder
def _set_path(root: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    """``root[path[0]][path[1]]... = value``, creating dicts (and lists, for integer keys) on the way: the inverse
    of how ``torch.distributed.checkpoint`` flattens nested state (its ``planner_data``)."""
    node: Any = root
    for key, following in itertools.pairwise(path):
        empty: Any = [] if isinstance(following, int) else {}
        if isinstance(node, list):
            node.extend([None] * (key + 1 - len(node)))
            if node[key] is None:
                node[key] = empty
        elif key not in node:
            node[key] = empty
        node = node[key]
    last = path[-1]
    if isinstance(node, list):
        node.extend([None] * (last + 1 - len(node)))
    node[last] = value


def optimizer_state_by_ids(state: Mapping[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter names (what ``get_optimizer_state_dict`` saves in a sharded
    checkpoint) re-keyed by position, as ``torch.optim.Optimizer.load_state_dict`` and single-process
    strategies expect: parameters are numbered in the order of the parameter groups."""
    ids: dict[Any, int] = {}
    groups = []
    for group in state.get("param_groups", []):
        params = [ids.setdefault(name, len(ids)) for name in group.get("params", [])]
        groups.append({**group, "params": params})
    per_param = {ids.get(name, name): value for name, value in (state.get("state") or {}).items()}
    return {"state": per_param, "param_groups": groups}


def load_sharded(folder: str | Path, allow: Iterable[Any] = ()) -> dict[str, Any]:
    """The whole checkpoint in a sharded ``torch.distributed.checkpoint`` folder as one Lightning checkpoint
    dict (``state_dict`` with full tensors, ``optimizer_states`` keyed by position, and ``meta.pt``'s loops,
    callbacks, hyper-parameters), read in this process without a process group and without running code.

    Raises :class:`CheckpointError` (one line) for a folder that is damaged or that carries pickled objects.
    """
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta, TensorStorageMetadata

    folder = Path(folder)
    meta = vet_sharded(folder, allow)
    metadata = read_sharded_index(folder)
    allowed = [*safe_globals(), *allow]

    class VettedReader(FileSystemReader):
        """Serves the index read by our restricted unpickler instead of unpickling it again with full pickle."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        """Reads non-tensor entries (optimizer settings, ...) weights-only, not with ``weights_only=False``."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            with torch.serialization.safe_globals(allowed):
                self.state_dict[read_item.dest_index.fqn] = torch.load(value, map_location="cpu", weights_only=True)

    flat: dict[str, Any] = {}
    for fqn, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            flat[fqn] = torch.empty(entry.size, dtype=entry.properties.dtype)
        elif isinstance(entry, BytesStorageMetadata):
            flat[fqn] = None
    planner = WeightsOnlyPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
    try:
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
            warnings.simplefilter("ignore", UserWarning)
            load(flat, storage_reader=VettedReader(folder), planner=planner, no_dist=True)
        flat = planner.state_dict  # load() hands the planner a copy of ``flat``; the entries were read into it
    except Exception as error:  # torch wraps every reader failure (truncated shard, ...) in a CheckpointException
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if "UnpicklingError" in str(error) or "weights_only" in str(error):
            reason = "it contains pickled objects, which could run code"
        raise CheckpointError(f"could not read sharded checkpoint {folder}: {reason[:300]}") from None
    nested: dict[str, Any] = {}
    paths = getattr(metadata, "planner_data", None) or {}
    for fqn, value in flat.items():
        _set_path(nested, tuple(paths.get(fqn) or (fqn,)), value)
    checkpoint = {**meta, **{k: v for k, v in nested.items() if not k.startswith("optimizer_")}}
    optimizers = sorted((k for k in nested if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[-1]))
    if optimizers:
        checkpoint["optimizer_states"] = [optimizer_state_by_ids(nested[k]) for k in optimizers]
    return checkpoint


# --------------------------------------------------------------------------------------------- the source
def checkpoint_of_run(run_dir: Path) -> Path:
    """The checkpoint a run directory exports: its best (``summary.json``), else ``last.ckpt``, else the
    newest checkpoint in ``checkpoints/``."""
    from lightscale.resilience.resume import find_candidates

    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        best = json.loads((run_dir / "summary.json").read_text()).get("best", {}).get("checkpoint")
        if best and (run_dir / best).exists():
            return run_dir / best
    if (run_dir / "checkpoints" / "last.ckpt").exists():
        return run_dir / "checkpoints" / "last.ckpt"
    candidates = find_candidates(run_dir)
    if not candidates:
        raise CheckpointError(f"{run_dir} holds no checkpoint (looked for summary.json's best and checkpoints/)")
    return candidates[0].path


def resolve_source(source: str | Path) -> tuple[Path, Path | None]:
    """``(checkpoint, run_dir)`` for a run directory, checkpoint file or sharded folder (``run_dir`` is the run
    the checkpoint belongs to, if it is inside one: its config.yaml goes along)."""
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (give a run directory, a .ckpt file or a sharded folder)")
    if path.is_dir() and not (path / SHARDED_META).exists() and not (path / ".metadata").exists():
        return checkpoint_of_run(path), path
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return path, run_dir if (run_dir / CONFIG_FILE).is_file() else None


def load_any(path: Path, allow: Iterable[Any] = ()) -> dict[str, Any]:
    """A checkpoint file or sharded folder as one Lightning checkpoint dict, opened without running code."""
    if path.is_dir():
        return load_sharded(path, allow)
    checkpoint = open_checkpoint(path, allow=allow)
    if not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it has no state_dict)")
    return checkpoint


# ----------------------------------------------------------------------------------------------- the files
def net_state_dict(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The ``net`` sub-module's weights (``net.`` prefix and ``torch.compile``'s ``_orig_mod.`` removed), as
    separate contiguous CPU tensors; the whole module's when it has no ``net``."""
    tensors = {k.replace("_orig_mod.", ""): v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith(NET_PREFIX) for k in tensors):
        tensors = {k[len(NET_PREFIX) :]: v for k, v in tensors.items() if k.startswith(NET_PREFIX)}
    # clone: tied weights share storage, which safetensors refuses; a copy under each name loads strictly
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def _plain(value: Any) -> Any:
    """JSON-safe: numbers, strings, lists and dicts as they are, anything else (callables, ...) as its repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


def architecture(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """What builds the net again: the model class, its saved hyper-parameters and, for a GPT, its config."""
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    info: dict[str, Any] = {
        "model_class": hparams.pop("_class_path", None),
        "hyper_parameters": _plain({k: v for k, v in hparams.items() if not k.startswith("_")}),
        "weights": WEIGHTS_FILE,
        "weights_keys": "net.state_dict()" if _has_net(checkpoint) else "model.state_dict()",
        "global_step": checkpoint.get("global_step"),
        "epoch": checkpoint.get("epoch"),
        "lightning_version": checkpoint.get("pytorch-lightning_version"),
    }
    if all(field in hparams for field in GPT_FIELDS):
        info["net_class"] = "lightscale.nets.gpt.GPT"
        info["gpt_config"] = {field: hparams[field] for field in GPT_FIELDS}
    return info


def _has_net(checkpoint: Mapping[str, Any]) -> bool:
    return any(str(k).replace("_orig_mod.", "").startswith(NET_PREFIX) for k in checkpoint.get("state_dict", {}))


def write_export(checkpoint: dict[str, Any], folder: Path, config: Path | None = None) -> None:
    """The export's files (see module docstring) into ``folder``, which exists and is empty."""
    from safetensors.torch import save_file

    atomic_save(checkpoint, folder / CHECKPOINT_FILE)
    info = architecture(checkpoint)
    metadata = {"format": "pt", "model_class": str(info["model_class"]), "keys": info["weights_keys"]}
    save_file(net_state_dict(checkpoint["state_dict"]), str(folder / WEIGHTS_FILE), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder / WEIGHTS_FILE, 0o666 & ~umask)  # safetensors creates it 0600; readable like the other files
    (folder / ARCHITECTURE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if config is not None:
        shutil.copyfile(config, folder / CONFIG_FILE)


def default_out(checkpoint: Path, run_dir: Path | None, source: Path) -> Path:
    """``RUN_DIR/export`` for a run directory, else ``<checkpoint>.export`` beside the checkpoint."""
    if source.is_dir() and run_dir == source:
        return run_dir / "export"
    return checkpoint.parent / f"{checkpoint.name.removesuffix('.ckpt')}.export"


def export(source: str | Path, out: str | Path | None = None, allow: Iterable[Any] = ()) -> Path:
    """Export ``source`` (run directory, checkpoint file or sharded folder) into ``out``; returns ``out``.

    Refused with :class:`CheckpointError` / :class:`UserError` (one line each): a missing source, a damaged or
    code-carrying checkpoint, an ``out`` that exists. Nothing appears under ``out`` unless it is complete.
    """
    checkpoint_path, run_dir = resolve_source(source)
    target = Path(out) if out is not None else default_out(checkpoint_path, run_dir, Path(source))
    if target.exists() or target.is_symlink():
        raise UserError(f"export folder {target} already exists; remove it or pass another --out")
    checkpoint = load_any(checkpoint_path, allow)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    staging.mkdir()
    try:
        config = run_dir / CONFIG_FILE if run_dir is not None and (run_dir / CONFIG_FILE).is_file() else None
        write_export(checkpoint, staging, config)
        fsync_dir(staging)
        if target.exists():  # appeared while we wrote
            raise UserError(f"export folder {target} already exists; remove it or pass another --out")
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(target.parent)
    return target


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lightscale export",
        description="Write a checkpoint as model.ckpt (one file), model.safetensors and architecture.json.",
    )
    parser.add_argument("source", type=Path, help="a run directory, a .ckpt file or a sharded checkpoint folder")
    parser.add_argument("--out", type=Path, default=None, help="the export folder (default: RUN_DIR/export)")
    options = parser.parse_args(args)
    try:
        target = export(options.source, options.out)
    except UserError as error:
        print(f"lightscale: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"lightscale: exported to {target} ({CHECKPOINT_FILE}, {WEIGHTS_FILE}, {ARCHITECTURE_FILE})")
