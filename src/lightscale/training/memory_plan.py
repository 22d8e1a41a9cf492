"""Memory per device of one training step at the job's world size, planned on a login node without its hardware.

The model's own ``configure_model`` runs under the job's strategy (FSDP2, tensor parallelism, hybrid sharding: the
mesh comes from Lightning's strategy, the plan from the model) inside a *fake* process group of the target world
size, in which this process is rank 0 and collectives move nothing (torch's ``fake`` backend, as torchtitan's dry
runs use it). The sharded model is then materialised as fake tensors (shapes and dtypes, no storage) and one real
micro-batch's shape goes through ``training_step``, ``backward`` and the optimizer's ``step``, while torch's memory
tracker counts the bytes of every live tensor. Nothing is allocated, at any model size.

The rule the numbers follow is the job's own, because it is the job's code that runs:

- parameters, gradients: this rank's shards, in the dtype they are stored in (fp32 under ``*-mixed``: the bf16
  copies FSDP2 gathers for compute, or autocast makes under DDP, are transient and show in the peak; ``*-true``
  stores them in half precision);
- optimizer state: what the configured optimizer allocates in its first ``step`` on those shards (AdamW: two fp32
  tensors per parameter, SGD with momentum one, plain SGD none);
- activations: the bytes that one micro-batch's forward leaves alive for the backward (also measured with the
  model's activation checkpointing switched the other way, when it has an ``activation_checkpointing`` switch);
- peak: the most bytes alive at once during one steady-state step (optimizer state present; gradients present
  from the start when gradients accumulate over micro-batches).

Not included: the CUDA context and kernels' workspaces, NCCL buffers and the caching allocator's fragmentation;
:data:`HEADROOM` keeps a share of the device for them. Kernels are CPU ones on fake tensors, so a GPU kernel with a
different workspace (or ``torch.compile``, which usually saves less) moves the peak a little.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

HEADROOM = 0.10  # share of device memory kept for the CUDA context, NCCL buffers and allocator fragmentation


class NotMeasured(RuntimeError):
    """The model was sharded, but its step could not run on fake tensors (e.g. it reads a tensor's values)."""


@dataclass
class MemoryPlan:
    """Bytes per device (rank 0, which holds the largest shards) of one training step."""

    layout: str
    params: int
    grads: int
    optimizer: int
    optimizer_name: str
    activations: int
    peak: int
    checkpointing: bool | None = None  # the model's activation checkpointing switch, None without one
    other: dict[str, int] = field(default_factory=dict)  # activations / peak with the switch the other way


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[None]:
    """A default process group of ``world_size`` ranks where this process is rank 0 and collectives move nothing,
    so sharding code runs as on rank 0 of the real job; destroyed on exit, leaving the process as it was."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("a process group already exists in this process; plan in a fresh one")
    if hasattr(dist.Backend, "FAKE"):  # recent torch (2.13 here) registers the fake backend itself
        dist.init_process_group("fake", rank=0, world_size=world_size)
    else:  # older torch: only its test utilities have it (fenced in tests/test_lightning_private_api.py)
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _memory_tracker() -> Any:
    """torch's dispatch-level tensor memory tracker, keeping only the device-wide peak: its per-module peaks cost a
    pass over every module at every op (private torch API: fenced in tests/test_lightning_private_api.py)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class PeakTracker(MemTracker):
        def _update_peak_stats(self, peak_state: Any) -> None:
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot["Total"]:
                    self._peak_mem[device] = snapshot["Total"]
                    self._peak_mem_snap[device] = dict(snapshot)

    return PeakTracker()


def _total(tracker: Any, which: str) -> int:
    return int(sum(stats["Total"] for stats in tracker.get_tracker_snapshot(which).values()))


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]  # parameters() yields a tied weight once


def _placement(model: nn.Module) -> str:
    """How the weights on the most mesh dims are laid out, e.g. ``replicate=2 R x shard=2 S(0)`` under hybrid
    sharding (the strategy's mesh alone does not say which dims shard, nor that TP leaves embeddings out)."""

    def rank(param: nn.Parameter) -> tuple[int, int]:
        mesh = getattr(param, "device_mesh", None)
        return (mesh.ndim if mesh is not None else 0, param.numel())

    widest = max(model.parameters(), key=rank, default=None)
    mesh = getattr(widest, "device_mesh", None)
    if mesh is None:
        return "weights whole on every device"
    names = mesh.mesh_dim_names or tuple(f"dim{i}" for i in range(mesh.ndim))
    dims = zip(names, mesh.shape, widest.placements, strict=True)  # type: ignore[union-attr]
    return "weights " + " x ".join(f"{name}={size} {placement}" for name, size, placement in dims)


