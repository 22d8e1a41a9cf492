"""What a SLURM job will start (nodes, tasks and GPUs per node), from an ``sbatch`` script's ``#SBATCH`` lines,
options or the allocation a command runs in; and whether a trainer config fits it.

Used by ``lightscale preflight`` before a job queues. Imports :mod:`lightscale.core` only.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightscale.core.errors import UserError


def tasks_per_node(env: dict[str, str] | None = None) -> int:
    """Tasks that ``srun`` starts on each node (``--ntasks-per-node``, else ``--ntasks`` / nodes)."""
    env = os.environ if env is None else env
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    ntasks, nodes = int(env.get("SLURM_NTASKS") or 1), int(env.get("SLURM_JOB_NUM_NODES") or 1)
    if ntasks % nodes:
        raise UserError(f"--ntasks={ntasks} does not split evenly over {nodes} nodes: use --ntasks-per-node")
    return ntasks // nodes


@dataclass
class Resources:
    """What SLURM will start: ``None`` where unknown."""

    nodes: int | None = None
    tasks_per_node: int | None = None
    gpus_per_node: int | None = None
    source: str = ""

    @property
    def known(self) -> bool:
        return self.nodes is not None or self.tasks_per_node is not None


def gpu_count(spec: str | None) -> int | None:
    """GPUs in a ``--gpus-per-node`` value or ``SLURM_GPUS_PER_NODE``: ``4``, ``a100:4``."""
    if spec is None or str(spec).strip() == "":
        return None
    count = str(spec).strip().rsplit(":", 1)[-1].split("(")[0]
    if not count.isdigit():
        raise UserError(f"--gpus-per-node={spec!r}: expected a number, optionally after a type (a100:4)")
    return int(count)


def gres_gpu_count(spec: str | None) -> int | None:
    """GPUs in a ``--gres`` value: ``gpu:4``, ``gpu:a100:4``, ``gpu`` (one), ``gpu:2,nvme:1``."""
    if spec is None:
        return None
    for item in str(spec).split(","):
        parts = item.strip().split(":")
        if parts[0] == "gpu":
            last = parts[-1].split("(")[0]
            return int(last) if len(parts) > 1 and last.isdigit() else 1
    return 0


GPU_MEMORY_GB = {"h100": 80, "h200": 141, "b200": 180, "l40s": 48, "l40": 48, "a10": 24, "a10g": 24}


def gpu_memory_gb(spec: str | None) -> float | None:
    """Memory of the GPU type a ``--gpus-per-node`` / ``--gres`` value names (``h100:4``, ``gpu:a100_80gb:8``), when the
    name says it unambiguously: a size in the name (``80gb``), else a type with one size (:data:`GPU_MEMORY_GB`;
    not A100 or V100, which come in two)."""
    for item in str(spec or "").lower().split(","):
        parts = [part for part in item.strip().split(":") if part and part != "gpu" and not part.isdigit()]
        for part in parts:
            sized = re.search(r"(\d+)\s*g(?:b)?(?:$|[^a-z])", part)
            if sized:
                return float(sized.group(1))
            for name, size in GPU_MEMORY_GB.items():
                if re.search(rf"(^|[^a-z0-9]){name}($|[^a-z0-9])", part):
                    return float(size)
    return None


def sbatch_options(path: str | Path) -> dict[str, str]:
    """``--long-option -> value`` from a batch script's ``#SBATCH`` lines (SLURM stops reading them at the first
    line that is neither blank nor a comment)."""
    options: dict[str, str] = {}
    short = {"-N": "--nodes", "-n": "--ntasks", "-G": "--gpus", "-c": "--cpus-per-task", "-t": "--time"}
    for line in Path(path).read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        if not stripped.startswith("#SBATCH"):
            continue
        tokens = shlex.split(stripped[len("#SBATCH") :], comments=True)
        i = 0
        while i < len(tokens):
            token = tokens[i]
            if token.startswith("--") and "=" in token:
                key, _, value = token.partition("=")
                options[key] = value
            elif token in short or token.startswith("--"):
                has_value = i + 1 < len(tokens) and not tokens[i + 1].startswith("-")
                options[short.get(token, token)] = tokens[i + 1] if has_value else ""
                i += has_value
            i += 1
    return options


def _int(value: str | None, what: str) -> int | None:
    if value is None or value == "":
        return None
    match = re.fullmatch(r"(\d+)(-\d+)?", str(value).strip())
    if not match:
        raise UserError(f"{what}={value!r} is not a number")
    return int(match.group(1))


def resolve_resources(options: dict[str, str], env: dict[str, str] | None = None) -> Resources:
    """Resources from ``--sbatch`` header + explicit options (later wins), else from the current allocation."""
    env = os.environ if env is None else env
    if not any(key in options for key in ("--nodes", "--ntasks-per-node", "--ntasks")) and env.get("SLURM_JOB_ID"):
        return Resources(
            nodes=_int(env.get("SLURM_JOB_NUM_NODES"), "SLURM_JOB_NUM_NODES"),
            tasks_per_node=tasks_per_node(env),
            gpus_per_node=gpu_count(env.get("SLURM_GPUS_PER_NODE")),
            source=f"SLURM job {env['SLURM_JOB_ID']}",
        )
    if not options:
        return Resources()
    nodes = _int(options.get("--nodes"), "--nodes") or 1
    tasks = _int(options.get("--ntasks-per-node"), "--ntasks-per-node")
    if tasks is None and options.get("--ntasks"):
        total = _int(options["--ntasks"], "--ntasks") or 1
        if total % nodes:
            raise UserError(f"--ntasks={total} does not split evenly over --nodes={nodes}: use --ntasks-per-node")
        tasks = total // nodes
    gpus = gpu_count(options.get("--gpus-per-node"))
    if gpus is None and options.get("--gres"):
        gpus = gres_gpu_count(options["--gres"])
    if gpus is None and options.get("--gpus"):
        gpus = (gpu_count(options["--gpus"]) or 0) // nodes
    return Resources(nodes=nodes, tasks_per_node=tasks or 1, gpus_per_node=gpus, source=options.get("_source", ""))


# ------------------------------------------------------------------------------------- config vs resources
def plain(item: Any) -> Any:
    """A config value that may be a class_path namespace (``trainer.accelerator``, ``trainer.strategy``)."""
    return getattr(item, "class_path", item) if item is not None and not isinstance(item, (str, int, list)) else item


def requested_devices(devices: Any, available: int) -> int | None:
    """Number of devices a ``trainer.devices`` value asks for (``None`` for auto / all)."""
    if devices is None or devices in ("auto", -1, "-1"):
        return None
    if isinstance(devices, int):
        return devices
    if isinstance(devices, (list, tuple)):
        return max(len(devices), max((int(d) + 1 for d in devices), default=0))
    text = str(devices).strip()
    if text.lstrip("-").isdigit():
        return None if int(text) == -1 else int(text)
    ids = [int(d) for d in text.split(",") if d.strip()]  # "0,1" selects GPUs by index
    return max(len(ids), max((i + 1 for i in ids), default=0))


def resolve_accelerator(accelerator: Any, resources: Resources) -> str:
    name = str(plain(accelerator) or "auto").lower().rsplit(".", 1)[-1]
    name = {"cudaaccelerator": "gpu", "cuda": "gpu", "cpuaccelerator": "cpu"}.get(name, name)
    if name == "auto":
        if resources.gpus_per_node is not None:
            return "gpu" if resources.gpus_per_node > 0 else "cpu"
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    return name


def devices_per_node(devices: Any, accelerator: str, resources: Resources) -> int | None:
    """How many processes per node ``trainer.devices`` asks for (``None``: unknown here)."""
    wanted = requested_devices(devices, 0)
    if wanted is not None:
        return wanted
    if accelerator == "cpu":
        return 1  # Lightning's "auto" on CPU is one process
    return resources.gpus_per_node


def check_launch(trainer: Any, resources: Resources) -> list[str]:
    """Errors (raised) and warnings (returned) for the trainer settings against what SLURM starts."""
    accelerator = resolve_accelerator(trainer.get("accelerator"), resources)
    devices = devices_per_node(trainer.get("devices", "auto"), accelerator, resources)
    num_nodes = int(trainer.get("num_nodes") or 1)
    warnings: list[str] = []
    if resources.known:
        tasks, nodes, gpus = resources.tasks_per_node, resources.nodes, resources.gpus_per_node
        if gpus is not None and gpus > 0 and tasks != gpus:
            raise UserError(
                f"SLURM starts {tasks} task(s) per node (--ntasks-per-node) but gives {gpus} GPU(s) per node "
                f"(--gpus-per-node / --gres): Lightning runs one task per GPU, so set --ntasks-per-node={gpus}"
            )
        if accelerator == "gpu" and gpus == 0:
            raise UserError(
                f"trainer.accelerator={accelerator} but the job requests no GPUs: add --gpus-per-node "
                "(or --gres=gpu:N), or use --trainer.accelerator cpu"
            )
        if devices is not None and devices != tasks:
            raise UserError(
                f"trainer.devices={trainer.get('devices')} ({devices} per node) but SLURM starts --ntasks-per-node="
                f"{tasks}: they must be equal or the job hangs or fails at start-up (slurm/train.sbatch sets "
                "trainer.devices from SLURM; in your own script pass --trainer.devices $SLURM_NTASKS_PER_NODE)"
            )
        if nodes is not None and num_nodes != nodes:
            raise UserError(
                f"trainer.num_nodes={num_nodes} but SLURM allocates --nodes={nodes}: they must be equal "
                "(slurm/train.sbatch passes --trainer.num_nodes $SLURM_JOB_NUM_NODES)"
            )
        if accelerator == "cpu" and gpus:
            warnings.append(f"the job requests {gpus} GPU(s) per node but trains on the CPU")
    world = num_nodes * (devices or 1)
    strategy = trainer.get("strategy")
    init_args = getattr(strategy, "init_args", None) or {}
    dp, tp = init_args.get("data_parallel_size", "auto"), init_args.get("tensor_parallel_size", "auto")
    if "ModelParallel" in str(plain(strategy)) and isinstance(dp, int) and isinstance(tp, int) and dp * tp != world:
        raise UserError(
            f"trainer.strategy ModelParallelStrategy: data_parallel_size={dp} x tensor_parallel_size={tp} must "
            f"equal the number of processes, {world} (num_nodes x devices)"
        )
    return warnings


# ----------------------------------------------------------------------------------------------- memory
def state_bytes_per_param(precision: Any) -> int:
    """Weights + gradients + AdamW's two moments: fp32 (also for ``*-mixed``) 16 bytes, ``*-true`` half 8."""
    text = str(precision or "32-true")
    return 8 if text in ("bf16-true", "16-true", "bf16", "16") else 16
