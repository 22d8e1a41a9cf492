"""Experiment loggers."""

from lightscale.loggers.wandb import WandbLogger

__all__ = ["WandbLogger"]
