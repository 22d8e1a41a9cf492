"""``lightscale preflight``: fail at submit time what would otherwise fail at minute one of a queued job.

    lightscale preflight [--sbatch slurm/train.sbatch] [--nodes N] [--ntasks-per-node T] [--gpus-per-node G]
                         [--from-slurm] [--sweep FILE] [--gpu-mem-gb GB] [--step | --no-step]
                         --config CONFIG [overrides]

Runs on a login node (no GPU needed) in a few seconds:

1. parses the config exactly as ``lightscale fit`` does (a bad key or value is the first error);
2. checks that SLURM's nodes / tasks per node / GPUs per node agree with ``trainer.num_nodes`` /
   ``trainer.devices`` / the strategy (a mismatch hangs or crashes a multi-node job after the queue wait);
   resources come from the options above, the ``#SBATCH`` header of ``--sbatch``, or the allocation it runs in;
   ``--from-slurm`` first sets ``trainer.num_nodes`` / ``trainer.devices`` from them, as ``slurm/train.sbatch`` does;
3. builds the model on the meta device (no memory, any size): parameter count and the training state per
   device for DDP and for FSDP;
4. builds the data and, for models up to 20M parameters, runs one training and one validation batch on the
   CPU (``--no-step`` skips it, ``--step`` forces it); otherwise loads one batch;
5. with ``--sweep``, parses every point of the sweep.

It prints one summary, or one line with the first error and exits 2. ``slurm/submit.sh`` runs it before
``sbatch``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightscale.errors import UserError

STEP_MAX_PARAMS = 20_000_000
USAGE = (
    "usage: lightscale preflight [--sbatch FILE] [--nodes N] [--ntasks-per-node T] [--gpus-per-node G] "
    "[--from-slurm] [--sweep FILE] [--gpu-mem-gb GB] [--step|--no-step] --config CONFIG [overrides]"
)
_RESOURCE_OPTIONS = ("--nodes", "--ntasks-per-node", "--ntasks", "--gpus-per-node", "--gres")
_VALUE_OPTIONS = ("--sbatch", *_RESOURCE_OPTIONS, "--sweep", "--gpu-mem-gb")
_FLAG_OPTIONS = ("--step", "--no-step", "--from-slurm")


# --------------------------------------------------------------------------------------------- resources
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
        from lightscale.slurm import tasks_per_node

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
def _plain(item: Any) -> Any:
    """A config value that may be a class_path namespace."""
    return getattr(item, "class_path", item) if item is not None and not isinstance(item, (str, int, list)) else item


def resolve_accelerator(accelerator: Any, resources: Resources) -> str:
    name = str(_plain(accelerator) or "auto").lower().rsplit(".", 1)[-1]
    name = {"cudaaccelerator": "gpu", "cuda": "gpu", "cpuaccelerator": "cpu"}.get(name, name)
    if name == "auto":
        if resources.gpus_per_node is not None:
            return "gpu" if resources.gpus_per_node > 0 else "cpu"
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    return name


def devices_per_node(devices: Any, accelerator: str, resources: Resources) -> int | None:
    """How many processes per node ``trainer.devices`` asks for (``None``: unknown here)."""
    from lightscale.checks import requested_devices

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
    if "ModelParallel" in str(_plain(strategy)) and isinstance(dp, int) and isinstance(tp, int) and dp * tp != world:
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


def _gb(value: float) -> str:
    return f"{value / 1e9:.2f} GB"


def _count(value: int) -> str:
    return f"{value / 1e6:.2f} M" if value >= 1e5 else str(value)


# ------------------------------------------------------------------------------------------------ the CLI
def split_args(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Separate preflight's own options from the ``lightscale fit`` arguments."""
    options: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    argv = list(argv)
    if argv[:1] == ["fit"]:
        argv = argv[1:]
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        if key in _VALUE_OPTIONS:
            if not eq:
                if i + 1 >= len(argv):
                    raise UserError(f"{key} needs a value")
                value = argv[i + 1]
                i += 1
            options[key] = value
        elif arg in _FLAG_OPTIONS:
            options[arg] = "1"
        else:
            rest.append(arg)
        i += 1
    return options, rest


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Only preflight's own summary: no Lightning info lines or warnings about the throw-away Trainer."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


