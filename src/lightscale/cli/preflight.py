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
3. builds the model on the meta device (no memory, any size): parameter count and a rule-of-thumb training state
   per device for DDP and for FSDP;
4. loads one training batch and plans the memory of one step per device at the config's world size: the model's
   own ``configure_model`` shards it (FSDP2, tensor parallelism) in a fake process group of that size, and a step
   on fake tensors measures parameters, gradients, optimizer state, activations (with activation checkpointing
   each way) and the peak (:mod:`lightscale.training.memory_plan`); with ``--gpu-mem-gb`` a step that does not
   fit (90% of it) is an error that shows the numbers;
5. for models up to 20M parameters, runs one training and one validation batch on the CPU (``--no-step`` skips
   it, ``--step`` forces it);
6. with ``--sweep``, parses every point of the sweep.

It prints one summary, or one line with the first error and exits 2. ``slurm/submit.sh`` runs it before
``sbatch``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from lightscale.cluster.resources import (
    check_launch,
    devices_per_node,
    gpu_memory_gb,
    plain,
    resolve_accelerator,
    resolve_resources,
    sbatch_options,
    state_bytes_per_param,
)
from lightscale.core import fmt
from lightscale.core.errors import UserError

STEP_MAX_PARAMS = 20_000_000
USAGE = (
    "usage: lightscale preflight [--sbatch FILE] [--nodes N] [--ntasks-per-node T] [--gpus-per-node G] "
    "[--from-slurm] [--sweep FILE] [--gpu-mem-gb GB] [--step|--no-step] --config CONFIG [overrides]"
)
_RESOURCE_OPTIONS = ("--nodes", "--ntasks-per-node", "--ntasks", "--gpus-per-node", "--gres")
_VALUE_OPTIONS = ("--sbatch", *_RESOURCE_OPTIONS, "--sweep", "--gpu-mem-gb")
_FLAG_OPTIONS = ("--step", "--no-step", "--from-slurm")


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

        def claim_run_dir(self, resume: bool) -> None:
            pass  # plan only: nothing is created or locked

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


def _first_batch(datamodule: Any) -> Any:
    """One training batch, the shape the memory plan measures and the summary shows (``None``: no datamodule)."""
    if datamodule is None:
        return None
    datamodule.prepare_data()
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


def _batch_summary(batch: Any) -> str:
    import torch

    if batch is None:
        return "no datamodule"
    parts = []
    for item in batch if isinstance(batch, (list, tuple)) else [batch]:
        if isinstance(item, torch.Tensor):
            parts.append(f"{list(item.shape)} {str(item.dtype).replace('torch.', '')}")
        else:
            parts.append(type(item).__name__)
    return "one training batch: " + ", ".join(parts)


class DoesNotFit(UserError):
    """A training step that would run out of device memory; ``lines`` is the summary that shows why."""

    def __init__(self, message: str, lines: list[str]) -> None:
        super().__init__(message)
        self.lines = lines


