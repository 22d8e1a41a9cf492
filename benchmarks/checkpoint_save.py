"""Checkpoint saving: how long the training loop waits for one save, in the foreground and with
``checkpoint.async_save`` (a background thread that writes what a host-memory copy holds).

The state is a GPT's training state (fp32 weights + AdamW's two moments, as a Lightning checkpoint holds them) of
``--params`` parameters; each save goes through the same writer the runs use (temporary file, fsync, rename) into a
temporary folder on the disk of the working directory. "Blocked" is the time ``save_checkpoint`` takes to return
(for async_save from its second save on, when its host buffers exist: a run saves many times); "written" is until
the file is on disk.

    .venv/bin/python benchmarks/checkpoint_save.py [--params 124000000] [--repeats 3] [--quick]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, base_parser, finish, median, row

BENCH = "checkpoint_save"
TARGET = 0.2  # the background save blocks the loop for at most a fifth of the foreground save


def training_state(params: int) -> dict:
    """Weights and AdamW moments of ``params`` parameters, in 64 matrices (as a model's layers would be)."""
    import torch

    per = params // 64
    weights = {f"layer{i}.weight": torch.randn(per) for i in range(64)}
    moments = {i: {"exp_avg": torch.randn(per), "exp_avg_sq": torch.rand(per)} for i in range(64)}
    return {"state_dict": weights, "optimizer_states": [{"state": moments}], "global_step": 1}


def _same(a: Path, b: Path) -> bool:
    """Both files hold the same tensors, bit for bit."""
    import torch

    left, right = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    pairs = [(left["state_dict"][k], right["state_dict"][k]) for k in left["state_dict"]]
    for i, moments in left["optimizer_states"][0]["state"].items():
        pairs += [(v, right["optimizer_states"][0]["state"][i][k]) for k, v in moments.items()]
    return len(pairs) == 192 and all(torch.equal(x, y) for x, y in pairs)


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=None, help="parameters (default 124M, GPT-2 small; quick: 8M)")
    parser.add_argument("--repeats", type=int, default=None, help="saves of each kind (default 3; quick: 1)")
    args = parser.parse_args()
    params = args.params or (8_000_000 if args.quick else 124_000_000)
    repeats = args.repeats or (1 if args.quick else 3)

    from lightscale.resilience.async_save import BackgroundCheckpointIO
    from lightscale.resilience.checkpoint_io import SafeCheckpointIO

    state = training_state(params)
    size_gb = params * 12 / 1e9
    blocked: dict[str, list[float]] = {"foreground": [], "background": []}
    written: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-", dir=REPO) as folder:
        background = BackgroundCheckpointIO()
        background.save_checkpoint(state, Path(folder) / "bg.ckpt")  # allocates the host buffers; not counted
        background.wait()
        for r in range(repeats):
            start = time.perf_counter()
            SafeCheckpointIO().save_checkpoint(state, Path(folder) / "fg.ckpt")
            blocked["foreground"].append(time.perf_counter() - start)
            start = time.perf_counter()
            background.save_checkpoint(state, Path(folder) / "bg.ckpt")
            blocked["background"].append(time.perf_counter() - start)
            background.wait()
            written.append(time.perf_counter() - start)
            print(
                f"  round {r + 1}/{repeats}: foreground {blocked['foreground'][-1]:.2f} s, background blocked "
                f"{blocked['background'][-1]:.2f} s (written after {written[-1]:.2f} s)",
                flush=True,
            )
        background.teardown()
        same = _same(Path(folder) / "fg.ckpt", Path(folder) / "bg.ckpt")
    fg, bg = median(blocked["foreground"]), median(blocked["background"])
    case = f"{params / 1e6:.0f}M params + AdamW ({size_gb:.1f} GB)"
    note = f"median of {repeats}"
    rows = [
        row(BENCH, case, "loop blocked, foreground save", fg, "s", note=note),
        row(BENCH, case, "loop blocked, async_save", bg, "s", note=f"{note}; host copy of the state"),
        row(BENCH, case, "async_save written after", median(written), "s", note=note),
        row(BENCH, case, "blocked ratio async/foreground", bg / fg, "x", f"<= {TARGET}", bg / fg <= TARGET),
        row(BENCH, case, "same file as the foreground save", "yes" if same else "no", ok=same),
    ]
    return finish(rows, args.json)


if __name__ == "__main__":
    sys.exit(main())
