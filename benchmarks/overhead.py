"""Trainer overhead: the template (LightscaleCLI -> LightningModule + Trainer, with the experiment's default
callbacks and loggers) against a hand-written PyTorch loop doing the same work.

Both arms get the same initial weights (the template model's state_dict, copied), the same batches in the
same order (the DataModule's own loader, the global RNG re-seeded before each arm), the same optimizer,
LR schedule, gradient clipping and number of steps, in one process with the same torch thread count. The
plain loop also prepares its data, validates and saves a checkpoint (last + best) at the points where the
template does, so the whole-run ratio compares like with like; it has no logger, no progress display and no
sanity check.

Per-step time is the interval between the starts of consecutive training batches (after the batch is
fetched), within an epoch: data loading, forward, backward, optimizer and every per-step hook are in it,
epoch-end validation and checkpointing are not (they are in the whole-run time). Warm-up steps are dropped.
The arms alternate (T,P then P,T, ...) for ``--rounds`` rounds; the table reports the median over rounds of
the ratio of median step times, and asserts that the per-step losses of the two arms match.

    .venv/bin/python benchmarks/overhead.py [--case digits|gpt|all] [--rounds 5] [--threads 1] [--quick]
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, base_parser, finish, machine, median, row, setup_quiet, skipped

BENCH = "overhead"
TARGET = 1.03
WARMUP = 5  # steps dropped at the start of each arm
# Losses of the two arms: identical on CPU in practice; the tolerance only absorbs reduction-order noise.
LOSS_RTOL = 1e-5


@dataclass
class Arm:
    """What one arm of one round measured."""

    # (epoch, wall, process CPU time, main-thread CPU time) at each batch start
    starts: list[tuple[int, float, float, float]] = field(default_factory=list)
    losses: list[Any] = field(default_factory=list)  # detached loss tensors, one per step
    seconds: float = 0.0  # whole run: Trainer.fit / the plain loop, validation and checkpoints included
    optimizer: str = ""  # the optimizer and its settings, to check that both arms used the same

    def step_times(self, clock: int = 1) -> list[float]:
        """Intervals between consecutive batch starts within an epoch, warm-up dropped; ``clock`` 1 is wall
        time, 2 the process's CPU time (all its threads: less sensitive to other processes on the machine), 3 the
        training thread's CPU time."""
        out = []
        for i in range(WARMUP, len(self.starts) - 1):
            first, second = self.starts[i], self.starts[i + 1]
            if first[0] == second[0]:
                out.append(second[clock] - first[clock])
        return out


