"""Write what ``predict`` returns into the run directory, one JSON object per sample: ``predictions.jsonl``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

PREDICTIONS_FILE = "predictions.jsonl"


def _plain(value: Any) -> Any:
    """A JSON value: tensors and numpy data as numbers or lists, non-finite floats as strings."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    return value


def _length(value: Any) -> int | None:
    if isinstance(value, torch.Tensor):
        return int(value.shape[0]) if value.ndim > 0 else None
    if isinstance(value, (list, tuple)):
        return len(value)
    return None


def rows(prediction: Any) -> list[dict[str, Any]]:
    """One row per sample of a batch's prediction.

    - a tensor or list with a leading batch dimension: ``{"prediction": <sample>}`` per sample;
    - a list of strings (generated texts): ``{"text": <string>}`` per sample;
    - a dict of such (``{"label": tensor[B], "probability": tensor[B]}``): the keys per sample;
    - anything else: one row ``{"prediction": value}``.
    """
    if isinstance(prediction, dict):
        lengths = {_length(value) for value in prediction.values()}
        if len(lengths) == 1 and None not in lengths:
            (size,) = lengths
            return [{key: _plain(value[i]) for key, value in prediction.items()} for i in range(size)]
        return [{key: _plain(value) for key, value in prediction.items()}]
    if isinstance(prediction, (list, tuple)) and prediction and all(isinstance(p, str) for p in prediction):
        return [{"text": text} for text in prediction]
    if _length(prediction) is not None:
        return [{"prediction": _plain(item)} for item in prediction]
    return [{"prediction": _plain(prediction)}]


class PredictionWriter(BasePredictionWriter):
    """Appends every predict batch's outputs to ``<run_dir>/predictions.jsonl`` as it comes (nothing is held in
    memory), each row with the sample's ``index`` in the predict dataset when Lightning knows it; generated texts
    are also printed. With several processes each rank writes ``predictions.rank<R>.jsonl``. ``summary.json``
    gets ``predict: {file, rows}``.
    """

    def __init__(self, print_texts: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.print_texts = print_texts
        self.path: Path | None = None
        self.count = 0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        name = PREDICTIONS_FILE if trainer.world_size == 1 else f"predictions.rank{trainer.global_rank}.jsonl"
        self.path = Path(trainer.default_root_dir) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self.count = 0

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.path is None:
            return
        batch_rows = rows(prediction)
        indices = list(batch_indices) if batch_indices is not None else []
        with self.path.open("a") as file:
            for i, row in enumerate(batch_rows):
                if len(indices) == len(batch_rows):
                    row = {"index": int(indices[i]), **row}
                file.write(json.dumps(row) + "\n")
                if self.print_texts and "text" in row:
                    print(row["text"], flush=True)
        self.count += len(batch_rows)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.path is not None:
            rank_zero_info(f"lightscale: {self.count} prediction(s) written to {self.path}")
