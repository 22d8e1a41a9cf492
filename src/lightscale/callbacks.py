"""Every callback a config can name, at one short class path (``lightscale.callbacks.ThroughputLogger``).

Each lives with its concern: :mod:`lightscale.resilience` (checkpoints, resume, signals, NaNs, hangs),
:mod:`lightscale.tracking` (what a run records), :mod:`lightscale.training` (tuners, checks). The ones a run gets
by default are listed in ``src/lightscale/cli/defaults.yaml``.
"""

from lightscale.resilience.checkpoint import Checkpoint
from lightscale.resilience.exact_resume import ExactResume
from lightscale.resilience.graceful_stop import GracefulStop
from lightscale.resilience.hang_watch import HangWatch
from lightscale.resilience.nonfinite import NonFiniteGuard
from lightscale.resilience.resume import ResumeCheck
from lightscale.tracking.best_metrics import BestMetrics
from lightscale.tracking.epoch_stats import EpochStats
from lightscale.tracking.history import History
from lightscale.tracking.line_logger import LineLogger
from lightscale.tracking.memory import MemoryWatch
from lightscale.tracking.predictions import PredictionWriter
from lightscale.tracking.progress import ProgressBar
from lightscale.tracking.provenance import Provenance
from lightscale.tracking.rank_times import RankTimes
from lightscale.tracking.summary import RunSummary
from lightscale.tracking.throughput import ThroughputLogger
from lightscale.training.batch_check import FirstBatchCheck
from lightscale.training.parallel import ShardingCheck
from lightscale.training.tuning import BatchSizeFinder, LRFinder

__all__ = [
    "BatchSizeFinder",
    "BestMetrics",
    "Checkpoint",
    "EpochStats",
    "ExactResume",
    "FirstBatchCheck",
    "GracefulStop",
    "HangWatch",
    "History",
    "LRFinder",
    "LineLogger",
    "MemoryWatch",
    "NonFiniteGuard",
    "PredictionWriter",
    "ProgressBar",
    "Provenance",
    "RankTimes",
    "ResumeCheck",
    "RunSummary",
    "ShardingCheck",
    "ThroughputLogger",
]
