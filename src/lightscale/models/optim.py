"""Optimizer and LR-schedule choices shared by the LightningModules, selected by name from YAML."""

import math
from collections.abc import Iterable
from typing import Literal

import torch

OptimizerName = Literal["adamw", "sgd"]
SchedulerName = Literal["cosine", "onecycle", "constant"]


def build_optimizer(
    name: OptimizerName, params: Iterable, lr: float, weight_decay: float, fused: bool = False
) -> torch.optim.Optimizer:
    """AdamW (the default) or SGD with Nesterov momentum; ``fused`` selects AdamW's single-kernel implementation
    (CPU and CUDA tensors)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, floor: float = 0.0) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``floor`` at ``total_steps`` (flat after)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    name: SchedulerName,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    floor: float = 0.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step schedule over ``total_steps`` optimizer steps."""
    if name == "onecycle":
        max_lrs = [group["lr"] for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lrs, total_steps=max(total_steps, 2))
    if name == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, floor)
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
