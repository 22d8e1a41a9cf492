"""Pre-flight checks, run by the CLI before anything is built: mistakes that would otherwise surface minutes
later, deep in a traceback, or not at all (a precision silently replaced, a full disk at the first checkpoint).

Each failure is a :class:`~lightscale.core.errors.UserError`: one line naming the setting, what is wrong and what
to do; the CLI exits with code 2 before creating the run directory, so existing runs are untouched.
"""

import importlib
import netrc
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lightscale.cluster.launch import externally_launched, launcher_world_size
from lightscale.cluster.resources import plain, requested_devices
from lightscale.core.errors import UserError

GPU_ONLY_PRECISIONS = ("16", "16-mixed", "16-true", "transformer-engine", "transformer-engine-float16")
# A config key whose name says it holds a credential: ``api_key``, ``hf_token``, ``aws_secret_access_key``,
# ``private_key``, ``password``, ... (tokenizer settings such as ``pad_token`` name a token, not a secret).
_SECRET_KEY = re.compile(
    r"(^|[_.-])(api[_-]?key|apikey|secret|secret[_-]?(access[_-]?)?key|access[_-]?key|private[_-]?key|password|"
    r"passwd|passphrase|credentials?|token|auth[_-]?token|access[_-]?token)$",
    re.I,
)
_TOKENIZER_TOKENS = re.compile(r"^(pad|eos|bos|unk|sep|cls|mask|start|end)[_-]token$", re.I)
SECRET_ENV = ("WANDB_API_KEY",)
# Lightning loggers that need a package lightscale does not install: (module, ...) -> what to pip install.
LOGGER_PACKAGES = {
    "TensorBoardLogger": (("tensorboard", "tensorboardX"), "tensorboard"),
    "MLFlowLogger": (("mlflow",), "mlflow"),
    "CometLogger": (("comet_ml",), "comet-ml"),
    "NeptuneLogger": (("neptune",), "neptune"),
}


def uses_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def check_devices(trainer: Any) -> None:
    accelerator = str(plain(trainer.get("accelerator")) or "auto").lower()
    devices = trainer.get("devices", "auto")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is visible (torch.cuda.is_available() is False): "
            "use --trainer.accelerator cpu, or run on a GPU machine with a CUDA build of torch"
        )
    if uses_gpu(accelerator):
        available, kind = torch.cuda.device_count(), "GPU(s)"
    elif accelerator in ("cpu", "auto") and not externally_launched():
        available, kind = os.cpu_count() or 1, "CPU core(s)"
    else:
        return  # mps, tpu, custom accelerators (Lightning checks them); srun/torchrun start one process per device
    wanted = requested_devices(devices, available)
    if wanted is not None and wanted > available:
        raise UserError(
            f"trainer.devices={devices} asks for {wanted} {kind.split('(')[0]} device(s), but this machine has "
            f"{available} {kind}: lower --trainer.devices (or use auto)"
        )


def check_precision(trainer: Any) -> None:
    precision = str(trainer.get("precision") or "32-true")
    accelerator = str(plain(trainer.get("accelerator")) or "auto").lower()
    if uses_gpu(accelerator):
        if precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
            raise UserError(
                f"trainer.precision={precision} needs a GPU with bfloat16 support (Ampere or newer); this GPU has "
                "none: use --trainer.precision 16-mixed"
            )
        return
    if accelerator not in ("cpu", "auto"):
        return
    if precision in GPU_ONLY_PRECISIONS:
        raise UserError(
            f"trainer.precision={precision} is for CUDA GPUs (float16 / FP8 kernels), but this run uses the CPU: "
            "use --trainer.precision bf16-mixed or 32-true"
        )
    if precision.startswith("bf16"):
        try:
            a = torch.ones(2, 2, dtype=torch.bfloat16)
            (a @ a).sum().item()
        except RuntimeError:
            raise UserError(
                f"trainer.precision={precision}: this CPU or torch build cannot compute in bfloat16: "
                "use --trainer.precision 32-true"
            ) from None


