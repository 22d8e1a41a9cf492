"""What Lightning's checkpoints lack for an exact resume: the random generators, and (in one common case) the
data position.

**Generators.** Lightning checkpoints hold the model, optimizer, schedulers, loops, callbacks and (with
torchdata's ``StatefulDataLoader``) the data order, but no RNG state: after a resume, dropout masks and
anything else drawn from the global generators differ from the uninterrupted run. :class:`ExactResume` stores,
for every rank, the Python, numpy, torch CPU and CUDA generator states in the checkpoint (as plain data, so
weights-only loading accepts them). Per-worker generators of a DataLoader are covered by
:class:`~lightscale.resilience.worker_rng.WorkerRNG`.

*When* they are restored matters. A checkpoint is written after a training batch (or at the end of an epoch).
A resumed run then rebuilds the model and the DataLoader and creates its iterator, all of which draw from the
global generators; the uninterrupted run did none of this at that point. So the saved states are put back
at the first ``on_train_epoch_start`` or ``on_train_batch_start`` after the restore, whichever comes first:
the same point of the training stream where they were captured.

Epoch metrics a model keeps in its checkpoints (torchmetrics made ``persistent(True)``) continue a mid-epoch
resume as they were; a resume from the end of an epoch empties them, as Lightning did after that checkpoint.

Validation is kept out of the training stream: the generators are put back, after every validation during
``fit``, to their state before it (as Lightning already does for the sanity check), and checkpoints written
during validation record that outer state. Otherwise the stream would depend on what validation happens to
draw, e.g. a DataLoader iterator's seed, drawn once for persistent workers, but in a resumed run (which skips
the sanity check) at its first real validation. Lightning has no hook before the validation loop builds its
iterator, so the callback wraps the fit loop's ``val_loop.run`` (an instance attribute; no per-step cost).

**Data position.** Lightning 2.6 applies the saved ``StatefulDataLoader`` state when it builds the training
loader in ``FitLoop.setup_data``, and creates the loader's iterator right there. On a resume this goes wrong
in four ways: (1) a LightningModule whose ``configure_optimizers`` reads ``trainer.estimated_stepping_batches``
(to size an LR schedule, as both template models do) makes Lightning build the loader *before* the
checkpoint is restored, so the state is never applied and the epoch's data order restarts from the top;
(2) the iterator is created before the sampler is told the epoch (``set_epoch``), so an epoch-dependent
sampler (``DistributedSampler`` under DDP, the GPT's window sampler) replays the indices of epoch 0;
(3) when the saved epoch had ended, Lightning skips the state altogether, so a sampler with its own generator
(torchdata's ``RandomSampler``, used by ``StatefulDataLoader(shuffle=True)``) restarts from its first epoch's
order; (4) under DDP, Lightning shards that sampler through ``DistributedSamplerWrapper``, which draws each
epoch's order from the inner generator, whose progress is not in the loader's state at all.
:meth:`ExactResume.on_train_start` sets the sampler epoch, puts back the saved order and generators, applies
the loader state and re-creates the iterator: mid-epoch, continuing the epoch; after an epoch end, starting
the next epoch exactly as the uninterrupted run did.
"""

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.utilities import rank_zero_warn


