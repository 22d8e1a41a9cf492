"""The loggers a config can name: W&B (offline by default) and a CSV log that survives restarts."""

from lightscale.tracking.csv import CSVLogger
from lightscale.tracking.wandb import WandbLogger

__all__ = ["CSVLogger", "WandbLogger"]