def _memory_plan(
    cli: Any, batch: Any, devices: int, num_nodes: int, device_bytes: float | None, device_source: str
) -> list[str]:
    """Lines of the memory plan (``lightscale.training.memory_plan``) at the config's world size; raises
    :class:`DoesNotFit` with them when the step would not fit ``device_bytes``."""
    from lightscale.training.memory_plan import NotMeasured, fit_error, plan_memory, plan_table

    trainer = cli.config.trainer
    strategy = cli.config_init.trainer.get("strategy") or "auto"
    name = str(plain(trainer.get("strategy")) or "auto").rsplit(".", 1)[-1].lower()
    if name in ("fsdp", "fsdpstrategy") or batch is None:  # FSDP1 refuses a CPU; nothing to measure without data
        why = "FSDP1 (FSDPStrategy) needs a GPU to shard; configs/trainer/fsdp.yaml (FSDP2) can be planned"
        return [f"plan       not measured: {why if batch is not None else 'no datamodule to take a batch from'}"]
    precision = trainer.get("precision") or "32-true"
    try:
        plan = plan_memory(
            cli.model,
            batch,
            strategy=strategy,
            devices=devices,
            num_nodes=num_nodes,
            precision=precision,
            accumulate_grad_batches=int(trainer.get("accumulate_grad_batches") or 1),
            max_steps=int(trainer.get("max_steps") or -1),
        )
    except NotMeasured as error:  # the rule of thumb above stands
        reads = "it reads a tensor's value (metrics, .item()); " if "DataDependent" in str(error) else ""
        step = f"{type(cli.model).__name__}.training_step"
        return [f"plan       not measured: {step} does not run on fake tensors ({reads}{error})"[:300]]
    shapes = _batch_summary(batch).removeprefix("one training batch: ")
    lines = [
        f"plan       {plan.layout}, world size {devices * num_nodes}, {precision}, micro-batch {shapes}; "
        "per device (rank 0), measured on fake tensors:"
    ]
    lines.extend(f"             {row}" for row in plan_table(plan, device_bytes, device_source))
    error = fit_error(plan, device_bytes) if device_bytes is not None else None
    if error:
        raise DoesNotFit(error, lines)
    return lines


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
            from lightscale.cluster.sweep import load_points, point_args

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
        from lightscale.cli.checks import check_no_secrets, check_output_dir

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
        lines.append(f"params     {fmt.count(n_params)} ({fmt.count(n_train)} trainable)")
        launch = (
            f"{resources.nodes} node(s) x {resources.tasks_per_node} task(s)"
            + (f" x {resources.gpus_per_node} GPU(s)" if resources.gpus_per_node is not None else "")
            + (f" [{resources.source}]" if resources.source else "")
            if resources.known
            else "no SLURM resources given (pass --sbatch FILE or --nodes/--ntasks-per-node/--gpus-per-node)"
        )
        lines.append(f"slurm      {launch}")
        strategy = str(plain(trainer.get("strategy")) or "auto").rsplit(".", 1)[-1]
        lines.append(
            f"trainer    accelerator={accelerator} devices={trainer.get('devices')} num_nodes={num_nodes} "
            f"strategy={strategy} precision={trainer.get('precision') or '32-true'} -> world size {world}"
        )
        lines.append(
            f"memory     per device, weights + grads + AdamW ({per_param} B/param): DDP {fmt.gigabytes(ddp)}, "
            f"FSDP over {world} {fmt.gigabytes(fsdp)} (activations not included)"
        )
        if "--gpu-mem-gb" in options:  # the rule of thumb; the plan below measures
            limit = float(options["--gpu-mem-gb"]) * 1e9
            if ddp > 0.8 * limit:
                verdict = "FSDP" if fsdp <= 0.8 * limit else "neither DDP nor FSDP at this world size"
                state, available = fmt.gigabytes(ddp), fmt.gigabytes(limit)
                warnings.append(f"the DDP training state ({state}) exceeds 80% of {available}: use {verdict}")
        device_bytes = float(options["--gpu-mem-gb"]) * 1e9 if "--gpu-mem-gb" in options else None
        device_source = "--gpu-mem-gb"
        if device_bytes is None and accelerator == "gpu":  # else the GPU type SLURM is asked for, when it says
            named = {**header, **explicit}
            spec = named.get("--gpus-per-node") or named.get("--gres") or os.environ.get("SLURM_GPUS_PER_NODE")
            size = gpu_memory_gb(spec)
            device_bytes, device_source = (size * 1e9, f"{spec}, per SLURM") if size is not None else (None, "")
        batch = _first_batch(datamodule)
        try:
            lines.extend(_memory_plan(cli, batch, devices, num_nodes, device_bytes, device_source))
        except DoesNotFit as error:
            error.lines = [*lines, *error.lines]
            raise
        want_step = "--step" in options or ("--no-step" not in options and n_params <= STEP_MAX_PARAMS)
        if want_step:
            real_model, real_data = cli.build_real()
            lines.append(f"step       {_cpu_step(real_model, real_data)}")
        else:
            why = "--no-step" if "--no-step" in options else f"> {fmt.count(STEP_MAX_PARAMS)} params; --step forces it"
            lines.append(f"data       {_batch_summary(batch)} (no CPU step: {why})")
        lines.append(f"run dir    {cli.run_dir} (new)")
        lines.extend(f"warning    {w}" for w in warnings)
    return lines


def main(argv: Sequence[str]) -> None:
    """Entry point of ``lightscale preflight``; exit 0 with a summary, or 2 with one error line."""
    from jsonargparse import ArgumentError
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightscale.core.errors import one_line

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
        if isinstance(error, DoesNotFit):  # the numbers that say why, then the one line
            print("lightscale preflight")
            for line in error.lines:
                print(f"  {line}")
        print(f"lightscale preflight: error: {message}", file=sys.stderr)
        sys.exit(2)
    print("lightscale preflight")
    for line in lines:
        print(f"  {line}")
    print("preflight ok")