def collect_rng_states(raw: tuple | None = None) -> dict[str, Any]:
    """This process's generator states (or those captured by :func:`_raw_states`), as tensors and plain Python
    data (no numpy objects)."""
    python, np_state, torch_state, cuda = raw or _raw_states()
    states: dict[str, Any] = {
        "python": python,
        "numpy": (np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "torch": torch_state,
    }
    if cuda is not None:
        states["cuda"] = cuda
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`collect_rng_states`."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _raw_states() -> tuple:
    """Generator states as the libraries return them (cheaper than :func:`collect_rng_states`; in-memory use)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_raw_states(states: tuple) -> None:
    python, numpy_state, torch_state, cuda = states
    random.setstate(python)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _sampler_wrappers(trainer: L.Trainer) -> list[DistributedSamplerWrapper | None]:
    """The ``DistributedSamplerWrapper`` that Lightning put around each training loader's sampler (``None``
    for loaders without one), in loader order."""
    loader = trainer.fit_loop._combined_loader
    wrappers: list[DistributedSamplerWrapper | None] = []
    for dataloader in loader.flattened if loader is not None else []:
        candidates = (getattr(getattr(dataloader, "batch_sampler", None), "sampler", None), dataloader.sampler)
        wrappers.append(next((c for c in candidates if isinstance(c, DistributedSamplerWrapper)), None))
    return wrappers


def _sampler_states(trainer: L.Trainer) -> list[dict[str, Any] | None]:
    """Each wrapper's order of this epoch and its inner sampler's generator (after drawing that order)."""
    states: list[dict[str, Any] | None] = []
    for wrapper in _sampler_wrappers(trainer):
        order = wrapper.dataset._sampler_list if wrapper is not None else None
        if order is None:
            states.append(None)
            continue
        generator = getattr(wrapper.dataset._sampler, "generator", None)
        states.append(
            {
                "order": torch.tensor(order, dtype=torch.int64),
                "generator": generator.get_state() if isinstance(generator, torch.Generator) else None,
            }
        )
    return states


def _restore_sampler_states(trainer: L.Trainer, states: list[dict[str, Any] | None], keep_order: bool) -> None:
    """Put back the inner samplers' generators and, with ``keep_order`` (a mid-epoch resume), the epoch's order,
    which the wrapper then keeps until the next epoch (it re-draws its order whenever an iterator is created,
    which a resume does more than once)."""
    for wrapper, state in zip(_sampler_wrappers(trainer), states, strict=False):
        if wrapper is None or state is None:
            continue
        dataset = wrapper.dataset
        generator = getattr(dataset._sampler, "generator", None)
        if state["generator"] is not None and isinstance(generator, torch.Generator):
            generator.set_state(state["generator"])
        if not keep_order:
            continue
        dataset._sampler_list = state["order"].tolist()
        restored_epoch = wrapper.epoch

        def reset(wrapper: DistributedSamplerWrapper = wrapper, epoch: int = restored_epoch) -> None:
            if wrapper.epoch != epoch:  # a new epoch: back to drawing orders from the generator
                del wrapper.dataset.reset
                wrapper.dataset.reset()

        dataset.reset = reset


def reset_epoch_metrics(module: torch.nn.Module) -> None:
    """Reset the torchmetrics a model keeps in its checkpoints (``persistent(True)``: epoch accumulators that a
    mid-epoch resume must continue). A checkpoint written at the end of an epoch holds them full, and Lightning
    resets them only after that checkpoint; a run resumed from it starts the next epoch, so they must start empty,
    as they did in the run that was not interrupted."""
    from torchmetrics import Metric

    for metric in module.modules():
        if isinstance(metric, Metric) and metric.state_dict():  # persistent: its states are in the state_dict
            metric.reset()


def _to(value: Any, device: torch.device | None) -> Any:
    if torch.is_tensor(value):
        return value.detach().to(device) if device is not None else value.detach().clone()
    return [_to(item, device) for item in value] if isinstance(value, (list, tuple)) else value


def persistent_metric_states(module: torch.nn.Module | None) -> dict[str, dict[str, Any]]:
    """This process's states of the torchmetrics a model keeps in its checkpoints (``persistent(True)``), on the CPU.

    Under DDP every rank accumulates its own part of an epoch, but the checkpoint's ``state_dict`` is rank 0's:
    a mid-epoch resume that loaded it on every rank would count rank 0's part once per rank. So each rank's part
    is kept here, beside its generator states."""
    from torchmetrics import Metric

    if module is None:
        return {}
    return {
        name: {key: _to(value, torch.device("cpu")) for key, value in metric.state_dict().items()}
        for name, metric in module.named_modules()
        if isinstance(metric, Metric) and metric.state_dict()
    }


def restore_metric_states(module: torch.nn.Module, states: dict[str, dict[str, Any]]) -> None:
    from torchmetrics import Metric

    for name, metric in module.named_modules():
        if isinstance(metric, Metric) and name in states:
            for key, value in states[name].items():
                setattr(metric, key.rsplit(".", 1)[-1], _to(value, metric.device))


def _all_gather(obj: Any) -> list[Any]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def rescale_loader_states(states: list[Any], saved_world_size: int, world_size: int) -> list[Any]:
    """Loader states saved by ``saved_world_size`` data replicas, for ``world_size`` replicas: the number of samples
    each replica's sampler has yielded (torchdata's ``samples_yielded``, per process) scaled so that all of them
    together resume at the same global position of the epoch. With a rank-dealing sampler (``WindowSampler``,
    ``DistributedSampler`` without shuffling) that is exactly where the interrupted run stopped."""
    rescaled = []
    for state in states:
        sampler_state = state.get("_sampler_iter_state") if isinstance(state, dict) else None
        yielded = sampler_state.get("samples_yielded") if isinstance(sampler_state, dict) else None
        if isinstance(yielded, int):
            sampler_state = {**sampler_state, "samples_yielded": yielded * saved_world_size // world_size}
            state = {**state, "_sampler_iter_state": sampler_state}
        rescaled.append(state)
    return rescaled


def data_parallel_size(trainer: L.Trainer | None) -> int:
    """How many data replicas the run's samplers split the data into: the processes, less the tensor-parallel
    ranks that share a replica's batches."""
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) if trainer is not None else None
    return int((kwargs or {}).get("num_replicas", 1))


