"""Lightning's CSV logger, except that a restarted run continues its ``metrics.csv`` instead of deleting it."""

import csv
import os
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class HistoryWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts (so every resume or requeue lost
    the rows before it); this one keeps the file, takes its header as the known columns, and can cut it back to
    the steps a checkpoint had seen (:meth:`truncate`), so a resumed run's history is the uninterrupted run's."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])

    def flush(self) -> None:
        """Write what is buffered (the CSV logger writes every ``flush_logs_every_n_steps`` otherwise)."""
        self.save()

    def truncate(self, before_step: int) -> int:
        """Drop the rows of ``metrics.csv`` logged at ``step >= before_step``: the steps a resumed run logs again
        (rows still buffered are this run's own and stay). Returns how many rows were removed."""
        if not self._fs.isfile(self.metrics_file_path):
            return 0
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            rows = list(reader)
            header = list(reader.fieldnames or [])
        kept = [row for row in rows if not row.get("step") or int(float(row["step"])) < before_step]
        if len(kept) == len(rows):
            return 0
        tmp = f"{self.metrics_file_path}.tmp"
        with open(tmp, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=header)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.metrics_file_path)
        return len(rows) - len(kept)


class CSVLogger(_LightningCSVLogger):
    """``metrics.csv`` (and ``hparams.yaml``) in ``save_dir/name/version``; the CLI puts it at the top of the run
    directory. With :class:`~lightscale.callbacks.History` (in every run) the file covers the whole run across
    restarts: rows of the steps after the checkpoint a run resumes from are replaced by the resumed run's."""

    @property
    @rank_zero_experiment
    def experiment(self) -> HistoryWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = HistoryWriter(log_dir=self.log_dir)
        return self._experiment

    def __init__(self, save_dir: str = ".", name: str = "", version: Any = "", **kwargs: Any) -> None:
        super().__init__(save_dir=save_dir, name=name, version=version, **kwargs)
