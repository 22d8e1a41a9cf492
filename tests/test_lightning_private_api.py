"""Every private (underscore) member of Lightning, jsonargparse and torch that lightscale touches, in one place.

Lightning may rename or remove these in any release. pyproject.toml pins the range that is tested; when an
upgrade drops one, this test fails by name and says which lightscale module to adapt, before any run fails deep
inside training.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger


def trainer() -> Trainer:
    return Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


MODULE_NAMES = [
    ("lightning.fabric.utilities.types", "_PATH", "resilience/checkpoint_io.py"),
    ("lightning.fabric.utilities.types", "_Stateful", "resilience/exact_resume.py"),
    ("lightning.fabric.utilities.data", "_set_sampler_epoch", "resilience/exact_resume.py"),
    ("lightning.pytorch.plugins.io.wrapper", "_WrappingCheckpointIO", "cli/checkpoints.py"),
    ("torch", "_amp_foreach_non_finite_check_and_unscale_", "resilience/nonfinite.py"),
    ("torch.distributed._tools.mem_tracker", "MemTracker", "training/memory_plan.py"),
    ("torch._subclasses.fake_tensor", "FakeTensorMode", "training/memory_plan.py"),
    (
        "torch.testing._internal.distributed.fake_pg",
        "FakeStore",
        "training/memory_plan.py (torch without Backend.FAKE)",
    ),
]
CLASS_MEMBERS = [
    (ModelCheckpoint, "_save_topk_checkpoint", "resilience/checkpoint.py"),
    (ModelCheckpoint, "_save_last_checkpoint", "resilience/checkpoint.py"),
    (ModelCheckpoint, "_should_save_on_train_epoch_end", "resilience/checkpoint.py"),
    (ModelCheckpoint, "_monitor_candidates", "resilience/checkpoint.py"),
    (ModelCheckpoint, "_save_checkpoint", "resilience/checkpoint.py"),
    (ModelCheckpoint, "_should_remove_checkpoint", "resilience/checkpoint.py"),
    (ModelCheckpoint, "_remove_checkpoint", "resilience/checkpoint.py"),
    (LightningCLI, "_parse_ckpt_path", "cli/app.py (replaced by a safe version)"),
    (LightningCLI, "_get", "cli/preflight.py"),
]
INSTANCE_MEMBERS = [
    *[
        (
            lambda: importlib.import_module("torch.distributed._tools.mem_tracker").MemTracker(),
            name,
            "training/memory_plan.py",
        )
        for name in ("_update_peak_stats", "_peak_mem", "_peak_mem_snap", "_curr_mem_snap")
    ],
    (lambda: ModelCheckpoint(), "_every_n_train_steps", "resilience/checkpoint.py"),
    (lambda: ModelCheckpoint(), "_train_time_interval", "resilience/checkpoint.py"),
    (lambda: ModelCheckpoint(), "_last_checkpoint_saved", "resilience/checkpoint.py"),
    (lambda: ModelCheckpoint(), "_last_global_step_saved", "resilience/checkpoint.py"),
    (lambda: WandbLogger(offline=True), "_experiment", "tracking/wandb.py, resilience/graceful_stop.py"),
    (lambda: WandbLogger(offline=True), "_wandb_init", "tracking/wandb.py"),
    (lambda: WandbLogger(offline=True), "_id", "tracking/wandb.py"),
    (lambda: LearningRateFinder(), "_attr_name", "training/tuning.py"),
    (lambda: LearningRateFinder(), "_num_training_steps", "training/tuning.py"),
    (lambda: LearningRateFinder(), "_update_attr", "training/tuning.py"),
    (lambda: LearningRateFinder(), "_min_lr", "training/tuning.py"),
    (lambda: LearningRateFinder(), "_max_lr", "training/tuning.py"),
    (lambda: BatchSizeFinder(), "_batch_arg_name", "training/tuning.py"),
    (lambda: BatchSizeFinder(), "_mode", "training/tuning.py"),
    (lambda: Throughput(window_size=2), "_time", "tracking/throughput.py"),
    (lambda: trainer().fit_loop, "_combined_loader", "resilience/exact_resume.py"),
    (lambda: trainer().fit_loop, "_data_fetcher", "resilience/exact_resume.py"),
    (lambda: trainer().fit_loop, "_combined_loader_states_to_load", "resilience/exact_resume.py"),
    (trainer, "_accelerator_connector", "resilience/graceful_stop.py"),
    (trainer, "_checkpoint_connector", "resilience/graceful_stop.py"),
    (lambda: trainer().strategy, "_checkpoint_io", "cli/checkpoints.py"),
    (lambda: trainer()._checkpoint_connector, "hpc_save_path", "resilience/graceful_stop.py"),
    (lambda: trainer()._accelerator_connector, "cluster_environment", "resilience/graceful_stop.py"),
]


@pytest.mark.parametrize(("module", "name", "used_in"), MODULE_NAMES, ids=[f"{m}.{n}" for m, n, _ in MODULE_NAMES])
def test_private_module_names_still_exist(module: str, name: str, used_in: str) -> None:
    assert hasattr(importlib.import_module(module), name), f"{module}.{name} is gone: adapt lightscale/{used_in}"


@pytest.mark.parametrize(
    ("owner", "name", "used_in"), CLASS_MEMBERS, ids=[f"{c.__name__}.{n}" for c, n, _ in CLASS_MEMBERS]
)
def test_private_class_members_still_exist(owner: type, name: str, used_in: str) -> None:
    assert hasattr(owner, name), f"{owner.__name__}.{name} is gone: adapt lightscale/{used_in}"


@pytest.mark.parametrize(("make", "name", "used_in"), INSTANCE_MEMBERS, ids=[n for _, n, _ in INSTANCE_MEMBERS])
def test_private_instance_members_still_exist(make: object, name: str, used_in: str) -> None:
    owner = make()  # type: ignore[operator]
    assert hasattr(owner, name), f"{type(owner).__name__}.{name} is gone: adapt lightscale/{used_in}"


def test_the_distributed_sampler_wrapper_keeps_its_order_where_exact_resume_reads_it() -> None:
    """``DistributedSamplerWrapper`` draws each epoch's order into ``dataset._sampler_list`` from
    ``dataset._sampler`` (used by resilience/exact_resume.py)."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    wrapper = DistributedSamplerWrapper(torch.utils.data.SequentialSampler(range(4)), num_replicas=1, rank=0)
    list(iter(wrapper))
    assert hasattr(wrapper.dataset, "_sampler") and wrapper.dataset._sampler_list == [0, 1, 2, 3]


def test_combined_loader_restores_state_through_load_state_dicts() -> None:
    from lightning.pytorch.utilities import CombinedLoader

    assert hasattr(CombinedLoader, "_load_state_dicts"), "adapt lightscale/resilience/exact_resume.py"