def make_probe(arm: Arm) -> Any:
    """A callback that timestamps every training batch start and keeps the step's loss (no host sync)."""
    from lightning.pytorch.callbacks import Callback

    class StepProbe(Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            arm.starts.append((trainer.current_epoch, time.perf_counter(), time.process_time(), time.thread_time()))

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            arm.losses.append(outputs["loss"].detach())

    return StepProbe()


# ------------------------------------------------------------------------------------------------ the cases


@dataclass
class Case:
    name: str
    config: str
    overrides: list[str]
    plain: Callable[[Any, dict[str, Any], Arm, int], None]  # (cli, initial state, arm, seed)
    target: float = TARGET
    rtol: float = LOSS_RTOL
    rounds: int = 5  # alternating rounds (a long step needs fewer: its per-step noise averages out)
    run_target: float | None = None  # whole-run ratio, where one is set


def digits_case(quick: bool) -> Case:
    epochs = 2 if quick else 10
    return Case(
        "digits CNN",
        "configs/experiment/digits.yaml",
        ["--trainer.max_epochs", str(epochs)],
        plain_digits,
        rounds=9,  # short steps: more rounds, so a few seconds of a noisy neighbour cannot decide the median
    )


def gpt124m_case(quick: bool, smoke: bool = False) -> Case:
    """GPT-2 small from configs/experiment/gpt2-124m.yaml (bf16, compiled blocks) on one GPU, random tokens
    (benchmarks/synthetic.py) instead of OpenWebText; one batch per optimizer step. ``smoke``: a tiny version
    on the CPU, to check the harness."""
    steps = 20 if quick or smoke else 100
    data = (
        {"vocab_size": 256, "block_size": 64, "batch_size": 4}
        if smoke
        else {"vocab_size": 50304, "block_size": 1024, "batch_size": 12}
    )
    overrides = ["--data.class_path", "synthetic.RandomTokens"]
    for key, value in data.items():
        overrides += [f"--data.init_args.{key}", str(value)]
    trainer = {
        "accelerator": "cpu" if smoke else "gpu",
        "devices": 1,
        "max_steps": steps,
        "accumulate_grad_batches": 1,
        "val_check_interval": steps // 2,
        "limit_val_batches": 4,
    }
    for key, value in trainer.items():
        overrides += [f"--trainer.{key}", str(value)]
    model = {"scheduler.init_args.warmup_steps": 10}
    if smoke:
        model.update(n_layer=2, n_head=2, n_embd=64, block_size=64, compile="false")
    for key, value in model.items():
        overrides += [f"--model.init_args.{key}", str(value)]
    return Case(
        "GPT-124M harness (tiny, CPU)" if smoke else "GPT-124M, GPU",
        "configs/experiment/gpt2-124m.yaml",
        overrides,
        plain_gpt,
        target=1.02,
        rtol=LOSS_RTOL if smoke else 2e-2,  # bf16 + compiled kernels on a GPU: not bitwise reproducible
    )


def gpt_case(quick: bool) -> Case:
    steps = 30 if quick else 60
    return Case(
        "tiny GPT",
        "configs/experiment/gpt-cpu.yaml",
        ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps // 2)],
        plain_gpt,
        target=1.02,
        run_target=1.08,
        # Two identical arms differ by up to ~3 % on a 2-core VM (memory placement, neighbours): many short
        # alternating rounds give a steadier median than a few long ones.
        rounds=9,
    )


def optimizer_settings(optimizer: Any) -> str:
    keys = ("lr", "betas", "eps", "weight_decay", "amsgrad", "foreach", "fused", "maximize", "momentum", "nesterov")
    settings = {k: optimizer.defaults[k] for k in keys if k in optimizer.defaults}
    groups = [(len(g["params"]), g.get("weight_decay")) for g in optimizer.param_groups]
    return f"{type(optimizer).__name__}({settings}, groups {groups})"


def fresh_datamodule(cli: Any) -> Any:
    """A new instance of the template's DataModule with the same arguments (its loaders are built alike)."""
    init_args = {k: v for k, v in cli.datamodule.hparams.items() if not k.startswith("_")}
    return type(cli.datamodule)(**init_args)


def prepared_datamodule(cli: Any) -> tuple[Any, float]:
    """A fresh DataModule after ``prepare_data`` and ``setup("fit")``, and the seconds they took: a hand-written
    script prepares its data too, and ``Trainer.fit`` times it in the template's arm."""
    data = fresh_datamodule(cli)
    start = time.perf_counter()
    data.prepare_data()
    data.setup("fit")
    return data, time.perf_counter() - start


def _save(path: Path, net: Any, optimizer: Any, scheduler: Any, step: int) -> None:
    import torch

    state = {"state_dict": net.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
    state["lr_scheduler"] = scheduler.state_dict()
    torch.save(state, path)


def plain_digits(cli: Any, init: dict[str, Any], arm: Arm, seed: int) -> None:
    """What a user would write by hand for the digits experiment."""
    import lightning as L
    import torch
    import torch.nn.functional as F

    from lightscale.nets import SmallCNN
    from lightscale.schedules import build_scheduler

    hp, trainer = cli.model.hparams, cli.trainer
    data, prep_seconds = prepared_datamodule(cli)
    net = SmallCNN(hp.num_classes, hp.in_channels, tuple(hp.channels), hp.dropout)
    net.load_state_dict({k.removeprefix("net."): v for k, v in init.items() if k.startswith("net.")})
    optimizer = cli.model.optimizer(net.parameters(), lr=hp.lr)  # the configured optimizer, as the model builds it
    arm.optimizer = optimizer_settings(optimizer)
    out = Path(tempfile.mkdtemp(prefix="plain-digits-"))
    best, step = math.inf, 0
    L.seed_everything(seed, verbose=False)
    start = time.perf_counter()
    # after seeding: the loader's shuffling generator is seeded from the global RNG when it is built
    train_loader, val_loader = data.train_dataloader(), data.val_dataloader()
    scheduler = build_scheduler(cli.model.scheduler, optimizer, trainer.max_epochs * len(train_loader))
    for epoch in range(trainer.max_epochs):
        net.train()
        for images, labels in train_loader:
            arm.starts.append((epoch, time.perf_counter(), time.process_time(), time.thread_time()))
            loss = F.cross_entropy(net(images), labels)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), trainer.gradient_clip_val)
            optimizer.step()
            scheduler.step()
            arm.losses.append(loss.detach())
            step += 1
        net.eval()
        outer_rng = torch.random.get_rng_state()  # the template keeps validation out of the training stream
        with torch.no_grad():
            total_loss, correct, count = 0.0, 0, 0
            for images, labels in val_loader:
                logits = net(images)
                total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
                correct += (logits.argmax(-1) == labels).sum().item()
                count += len(labels)
        torch.random.set_rng_state(outer_rng)
        val_loss = total_loss / count
        if val_loss < best:
            best = val_loss
            _save(out / "best.ckpt", net, optimizer, scheduler, step)
        _save(out / "last.ckpt", net, optimizer, scheduler, step)
    arm.seconds = time.perf_counter() - start + prep_seconds
    shutil.rmtree(out, ignore_errors=True)


