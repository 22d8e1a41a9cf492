"""Lightning callbacks that the template adds to every run, or that configs can switch on."""

from lightscale.callbacks.checkpoint import Checkpoint
from lightscale.callbacks.run_summary import RunSummary
from lightscale.callbacks.save_config import SaveRunConfig

__all__ = ["Checkpoint", "RunSummary", "SaveRunConfig"]