def check_output_dir(run_dir: Path, min_free_gb: float) -> None:
    """The run directory can be created and written, and its disk has ``min_free_gb`` free."""
    existing = Path(os.path.abspath(run_dir))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(
            f"cannot create the run directory {run_dir}: {existing} is a file, not a directory "
            "(choose another --run.root or --run.dir)"
        )
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".lightscale-write-test-"):
            pass
    except OSError as error:
        raise UserError(
            f"cannot write the run directory {run_dir}: {existing} is not writable ({error.strerror or error}); "
            "choose another --run.root or fix the permissions"
        ) from None
    free_gb = shutil.disk_usage(existing).free / 1e9
    if free_gb < min_free_gb:
        raise UserError(
            f"only {free_gb:.2f} GB free on the disk of {existing}, less than run.min_free_gb={min_free_gb:g}: "
            "free some space, point --run.root at another disk, or lower --run.min_free_gb"
        )


def _walk(item: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(item, dict):
        for key, value in item.items():
            yield from _walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(item, (list, tuple)):
        for index, value in enumerate(item):
            yield from _walk(value, f"{path}[{index}]")
    else:
        yield path, item


def _stored_secrets() -> list[str]:
    """Credentials this machine holds (``WANDB_API_KEY``, every password in ``~/.netrc``): none of them may appear in
    a config, whatever its key is called."""
    secrets = [os.environ[name] for name in SECRET_ENV if len(os.environ.get(name, "")) >= 8]
    try:
        entries = netrc.netrc(os.environ.get("NETRC")).hosts.values()
    except (OSError, netrc.NetrcParseError):
        entries = []
    secrets += [password for _, _, password in entries if password and len(password) >= 8]
    return secrets


def check_no_secrets(config: dict[str, Any]) -> None:
    """Configs are saved with every run (config.yaml, W&B, checkpoints): refuse one that holds a credential."""
    secrets = _stored_secrets()
    for key, value in _walk(config):
        leaf = key.rsplit(".", 1)[-1].split("[", 1)[0]
        named_secret = _SECRET_KEY.search(leaf) and not _TOKENIZER_TOKENS.match(leaf)
        holds_secret = isinstance(value, str) and value and named_secret
        if holds_secret or (isinstance(value, str) and any(secret in value for secret in secrets)):
            raise UserError(
                f"{key}: configs are saved with the run, so they must not hold credentials; set WANDB_API_KEY in "
                "the environment or run `wandb login` (stored in ~/.netrc) instead"
            )


def check_launch(trainer: Any) -> None:
    """Under torchrun or srun, ``trainer.devices x trainer.num_nodes`` must be the number of processes started:
    otherwise each process trains alone (devices=1) or waits for ranks that never come."""
    launched = launcher_world_size()
    if launched is None:
        return
    launcher, processes = launched
    accelerator = str(plain(trainer.get("accelerator")) or "auto").lower()
    devices = trainer.get("devices", "auto")
    per_node = requested_devices(devices, 0)
    if per_node is None:  # auto: one CPU process per node, or every visible GPU
        per_node = torch.cuda.device_count() if uses_gpu(accelerator) else 1
    nodes = int(trainer.get("num_nodes") or 1)
    if per_node * nodes != processes:
        raise UserError(
            f"{launcher} started {processes} processes, but trainer.devices x trainer.num_nodes = {per_node} x {nodes}"
            f" = {per_node * nodes}: pass --trainer.devices <processes per node> and --trainer.num_nodes <nodes>"
        )


def check_loggers(trainer: Any) -> None:
    """Loggers that cannot start: a missing optional package, or W&B online without a key or a network."""
    from lightscale.tracking.wandb import WandbLogger, check_settings

    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        class_path = str(getattr(logger, "class_path", "") or "")
        name = class_path.rsplit(".", 1)[-1]
        if name in LOGGER_PACKAGES:
            modules, package = LOGGER_PACKAGES[name]
            if not any(_importable(module) for module in modules):
                raise UserError(f"trainer.logger {name} needs the {package} package: pip install {package}")
        if class_path in (f"{WandbLogger.__module__}.WandbLogger", "lightscale.loggers.WandbLogger"):
            init_args = getattr(logger, "init_args", None) or {}
            check_settings(init_args.get("mode"), init_args.get("init_kwargs"))


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def check_config(config: Any) -> None:
    """The checks that need only the parsed config of one subcommand (a jsonargparse Namespace)."""
    check_devices(config.trainer)
    check_launch(config.trainer)
    check_precision(config.trainer)
    check_loggers(config.trainer)
    check_no_secrets(config.as_dict() if hasattr(config, "as_dict") else dict(config))