def _optimizers(configured: Any) -> list[torch.optim.Optimizer]:
    """The optimizers out of any of the forms ``configure_optimizers`` may return."""
    if isinstance(configured, torch.optim.Optimizer):
        return [configured]
    if isinstance(configured, dict):
        return _optimizers(configured.get("optimizer"))
    if isinstance(configured, (list, tuple)):
        return [opt for item in configured for opt in _optimizers(item)]
    return []


def checkpointing_switches(model: nn.Module) -> list[nn.Module]:
    """Submodules with a boolean ``activation_checkpointing`` attribute (GPT has one): the switch the plan flips to
    show the other setting."""
    return [m for m in model.modules() if isinstance(getattr(m, "activation_checkpointing", None), bool)]


def _measure_step(model: Any, optimizers: list, batch: Any, precision: Any, keep_grads: bool) -> tuple[int, int, int]:
    """(activations, peak, gradient bytes) of one training step on fake tensors."""
    tracker = _memory_tracker()
    tracker.track_external(model, *optimizers)
    trainer, model.trainer = model.trainer, None  # no loop to log into: self.log warns and returns
    eager = getattr(torch.compiler, "set_stance", None)  # compiled blocks run eagerly: no compiling fake tensors
    try:
        with tracker, eager("force_eager") if eager else contextlib.nullcontext(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*self.log.*")
            before = _total(tracker, "current")
            with precision.train_step_context():
                out = model.training_step(batch, 0)
            loss = out["loss"] if isinstance(out, dict) else out
            activations = _total(tracker, "current") - before
            loss.backward()
            del loss, out
            grads = sum(_local_bytes(p.grad) for p in _unique_params(model) if p.grad is not None)
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=not keep_grads)
        return activations, _total(tracker, "peak"), grads
    finally:
        model.trainer = trainer


def plan_memory(
    model: Any,
    batch: Any,
    *,
    strategy: Any,
    devices: int,
    num_nodes: int,
    precision: Any,
    accumulate_grad_batches: int = 1,
    max_steps: int = -1,
) -> MemoryPlan:
    """Shard ``model`` (a LightningModule built on the meta device; it is consumed) as the job would at
    ``devices x num_nodes`` processes under ``strategy`` and measure one step on ``batch``'s shapes.

    Raises whatever the model's ``configure_model`` raises at that world size: the job would fail the same way."""
    import lightning as L
    from lightning.fabric.plugins.environments import LightningEnvironment

    with fake_process_group(devices * num_nodes), tempfile.TemporaryDirectory(prefix="lightscale-plan-") as tmp:
        trainer = L.Trainer(
            accelerator="cpu",  # the fake process group and fake tensors stand in for the job's devices
            devices=devices,
            num_nodes=num_nodes,
            strategy=strategy,
            precision=precision,
            plugins=[LightningEnvironment()],  # rank 0, whatever SLURM / torchrun world this may run inside
            max_epochs=-1,
            max_steps=max_steps if max_steps and max_steps > 0 else 1_000_000,  # the schedule needs a length
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp,
        )
        trainer.strategy.connect(model)
        model.trainer = trainer
        trainer.strategy.setup_environment()  # the strategy's device mesh at this world size
        model.configure_model()  # the model's own sharding plan (FSDP2, TP, HSDP)
        model = trainer.precision_plugin.convert_module(model)
        model.train()
        layout = f"{type(trainer.strategy).__name__}, {_placement(model)}"
        try:
            return _measure(model, batch, trainer, layout, accumulate_grad_batches)
        except Exception as error:
            raise NotMeasured(f"{type(error).__name__}: {error}") from error


