"""Stop (or skip the step) when the loss or a gradient becomes NaN/Inf, and never checkpoint such a state.

Lightning has no such guard: a NaN loss trains on silently, ``EarlyStopping(check_finite=True)`` notices only at
the next validation, and by then ``last.ckpt`` may hold NaN weights that a resume would load.

Where the check costs a host sync: branching on ``torch.isfinite`` needs the value on the host. On the CPU
that is free (nothing runs asynchronously), so ``stop`` raises before the optimizer step and the weights stay
finite. On a GPU, ``stop`` does not wait: the flag is copied to pinned memory asynchronously and read when it
has arrived (normally at the next batch), and before any checkpoint is written (``on_save_checkpoint`` waits
for all pending flags and refuses a non-finite state); so it costs no pipeline stall, at the price that the
step which produced the NaN is applied to the weights that are then discarded. ``skip`` must decide before
the optimizer step, so it reads the flag every step (one small device-to-host copy and sync per step).
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.utilities import rank_zero_warn

from lightscale.core.errors import UserError

Action = Literal["stop", "skip", "off"]


def _last_good(trainer: L.Trainer) -> str:
    """The newest checkpoint of this run: every one was checked for non-finite values when it was written."""
    callback = trainer.checkpoint_callback
    last = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
    return f"last good checkpoint: {last}" if last else "no checkpoint was written before"


class NonFiniteError(UserError):
    """Training produced a NaN/Inf loss or gradient (the message names the global step)."""


@dataclass
class _Flag:
    """One optimizer step's verdict: ``values`` = (non-finite anywhere, loss non-finite, loss), on the device, or
    in pinned host memory being filled by an asynchronous copy that ``event`` marks as done."""

    step: int
    values: torch.Tensor
    event: Any = None  # torch.cuda.Event while the device-to-host copy is in flight

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()
            self.event = None

    @property
    def bad(self) -> bool:
        return bool(self.values[0] > 0)

    @property
    def loss_bad(self) -> bool:
        return bool(self.values[1] > 0)

    @property
    def loss(self) -> float:
        return float(self.values[2])


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 gradients); the flag is reduced across ranks afterwards."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


_Groups = dict[torch.device, dict[torch.dtype, list[torch.Tensor]]]


def _by_device_and_dtype(tensors: list[torch.Tensor]) -> _Groups:
    groups: _Groups = {}
    for tensor in tensors:
        groups.setdefault(tensor.device, {}).setdefault(tensor.dtype, []).append(tensor)
    return groups


def _found_per_device(groups: _Groups, scratch: dict[torch.device, Any]) -> list[torch.Tensor]:
    """One one-element tensor per device, > 0 when a tensor there holds a NaN/Inf.

    Uses the fused kernel that ``torch.amp.GradScaler`` runs every step (one launch per device and dtype
    instead of one per tensor); it multiplies by an inverse scale of exactly 1.0, which leaves values as
    they are. ``scratch`` keeps the kernel's two one-element tensors between calls: building them anew costs
    more than the check itself on a CPU.
    """
    flags = []
    for device, by_dtype in groups.items():
        if device not in scratch:
            scratch[device] = (torch.zeros(1, device=device), torch.ones(1, device=device))
        found, inv_scale = scratch[device]
        found.zero_()
        for dtype, group in by_dtype.items():
            if dtype in (torch.float32, torch.float16, torch.bfloat16) and device.type in ("cpu", "cuda"):
                torch._amp_foreach_non_finite_check_and_unscale_(group, found, inv_scale)
            else:
                found += torch.stack([(~torch.isfinite(t)).any() for t in group]).any()
        flags.append(found)
    return flags


def _any_found(found: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not found:
        return torch.zeros((), dtype=torch.bool, device=device)
    return torch.cat([f.to(device) for f in found]).sum() > 0


def nonfinite_flag(
    tensors: list[torch.Tensor], device: torch.device, scratch: dict[torch.device, Any] | None = None
) -> torch.Tensor:
    """A bool scalar on ``device``, True when any element of ``tensors`` is NaN/Inf; no host sync."""
    return _any_found(_found_per_device(_by_device_and_dtype(tensors), {} if scratch is None else scratch), device)


def _tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every floating-point tensor in a nested checkpoint structure, with its dotted name."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point():
            yield prefix, _local(tree)
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from _tensors(value, f"{prefix}.{index}" if prefix else str(index))


def nonfinite_names(tree: Any, limit: int = 3) -> tuple[int, int, list[str]]:
    """``(non-finite tensors, all tensors, the first names)`` of the floating-point tensors in ``tree``: one fused
    check per device and dtype, names looked up only when something is found."""
    named = list(_tensors(tree))
    tensors = [tensor for _, tensor in named if tensor.numel()]
    if not tensors or not bool(nonfinite_flag(tensors, tensors[0].device)):
        return 0, len(named), []
    bad = [name for name, tensor in named if tensor.numel() and not bool(torch.isfinite(tensor).all())]
    return len(bad), len(named), bad[:limit]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _agree(bad: bool | int, device: torch.device) -> bool:
    """Whether any rank found something non-finite (a collective when the run is distributed)."""
    if not _distributed():
        return bool(bad)
    flag = torch.tensor([float(bad)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item() > 0)


def _parameters_nonfinite(module: torch.nn.Module) -> bool:
    """Whether any rank's weights (its shards under FSDP2) hold a NaN/Inf."""
    tensors = [_local(p.detach()) for p in module.parameters() if p.is_floating_point()]
    device = tensors[0].device if tensors else torch.device("cpu")
    return _agree(bool(tensors) and bool(nonfinite_flag(tensors, device)), device)