@contextlib.contextmanager
def _kept_environment() -> Iterator[None]:
    """The CLI exports the run directory for its DDP workers; preflight must leave the caller's env alone."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


def _make_cli_class() -> type:
    import torch
    from lightning.pytorch import LightningModule

    from lightscale.cli import LightscaleCLI

    class PreflightCLI(LightscaleCLI):
        """Parses and builds model + data like ``lightscale fit``; the model on the meta device, no Trainer."""

        meta = True

        def _instantiate_module(self, class_type: type, *args: Any, **kwargs: Any) -> Any:
            with torch.device("meta") if self.meta else contextlib.nullcontext():
                return class_type(*args, **kwargs)

        def claim_run_dir(self, run_dir: Any, resume: bool) -> None:
            self.run_dir = run_dir  # plan only: nothing is created or locked

        def before_instantiate_classes(self) -> None:
            super().before_instantiate_classes()
            self.parser.add_instantiator(self._instantiate_module, LightningModule, subclasses=True, prepend=True)

        def instantiate_classes(self) -> None:
            self.config_init = self.parser.instantiate_classes(self.config)
            self.datamodule = self._get(self.config_init, "data")
            self.model = self._get(self.config_init, "model")

        def build_real(self) -> tuple[Any, Any]:
            self.meta = False
            config_init = self.parser.instantiate_classes(self.config)
            return self._get(config_init, "model"), self._get(config_init, "data")

    return PreflightCLI


def _cpu_step(model: Any, datamodule: Any) -> str:
    """One training and one validation batch on the CPU, single process, nothing written to the run."""
    import lightning as L
    from lightning.fabric.plugins.environments import LightningEnvironment

    with tempfile.TemporaryDirectory(prefix="lightscale-preflight-") as tmp:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            num_nodes=1,
            plugins=[LightningEnvironment()],  # not the SLURM / torchrun world this may run inside
            fast_dev_run=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp,
        )
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule)
        seconds = time.perf_counter() - start
    loss = next((float(v) for k, v in trainer.callback_metrics.items() if "loss" in k and "train" in k), None)
    return f"one training + one validation batch on the CPU: ok ({seconds:.1f} s" + (
        f", train loss {loss:.4g})" if loss is not None else ")"
    )


def _batch_summary(datamodule: Any) -> str:
    import torch

    if datamodule is None:
        return "no datamodule"
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    parts = []
    for item in batch if isinstance(batch, (list, tuple)) else [batch]:
        if isinstance(item, torch.Tensor):
            parts.append(f"{list(item.shape)} {str(item.dtype).replace('torch.', '')}")
        else:
            parts.append(type(item).__name__)
    return "one training batch: " + ", ".join(parts)


def run(argv: Sequence[str]) -> list[str]:
    """Run every check; return the summary lines. Raises on the first error."""
    options, fit_args = split_args(argv)
    if not fit_args:
        raise UserError(f"nothing to check; {USAGE}")
    header: dict[str, str] = {}
    if "--sbatch" in options:
        header = sbatch_options(options["--sbatch"])
        header["_source"] = options["--sbatch"]
    explicit = {k: v for k, v in options.items() if k in _RESOURCE_OPTIONS}
    if explicit and "--gpus-per-node" not in explicit and "--gres" in explicit:
        header.pop("--gpus-per-node", None)
    resources = resolve_resources({**header, **explicit}) if header or explicit else resolve_resources({})
    if "--from-slurm" in options:  # what slurm/train.sbatch appends: the allocation decides
        if not resources.known:
            raise UserError("--from-slurm needs the SLURM resources: --sbatch FILE and/or --nodes/--ntasks-per-node")
        fit_args = [
            *fit_args,
            "--trainer.num_nodes",
            str(resources.nodes),
            "--trainer.devices",
            str(resources.tasks_per_node),
        ]

    lines = []
    with _kept_environment():
        cli_class = _make_cli_class()
        points: list[list[str]] = [[]]
        if "--sweep" in options:
            from lightscale.sweep import load_points, point_args

            points = [point_args(p) for p in load_points(options["--sweep"])]
        cli = cli_class(args=[*fit_args, *points[0]], run=False)
        for i, extra in enumerate(points[1:], start=1):
            try:
                cli.parser.parse_args([*fit_args, *extra])
            except Exception as error:
                raise UserError(f"sweep point {i} ({' '.join(extra)}): {error}") from error
        config = cli.config
        trainer = config.trainer

        warnings = check_launch(trainer, resources)
        from lightscale.checks import check_no_secrets, check_output_dir

        check_no_secrets(config.as_dict())
        check_output_dir(cli.run_dir, float(config.run.get("min_free_gb", 1.0) or 0))

        model, datamodule = cli.model, cli.datamodule
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        accelerator = resolve_accelerator(trainer.get("accelerator"), resources)
        devices = devices_per_node(trainer.get("devices", "auto"), accelerator, resources) or 1
        num_nodes = int(trainer.get("num_nodes") or 1)
        world = devices * num_nodes
        per_param = state_bytes_per_param(trainer.get("precision"))
        ddp, fsdp = n_params * per_param, n_params * per_param / world

        lines.append(f"config     {' '.join(fit_args)}")
        if len(points) > 1:
            lines.append(f"sweep      {len(points)} points, all parse")
        lines.append(f"model      {type(model).__module__}.{type(model).__qualname__}")
        lines.append(f"params     {_count(n_params)} ({_count(n_train)} trainable)")
        launch = (
            f"{resources.nodes} node(s) x {resources.tasks_per_node} task(s)"
            + (f" x {resources.gpus_per_node} GPU(s)" if resources.gpus_per_node is not None else "")
            + (f" [{resources.source}]" if resources.source else "")
            if resources.known
            else "no SLURM resources given (pass --sbatch FILE or --nodes/--ntasks-per-node/--gpus-per-node)"
        )
        lines.append(f"slurm      {launch}")
        strategy = str(_plain(trainer.get("strategy")) or "auto").rsplit(".", 1)[-1]
        lines.append(
            f"trainer    accelerator={accelerator} devices={trainer.get('devices')} num_nodes={num_nodes} "
            f"strategy={strategy} precision={trainer.get('precision') or '32-true'} -> world size {world}"
        )
        lines.append(
            f"memory     per device, weights + grads + AdamW ({per_param} B/param): DDP {_gb(ddp)}, "
            f"FSDP over {world} {_gb(fsdp)} (activations not included)"
        )
        if "--gpu-mem-gb" in options:
            limit = float(options["--gpu-mem-gb"]) * 1e9
            if ddp > 0.8 * limit:
                verdict = "FSDP" if fsdp <= 0.8 * limit else "neither DDP nor FSDP at this world size"
                warnings.append(f"the DDP training state ({_gb(ddp)}) exceeds 80% of {_gb(limit)}: use {verdict}")
        want_step = "--step" in options or ("--no-step" not in options and n_params <= STEP_MAX_PARAMS)
        if want_step:
            real_model, real_data = cli.build_real()
            lines.append(f"step       {_cpu_step(real_model, real_data)}")
        else:
            why = "--no-step" if "--no-step" in options else f"> {_count(STEP_MAX_PARAMS)} params; --step forces it"
            lines.append(f"data       {_batch_summary(datamodule)} (no CPU step: {why})")
        lines.append(f"run dir    {cli.run_dir} (new)")
        lines.extend(f"warning    {w}" for w in warnings)
    return lines


def main(argv: Sequence[str]) -> None:
    """Entry point of ``lightscale preflight``; exit 0 with a summary, or 2 with one error line."""
    from jsonargparse import ArgumentError
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightscale.errors import one_line

    if list(argv[:1]) in (["-h"], ["--help"]):
        print(__doc__)
        return
    try:
        with _quiet():
            lines = run(argv)
    except Exception as error:  # any exception here is a job that would have crashed at minute one
        if os.environ.get("LIGHTSCALE_TRACEBACK"):
            raise
        message = one_line(str(error)) or type(error).__name__
        if not isinstance(error, (ArgumentError, UserError, MisconfigurationException)):
            message = f"{type(error).__name__}: {message}"
        print(f"lightscale preflight: error: {message}", file=sys.stderr)
        sys.exit(2)
    print("lightscale preflight")
    for line in lines:
        print(f"  {line}")
    print("preflight ok")
