"""Lightning callbacks that the template adds to every run, or that configs can switch on."""

from lightscale.callbacks.best_metrics import BestMetrics
from lightscale.callbacks.checkpoint import Checkpoint
from lightscale.callbacks.epoch_stats import EpochStats
from lightscale.callbacks.history import History
from lightscale.callbacks.line_logger import LineLogger
from lightscale.callbacks.progress import ProgressBar
from lightscale.callbacks.provenance import Provenance
from lightscale.callbacks.run_summary import RunSummary
from lightscale.callbacks.save_config import SaveRunConfig
from lightscale.callbacks.throughput import ThroughputLogger
from lightscale.callbacks.tuning import BatchSizeFinder, LRFinder

__all__ = [
    "BatchSizeFinder",
    "BestMetrics",
    "Checkpoint",
    "EpochStats",
    "History",
    "LRFinder",
    "LineLogger",
    "ProgressBar",
    "Provenance",
    "RunSummary",
    "SaveRunConfig",
    "ThroughputLogger",
]