def plain_gpt(cli: Any, init: dict[str, Any], arm: Arm, seed: int) -> None:
    """What a user would write by hand for the GPT experiments (nanoGPT's train.py, in short): on the Trainer's
    device, in its precision (bf16 autocast for ``bf16-mixed``), blocks compiled when the model compiles them."""
    import contextlib

    import lightning as L
    import torch

    from lightscale.models.causal_lm import param_groups
    from lightscale.nets.gpt import GPT, GPTConfig
    from lightscale.schedules import build_scheduler

    hp, trainer = cli.model.hparams, cli.trainer
    device = trainer.strategy.root_device
    data, prep_seconds = prepared_datamodule(cli)
    config = GPTConfig(hp.vocab_size, hp.block_size, hp.n_layer, hp.n_head, hp.n_embd, hp.dropout, hp.bias)
    net = GPT(config)
    net.load_state_dict({k.removeprefix("net."): v for k, v in init.items() if k.startswith("net.")})
    net.to(device)
    if hp.compile:
        for block in net.blocks:
            block.compile()
    bf16 = str(trainer.precision).startswith("bf16")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    optimizer = cli.model.optimizer(param_groups(net, hp.weight_decay), lr=hp.lr)  # as CausalLM builds it
    arm.optimizer = optimizer_settings(optimizer)
    steps, every = trainer.max_steps, int(trainer.val_check_interval)
    scheduler = build_scheduler(cli.model.scheduler, optimizer, steps)
    tokenizer = getattr(data, "tokenizer", None)
    out = Path(tempfile.mkdtemp(prefix="plain-gpt-"))
    best = math.inf
    L.seed_everything(seed, verbose=False)
    start = time.perf_counter()
    train_loader, val_loader = data.train_dataloader(), data.val_dataloader()
    net.train()
    for step, batch in enumerate(train_loader, start=1):
        arm.starts.append((0, time.perf_counter(), time.process_time(), time.thread_time()))
        batch = batch.to(device, non_blocking=True)
        with autocast:
            _, loss = net(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), trainer.gradient_clip_val)
        optimizer.step()
        scheduler.step()
        arm.losses.append(loss.detach())
        if step % every == 0:
            net.eval()
            outer_rng = torch.random.get_rng_state()
            with torch.no_grad(), autocast:
                losses = [net(b[:, :-1].to(device), b[:, 1:].to(device))[1] for b in val_loader]
                val_loss = torch.stack(losses).mean().item()
                if hp.sample_prompt and tokenizer is not None:
                    ids = torch.as_tensor(tokenizer.encode(hp.sample_prompt), dtype=torch.long, device=device)[None]
                    generator = torch.Generator(device=device).manual_seed(step)
                    with torch.compiler.set_stance("force_eager"):
                        sample = net.generate(ids, hp.max_new_tokens, hp.temperature, hp.top_k, generator=generator)
                    tokenizer.decode(sample[0].cpu())
            torch.random.set_rng_state(outer_rng)
            net.train()
            if val_loss < best:
                best = val_loss
                _save(out / "best.ckpt", net, optimizer, scheduler, step)
            _save(out / "last.ckpt", net, optimizer, scheduler, step)
        if step >= steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    arm.seconds = time.perf_counter() - start + prep_seconds
    shutil.rmtree(out, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ running


def build_cli(case: Case, root: str, extra: list[str]) -> Any:
    from lightscale.cli import LightscaleCLI
    from lightscale.core.run_dir import RUN_DIR_ENV

    args = ["--config", str(REPO / case.config), "--run.root", root, *case.overrides, *extra]
    cli = LightscaleCLI(args=args, run=False)
    os.environ.pop(RUN_DIR_ENV, None)  # the CLI exports its run directory for DDP children: next round, a new one
    return cli


def run_template(cli: Any, arm: Arm, seed: int) -> None:
    import lightning as L

    from lightscale.cli.main import finish_wandb

    cli.trainer.callbacks.append(make_probe(arm))
    L.seed_everything(seed, verbose=False)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if cli.trainer.strategy.root_device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    finish_wandb()  # as the CLI does after fit: the user waits for it
    arm.seconds = time.perf_counter() - start
    arm.optimizer = optimizer_settings(cli.trainer.optimizers[0])


def run_bare_trainer(cli: Any, arm: Arm, seed: int) -> None:
    """The template's model and data under a bare ``lightning.Trainer``: no callbacks, logger, checkpointing,
    progress display or model summary; Lightning's default profiler. What Lightning's loop costs by itself."""
    import lightning as L

    trainer = L.Trainer(
        max_epochs=cli.trainer.max_epochs,
        max_steps=cli.trainer.max_steps,
        val_check_interval=cli.trainer.val_check_interval,
        check_val_every_n_epoch=cli.trainer.check_val_every_n_epoch,
        limit_val_batches=cli.trainer.limit_val_batches,
        gradient_clip_val=cli.trainer.gradient_clip_val,
        callbacks=[make_probe(arm)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=cli.trainer.default_root_dir,
    )
    L.seed_everything(seed, verbose=False)
    start = time.perf_counter()
    trainer.fit(cli.model, datamodule=fresh_datamodule(cli))
    arm.seconds = time.perf_counter() - start
    arm.optimizer = optimizer_settings(trainer.optimizers[0])


def fixed_overhead(quick: bool, seed: int) -> list[dict[str, Any]]:
    """Per-step cost that does not depend on the model: the digits experiment with a 2-channel CNN (almost no
    compute), template vs bare Trainer vs plain loop, in ms per step (CPU time, medians over rounds)."""
    case = digits_case(quick)
    case.name = "fixed cost (2-channel CNN)"
    case.overrides = ["--trainer.max_epochs", "2" if quick else "5", "--model.init_args.channels", "[2]"]
    times: dict[str, list[float]] = {"template": [], "bare": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="bench-fixed-") as root:
        for _ in range(2 if quick else 3):
            cli = build_cli(case, root, [])
            init = copy.deepcopy(cli.model.state_dict())
            arms = {"template": Arm(), "bare": Arm(), "plain": Arm()}
            run_template(cli, arms["template"], seed)
            bare_cli = build_cli(case, root, [])
            bare_cli.model.load_state_dict(init)
            run_bare_trainer(bare_cli, arms["bare"], seed)
            case.plain(cli, init, arms["plain"], seed)
            for name, arm in arms.items():
                times[name].append(median(arm.step_times(2)))
            if not compare_losses(arms["template"], arms["plain"], LOSS_RTOL)[0]:
                raise RuntimeError("fixed-cost case: template and plain losses differ")
    plain = median(times["plain"])
    template, bare = median(times["template"]) - plain, median(times["bare"]) - plain
    print(f"  fixed cost per step: template +{1e3 * template:.2f} ms, bare Trainer +{1e3 * bare:.2f} ms", flush=True)
    return [
        row(BENCH, case.name, "template - plain, per step", 1e3 * template, "ms", note="CPU time; all of it overhead"),
        row(
            BENCH,
            case.name,
            "bare Trainer - plain, per step",
            1e3 * bare,
            "ms",
            note="Lightning's loop alone: no callbacks, logger, checkpointing",
        ),
    ]


def describe(cli: Any) -> str:
    """The template arm's callbacks and loggers, as the CLI built them."""
    trainer = cli.trainer
    callbacks = [type(c).__name__ for c in trainer.callbacks if type(c).__name__ != "StepProbe"]
    loggers = [type(lg).__name__ for lg in trainer.loggers]
    return f"callbacks {'+'.join(callbacks)}; loggers {'+'.join(loggers) or 'none'}"


def compare_losses(template: Arm, plain: Arm, rtol: float) -> tuple[bool, float]:
    import torch

    if len(template.losses) != len(plain.losses):
        return False, math.inf
    a, b = torch.stack(template.losses), torch.stack(plain.losses)
    diff = (a - b).abs().max().item()
    return bool(torch.allclose(a.float().cpu(), b.float().cpu(), rtol=rtol, atol=0.0)), diff


def run_case(case: Case, rounds: int, seed: int, extra: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    per_round: list[dict[str, float]] = []
    all_match, worst, description, n_steps = True, 0.0, "", 0
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as root:
        for r in range(rounds):
            cli = build_cli(case, root, extra)
            init = copy.deepcopy(cli.model.state_dict())
            description = describe(cli)
            template, plain = Arm(), Arm()
            order = ("template", "plain") if r % 2 == 0 else ("plain", "template")
            for which in order:
                if which == "template":
                    run_template(cli, template, seed)
                else:
                    case.plain(cli, init, plain, seed)
            if template.optimizer != plain.optimizer:
                raise RuntimeError(f"the arms used different optimizers: {template.optimizer} vs {plain.optimizer}")
            match, diff = compare_losses(template, plain, case.rtol)
            all_match &= match
            worst = max(worst, diff)
            n_steps = len(template.losses)
            m = {
                "t_wall": median(template.step_times(1)),
                "p_wall": median(plain.step_times(1)),
                "t_cpu": median(template.step_times(2)),
                "p_cpu": median(plain.step_times(2)),
                "t_run": template.seconds,
                "p_run": plain.seconds,
            }
            m.update(wall=m["t_wall"] / m["p_wall"], cpu=m["t_cpu"] / m["p_cpu"], run=m["t_run"] / m["p_run"])
            per_round.append(m)
            print(
                f"  {case.name} round {r + 1}/{rounds} ({'/'.join(order)}): step {1e3 * m['t_wall']:.3f} vs "
                f"{1e3 * m['p_wall']:.3f} ms -> {m['wall']:.3f} (CPU time {m['cpu']:.3f}); run {m['t_run']:.2f} vs "
                f"{m['p_run']:.2f} s; losses match {match} (max |diff| {diff:.2e}, {n_steps} steps)",
                flush=True,
            )

    def med(key: str) -> float:
        return median(m[key] for m in per_round)

    ratio, walls = med("wall"), [m["wall"] for m in per_round]
    rows = [
        row(BENCH, case.name, "step time, template", 1e3 * med("t_wall"), "ms", note=f"{n_steps} steps/run"),
        row(BENCH, case.name, "step time, plain loop", 1e3 * med("p_wall"), "ms"),
        row(
            BENCH,
            case.name,
            "step-time ratio template/plain",
            ratio,
            "x",
            f"<= {case.target}",
            ratio <= case.target,
            f"median of {rounds} alternating rounds (min {min(walls):.3f}, max {max(walls):.3f})",
        ),
        row(
            BENCH,
            case.name,
            "step CPU-time ratio template/plain",
            med("cpu"),
            "x",
            note="process CPU time per step: less sensitive to other load on the machine",
        ),
        row(
            BENCH,
            case.name,
            "whole-run ratio template/plain",
            med("run"),
            "x",
            *((f"<= {case.run_target}", med("run") <= case.run_target) if case.run_target else ()),
            note=f"{med('t_run'):.2f} s vs {med('p_run'):.2f} s: fit incl. sanity check, W&B init, "
            "validation, checkpoints",
        ),
        row(
            BENCH,
            case.name,
            "losses match",
            "yes" if all_match else "NO",
            target="identical" if case.rtol <= LOSS_RTOL else f"rtol {case.rtol:g}",
            ok=all_match,
            note=f"max |diff| {worst:.1e} over {n_steps} steps x {rounds} rounds",
        ),
    ]
    return rows, {"case": case.name, "template": description, "rounds": per_round}


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["digits", "gpt", "gpu", "gpu-smoke", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (9; quick 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in both arms")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--progress-bar", choices=["default", "on", "off"], default="default")
    args = parser.parse_args()
    setup_quiet()
    import torch

    torch.set_num_threads(args.threads)
    extra = [] if args.progress_bar == "default" else ["--trainer.enable_progress_bar", str(args.progress_bar == "on")]
    cuda = torch.cuda.is_available()
    cases = {"digits": [digits_case(args.quick)], "gpt": [gpt_case(args.quick)]}
    cases["gpu"] = [gpt124m_case(args.quick)] if cuda else []
    cases["gpu-smoke"] = [gpt124m_case(args.quick, smoke=True)]
    cases["all"] = cases["digits"] + cases["gpt"] + cases["gpu"]
    rows, details = [], []
    if args.case in ("gpu", "all") and not cuda:
        rows.append(skipped(BENCH, "GPT-124M, GPU", "step-time ratio template/plain", target="<= 1.02"))
    if args.case in ("digits", "all"):
        rows += fixed_overhead(args.quick, args.seed)
    for case in cases[args.case]:
        rounds = args.rounds or (2 if args.quick else case.rounds)
        case_rows, detail = run_case(case, rounds, args.seed, extra)
        rows += case_rows
        details.append(detail)
        print(f"  {case.name}: template = {detail['template']}", flush=True)
    return finish(rows, args.json, {"machine": machine(), "threads": args.threads, "details": details})


if __name__ == "__main__":
    sys.exit(main())
