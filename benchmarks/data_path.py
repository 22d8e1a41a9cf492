"""Data path: batches/s each example's DataModule delivers on its own vs batches/s its model consumes.

The DataModule and model are built by the CLI from the experiment config (default settings: the loader's
``num_workers``, batch size and block size as shipped). Delivery is the training loader iterated with nothing
else to do; consumption is the model's own training step (forward, loss, backward, clipping, fused AdamW) on
batches already in memory, i.e. the fastest the model could take data. The loader must deliver >= 5x that,
so data loading is never what a run waits on.

    .venv/bin/python benchmarks/data_path.py [--quick]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, base_parser, finish, machine, row, setup_quiet

BENCH = "data path"
TARGET = 5.0
CASES = {
    "digits CNN": "configs/experiment/digits.yaml",
    "tiny GPT": "configs/experiment/gpt-cpu.yaml",
}


def build(config: str, root: str) -> Any:
    from lightscale.cli import LightscaleCLI
    from lightscale.core.run_dir import RUN_DIR_ENV

    args = [
        "--config",
        str(REPO / config),
        "--run.root",
        root,
        "--trainer.logger",
        "false",
        "--trainer.callbacks",
        "[]",
    ]
    cli = LightscaleCLI(args=args, run=False)
    os.environ.pop(RUN_DIR_ENV, None)
    return cli


def delivery_rate(datamodule: Any, min_batches: int, min_seconds: float) -> tuple[float, int]:
    """Batches/s of the training loader alone (epochs are restarted as needed; iterator creation included)."""
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    for _ in zip(range(3), loader, strict=False):  # warm-up: worker start, page cache
        pass
    count, start = 0, time.perf_counter()
    while count < min_batches or time.perf_counter() - start < min_seconds:
        for _ in loader:
            count += 1
            if count >= min_batches and time.perf_counter() - start >= min_seconds:
                break
    return count / (time.perf_counter() - start), count


def consumption_rate(model: Any, batches: list[Any], kind: str, steps: int) -> float:
    """Training steps/s of the model on batches already in memory."""
    import torch
    import torch.nn.functional as F

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(batch: Any) -> None:
        if kind == "digits CNN":
            images, labels = batch
            loss = F.cross_entropy(model(images), labels)
        else:
            _, loss = model.net(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    for batch in batches[:3]:
        step(batch)
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    return steps / (time.perf_counter() - start)


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default, all cores)")
    args = parser.parse_args()
    setup_quiet()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as root:
        for name, config in CASES.items():
            cli = build(config, root)
            data = cli.datamodule
            hp = data.hparams
            deliver, n = delivery_rate(data, 20 if args.quick else 300, 0.2 if args.quick else 3.0)
            batches = [b for _, b in zip(range(8), data.train_dataloader(), strict=False)]
            consume = consumption_rate(cli.model, batches, name, 5 if args.quick else 40)
            ratio = deliver / consume
            settings = f"batch {hp.batch_size}, num_workers {hp.num_workers}"
            if "block_size" in hp:
                settings += f", block {hp.block_size}"
            rows += [
                row(BENCH, name, "loader delivers", deliver, "batches/s", note=f"{settings}; {n} batches"),
                row(
                    BENCH, name, "model consumes", consume, "batches/s", note=f"torch threads {torch.get_num_threads()}"
                ),
                row(BENCH, name, "delivery / consumption", ratio, "x", f">= {TARGET:g}", ratio >= TARGET),
            ]
            print(f"  {name}: loader {deliver:,.0f} batches/s, model {consume:,.1f} batches/s -> {ratio:,.0f}x")
    return finish(rows, args.json, {"machine": machine()})


if __name__ == "__main__":
    sys.exit(main())