class ExactResume(L.Callback):
    """Generator states of every rank in each checkpoint, restored on resume; the data position applied even
    when Lightning built the loader before restoring (see module docstring).

    ``state_dict`` is called on every rank while a checkpoint is assembled (Lightning requires
    ``save_checkpoint`` on all ranks); the states are gathered there, and rank 0 writes them.
    """

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None
        self._loader_states: list[dict[str, Any]] | None = None
        self._outer: tuple | None = None  # the training stream's states while a validation runs
        self._trainer: L.Trainer | None = None
        self._resumed = False

    def state_dict(self) -> dict[str, Any]:
        module = self._trainer.lightning_module if self._trainer is not None else None
        mine = {
            "rng": collect_rng_states(self._outer),
            "samplers": _sampler_states(self._trainer),
            "metrics": persistent_metric_states(module),
            "data_parallel_size": data_parallel_size(self._trainer),
        }
        return {"ranks": _all_gather(mine)}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        val_loop = trainer.fit_loop.epoch_loop.val_loop
        if stage != "fit" or "run" in vars(val_loop):
            return
        run = val_loop.run

        def run_isolated() -> Any:
            if trainer.sanity_checking:  # Lightning isolates the sanity check itself
                return run()
            self._outer = _raw_states()
            try:
                return run()
            finally:
                _set_raw_states(self._outer)
                self._outer = None

        val_loop.run = run_isolated  # type: ignore[method-assign]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("ranks") or None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        fit_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        self._loader_states = fit_state.get("combined_loader") or None
        self._resumed = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Re-create the training iterator from the saved loader state (see module docstring)."""
        states, self._loader_states = self._loader_states, None
        resumed, self._resumed = self._resumed, False
        fit_loop = trainer.fit_loop
        loader, fetcher = fit_loop._combined_loader, fit_loop._data_fetcher
        progress = fit_loop.epoch_progress.current
        mid_epoch = progress.processed < progress.started  # else the saved epoch ended: the next one starts now
        if resumed and not mid_epoch:
            reset_epoch_metrics(pl_module)
        if resumed and mid_epoch and self._pending and len(self._pending) == trainer.world_size:
            restore_metric_states(pl_module, self._pending[trainer.global_rank].get("metrics") or {})
        if resumed and mid_epoch and not states:
            rank_zero_warn(
                "resuming in the middle of an epoch with a training DataLoader that keeps no state: the epoch's data "
                "order restarts (use torchdata's StatefulDataLoader to continue with exactly the batches that were "
                "left; see lightscale.contract)"
            )
        if not states or loader is None or fetcher is None:
            return
        saved_replicas = self._pending[0].get("data_parallel_size", len(self._pending)) if self._pending else None
        if saved_replicas is not None and saved_replicas != data_parallel_size(trainer):
            states = rescale_loader_states(states, saved_replicas, data_parallel_size(trainer))
        for dataloader in loader.flattened:
            _set_sampler_epoch(dataloader, progress.processed)
        samplers = self._pending[trainer.global_rank % len(self._pending)]["samplers"] if self._pending else []
        if mid_epoch:
            _restore_sampler_states(trainer, samplers, keep_order=True)
            loader._load_state_dicts(states)
            fit_loop._combined_loader_states_to_load = []
            iter(fetcher)  # continues the epoch; generators are restored at the next batch (or epoch) start
            return
        # The saved epoch is over. Re-create its iterator once from the state (samplers' own generators advance
        # as they did), then start the next epoch from the saved generators, as the uninterrupted run did.
        loader._load_state_dicts(states)
        fit_loop._combined_loader_states_to_load = []
        for dataloader in loader.flattened:
            if isinstance(dataloader, _Stateful):
                iter(dataloader)
        _restore_sampler_states(trainer, samplers, keep_order=False)
        self._restore(trainer)
        iter(fetcher)

    def _restore(self, trainer: L.Trainer) -> None:
        if self._pending is None:
            return
        ranks, self._pending = self._pending, None
        if len(ranks) != trainer.world_size:
            # Resharding on other hardware: weights, optimizer, schedule and data position carry over (the loader
            # fast-forwards by whole batches of this run's size), per-process generators and epoch metrics cannot.
            rank_zero_warn(
                f"resuming a {len(ranks)}-process checkpoint on {trainer.world_size} process(es): random draws "
                "(dropout, augmentation) and per-process epoch metrics start afresh, and the data continues where it "
                "stopped only if data.batch_size x processes (the global batch) is unchanged"
            )
        set_rng_states(ranks[trainer.global_rank % len(ranks)]["rng"])

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(trainer)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._restore(trainer)