def _measure(model: Any, batch: Any, trainer: Any, layout: str, accumulate_grad_batches: int) -> MemoryPlan:
    """Materialise the sharded ``model`` as fake tensors, create the optimizer state, measure one step (twice: with
    the activation checkpointing switch each way, when the model has one)."""
    from lightning_utilities.core.apply_func import apply_to_collection
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        model.to_empty(device="cpu")
        optimizers = _optimizers(model.configure_optimizers())
        params = _unique_params(model)
        for param in params:  # a first step creates the optimizer state, as the job's steps after the first see it
            param.grad = torch.zeros_like(param)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=accumulate_grad_batches <= 1)
        fake_batch = apply_to_collection(batch, torch.Tensor, fake.from_tensor)
        keep = accumulate_grad_batches > 1
        activations, peak, grads = _measure_step(model, optimizers, fake_batch, trainer.precision_plugin, keep)
        switches = checkpointing_switches(model)
        checkpointing = switches[0].activation_checkpointing if switches else None
        other: dict[str, int] = {}
        if switches:
            for switch in switches:
                switch.activation_checkpointing = not checkpointing
            other_act, other_peak, _ = _measure_step(model, optimizers, fake_batch, trainer.precision_plugin, keep)
            other = {"activations": other_act, "peak": other_peak}
    state = [v for opt in optimizers for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return MemoryPlan(
        layout=layout,
        params=sum(_local_bytes(p) for p in model.parameters()),
        grads=grads,
        optimizer=sum(_local_bytes(v) for v in state),
        optimizer_name=", ".join(type(opt).__name__ for opt in optimizers) or "none",
        activations=activations,
        peak=peak,
        checkpointing=checkpointing,
        other=other,
    )


# ------------------------------------------------------------------------------------------------ the verdict
def _gb(n_bytes: float) -> str:
    """Aligned: GB (10^9 bytes, as ``--gpu-mem-gb``) from one GB up, MB below."""
    return f"{n_bytes / 1e9:8.2f} GB" if abs(n_bytes) >= 1e9 else f"{n_bytes / 1e6:8.1f} MB"


def plan_table(plan: MemoryPlan, device_bytes: float | None = None, source: str = "") -> list[str]:
    """The plan as aligned rows (per device), ending with the device's memory (from ``source``) when it is known."""
    switch = "on" if plan.checkpointing else "off"
    other = {k: f" (activation checkpointing {'off' if plan.checkpointing else 'on'}: {_gb(v).strip()})"
             for k, v in plan.other.items()}  # fmt: skip
    rows = [
        f"parameters       {_gb(plan.params)}  this rank's shards, as stored",
        f"gradients        {_gb(plan.grads)}",
        f"optimizer state  {_gb(plan.optimizer)}  {plan.optimizer_name}",
        f"activations      {_gb(plan.activations)}  one micro-batch, activation checkpointing {switch}"
        + other.get("activations", ""),
        f"peak of a step   {_gb(plan.peak)}  parameters + gradients + optimizer + activations + transients"
        + other.get("peak", ""),
    ]
    if device_bytes is not None:
        usable = (1 - HEADROOM) * device_bytes
        verdict = "fits" if plan.peak <= usable else "DOES NOT FIT"
        rows.append(
            f"device memory    {_gb(device_bytes)}  " + (f"({source}) " if source else "") + f"{verdict}: "
            f"{_gb(usable).strip()} usable "
            f"({HEADROOM:.0%} kept for the CUDA context, NCCL buffers and fragmentation)"
        )
    return rows


def fit_error(plan: MemoryPlan, device_bytes: float) -> str | None:
    """One line saying why a step does not fit ``device_bytes`` and what would help, or ``None`` when it fits."""
    usable = (1 - HEADROOM) * device_bytes
    if plan.peak <= usable:
        return None
    state = plan.params + plan.grads + plan.optimizer
    helps = []
    if plan.other and not plan.checkpointing and plan.other["peak"] <= usable:
        helps.append(f"activation checkpointing (peak {_gb(plan.other['peak']).strip()}) would fit")
    elif plan.other and not plan.checkpointing:
        helps.append(f"activation checkpointing alone peaks at {_gb(plan.other['peak']).strip()}")
    if plan.activations > state:
        helps.append("a smaller micro-batch (data.batch_size, with trainer.accumulate_grad_batches) cuts activations")
    if state > plan.activations or not helps:
        helps.append("more devices (FSDP) shard the parameters, gradients and optimizer state further")
    return (
        f"one training step peaks at {_gb(plan.peak).strip()} per device ({plan.layout}): parameters "
        f"{_gb(plan.params).strip()} + gradients {_gb(plan.grads).strip()} + optimizer state "
        f"{_gb(plan.optimizer).strip()} + activations {_gb(plan.activations).strip()} + transients, but "
        f"{_gb(usable).strip()} of the {_gb(device_bytes).strip()} device may be used; " + "; ".join(helps)
    )