class NonFiniteGuard(L.Callback):
    """Checks the training loss and the gradients at every optimizer step (see module docstring).

    Args:
        action: ``stop``: end the run with a one-line error naming the global step; ``skip``: drop that
            optimizer step (no weight or optimizer-state update; the LR schedule and ``global_step`` still
            advance, as with AMP's skipped steps), count it in ``nonfinite/skipped`` (logged and in
            ``summary.json``) and go on; ``off``: no check.
        max_skips: with ``skip``, stop after this many skipped steps in the run (the run is diverging).

    With fp16 mixed precision, ``torch.amp.GradScaler`` already skips steps with Inf/NaN gradients (that is
    how it finds its scale), so only the loss is checked there.
    """

    def __init__(self, action: Action = "stop", max_skips: PositiveInt = 100) -> None:
        super().__init__()
        self.action = action
        self.max_skips = max_skips
        self.skipped = 0
        self._loss_bad: bool | torch.Tensor | None = None  # a bool on the CPU, a device tensor elsewhere
        self._loss: torch.Tensor | None = None
        self._pending: list[_Flag] = []
        self._failed = False
        self._scratch: dict[torch.device, Any] = {}

    # ---------------------------------------------------------------- state (skip count survives a resume)
    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    # ---------------------------------------------------------------- checks
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if self.action == "off":
            return
        loss = loss.detach()
        if loss.device.type == "cpu" and loss.numel() == 1:
            bad = not math.isfinite(loss.item())  # no sync to avoid on a CPU, and cheaper than tensor ops
        else:
            bad = ~torch.isfinite(loss).all()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad  # OR over accumulated batches
        self._loss = loss

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.action == "off" or self._loss_bad is None:
            return
        loss_bad, loss = self._loss_bad, self._loss
        self._loss_bad = self._loss = None
        grads = []
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            grads = [_local(p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        groups = _by_device_and_dtype(grads)
        distributed = trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
        if isinstance(loss_bad, bool) and not distributed and all(device.type == "cpu" for device in groups):
            # CPU, one process: read the verdict now (nothing runs asynchronously) and build no tensor unless it
            # is bad: both hooks 440 -> 100 us per step for the digits CNN on a 2-core CPU (benchmarks/overhead.py)
            if loss_bad or any(found.item() > 0 for found in _found_per_device(groups, self._scratch)):
                self._act(
                    trainer,
                    pl_module,
                    optimizer,
                    _Flag(trainer.global_step, torch.tensor([1.0, loss_bad, loss.item()])),
                )
            return
        bad = torch.as_tensor(loss_bad, device=loss.device)
        loss_bad = bad.clone()
        if grads:
            bad = bad | _any_found(_found_per_device(groups, self._scratch), loss.device)
        if distributed:
            # ranks see different losses (and, with FSDP, different gradient shards): decide together
            flag = bad.float().reshape(1)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            bad = flag[0] > 0
        values = torch.stack([bad.float(), loss_bad.float(), loss.float().reshape(-1)[0]])
        if self.action == "skip" or values.device.type != "cuda":
            flag = _Flag(trainer.global_step, values)
            if flag.bad:  # host sync: free on the CPU, needed for skip on an accelerator
                self._act(trainer, pl_module, optimizer, flag)
            return
        host = torch.empty(3, dtype=torch.float32, pin_memory=True)
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append(_Flag(trainer.global_step, host, event))

    def _act(
        self, trainer: L.Trainer, module: L.LightningModule, optimizer: torch.optim.Optimizer, flag: _Flag
    ) -> None:
        if self.action == "stop":
            self._fail(trainer, flag)
        if _parameters_nonfinite(module):
            # an earlier step with finite gradients (a learning rate far too high) made the weights themselves
            # non-finite: skipping steps cannot bring them back
            self._fail(trainer, flag, reason="the weights themselves are non-finite, so skipping cannot recover; ")
        self._skip(trainer, optimizer, flag)

    def _skip(self, trainer: L.Trainer, optimizer: torch.optim.Optimizer, flag: _Flag) -> None:
        # gradients of None make torch optimizers leave those parameters and their state untouched
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
        self.skipped += 1
        what = "loss" if flag.loss_bad else "gradient"
        rank_zero_warn(f"non-finite {what} at global step {flag.step}: step skipped ({self.skipped} so far)")
        trainer.callback_metrics["nonfinite/skipped"] = torch.tensor(float(self.skipped))
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"nonfinite/skipped": float(self.skipped)}, step=trainer.global_step)
        if self.skipped > self.max_skips:
            self._fail(trainer, flag, reason=f"more than nonfinite.max_skips={self.max_skips} skipped steps; ")

    def _resolve(self, trainer: L.Trainer, wait: bool) -> None:
        while self._pending and (wait or self._pending[0].ready()):
            flag = self._pending.pop(0)
            flag.wait()
            if flag.bad:
                self._fail(trainer, flag)

    def _fail(self, trainer: L.Trainer, flag: _Flag, reason: str = "") -> None:
        self._failed = True
        self._pending.clear()
        what = "loss" if flag.loss_bad else "gradient"
        value = f" (loss={flag.loss:g})" if flag.loss_bad else ""
        raise NonFiniteError(
            f"{reason}non-finite {what} at global step {flag.step}{value}: training stopped, no checkpoint was "
            f"written from this state ({_last_good(trainer)}). Lower the learning rate, check the data "
            "around this step, or set --nonfinite.action skip"
        )

    # ---------------------------------------------------------------- when to look at pending flags
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._resolve(trainer, wait=False)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resolve(trainer, wait=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resolve(trainer, wait=True)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Refuse to write any checkpoint whose weights or optimizer state hold a NaN/Inf: such a file would be
        resumed from (``--ckpt_path auto``) or chosen as best. Every rank checks its part (its shards under FSDP2)
        and the ranks decide together; one fused check per device and dtype."""
        if self._failed:
            raise NonFiniteError("refusing to write a checkpoint after a non-finite loss or gradient")
        self._resolve(trainer, wait=True)  # raises before anything is written
        if self.action == "off":
            return
        bad, total, names = nonfinite_names({k: checkpoint.get(k) for k in ("state_dict", "optimizer_states")})
        device = pl_module.device if pl_module is not None else torch.device("cpu")
        if _agree(bad, device):
            self._failed = True
            where = f" ({', '.join(names)}{', ...' if bad > len(names) else ''})" if names else " (on another rank)"
            raise NonFiniteError(
                f"refusing to write a checkpoint at global step {trainer.global_step}: {bad or 'some'} of {total} "
                f"weight and optimizer tensors are non-finite{where}; the last step made the weights NaN/Inf "
                "although its loss and gradients were finite (a learning rate far too high?). "
                f"{_last_good(trainer).capitalize()}"
            )

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, NonFiniteError):
            # Lightning's OnExceptionCheckpoint / ModelCheckpoint(save_on_exception=True) would now save the
            # failed state; make the trainer refuse any further checkpoint in this process.
            def refuse(*args: Any, **kwargs: Any) -> None:
                rank_zero_warn("not writing a checkpoint: the training state is non-finite")

            trainer.save_checkpoint = refuse  # type: ignore[method-assign]
