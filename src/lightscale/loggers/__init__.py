"""Experiment loggers: W&B (offline by default) and a CSV log that survives restarts."""

from lightscale.loggers.csv import CSVLogger
from lightscale.loggers.wandb import WandbLogger

__all__ = ["CSVLogger", "WandbLogger"]
