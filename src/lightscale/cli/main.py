"""The ``lightscale`` training commands' entry point: every mistake a user can make is one line and exit code 2;
a run stopped by a signal exits with ``128 + signal`` after saving its checkpoint."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from typing import Any

import torch
from jsonargparse import ArgumentError
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightscale.cli.app import LightscaleCLI
from lightscale.cli.config_files import check_config_files, given_on_command_line, where_set
from lightscale.cluster.launch import check_srun
from lightscale.core.errors import UserError, one_line
from lightscale.core.run_dir import mark_wandb_run_finished
from lightscale.resilience.graceful_stop import Terminated

TRACEBACK_ENV = "LIGHTSCALE_TRACEBACK"  # =1: full tracebacks, for debugging the template itself
# Warnings from inside torch, Lightning and W&B that users cannot act on (printed at every start otherwise).
DEPENDENCY_CHATTER = (
    ".*set_vital.*",
    ".*LeafSpec.*",
    ".*litlogger.*",
    ".*Previous log files in this directory will be deleted.*",
    ".*anonymous.*",
    ".*The dirpath has changed from.*",  # validate/test/predict on another run's checkpoint: expected
)


def silence_dependency_chatter() -> None:
    for message in DEPENDENCY_CHATTER:
        warnings.filterwarnings("ignore", message=message)

    class NoTips(logging.Filter):  # Lightning's advertisement for litlogger goes through its info logger
        def filter(self, record: logging.LogRecord) -> bool:
            return "litlogger" not in str(record.msg)

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        target = logging.getLogger(name)
        if not any(type(f).__name__ == "NoTips" for f in target.filters):
            target.addFilter(NoTips())


def finish_wandb(exit_code: int = 0, status: dict[str, Any] | None = None) -> None:
    """Close the W&B run (so the next run in this process starts its own), with the exit code and, for a run
    that did not finish, its status in the W&B summary (``lightscale/status``, ...)."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return
    with contextlib.suppress(Exception):  # W&B trouble must not hide the run's own outcome
        if status:
            run.summary.update({f"lightscale/{key}": value for key, value in status.items()})
        folder = run.dir
        wandb.finish(exit_code=exit_code)
        mark_wandb_run_finished(folder)


def close_process_group() -> None:
    """Shut the process group down while Python still runs: left to the interpreter's exit, a rank of a finished
    multi-process run could abort in the C++ teardown ("terminate called without an active exception", seen once
    after a 2-process FSDP2 resume), and Lightning's launcher then kills the other ranks with a non-zero exit."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        with contextlib.suppress(Exception):  # the run itself is done and recorded
            torch.distributed.destroy_process_group()


def with_location(message: str, argv: list[str]) -> str:
    """Add the file and line that set the key a config error names (with several --config files, users should
    not have to guess which one); keys given on the command line are not blamed on a file."""
    match = re.search(r"does not accept option '([^']+)'", message) or re.match(r"([\w.\[\]]+): ", message)
    if match and not given_on_command_line(match.group(1), argv):
        where = where_set(match.group(1), argv)
        if where:
            return f"{message} (set in {where})"
    return message


def main(args: list[str] | None = None) -> None:
    """``lightscale fit|validate|test|predict ...`` (``args``: the command line without the program name)."""
    argv = list(sys.argv[1:] if args is None else args)
    silence_dependency_chatter()
    try:
        check_config_files(argv)
        check_srun()
        LightscaleCLI(args=None if args is None else argv)  # None: LightningCLI reads sys.argv itself
        finish_wandb()
        close_process_group()
    except Terminated as stop:
        finish_wandb(exit_code=int(stop.code or 1))
        print(f"lightscale: stopped by {stop.signal_name}; resume with --ckpt_path auto", file=sys.stderr)
        sys.exit(stop.code)
    except torch.OutOfMemoryError as error:  # MemoryWatch says where, and how much
        finish_wandb(exit_code=1)
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(f"lightscale: error: {getattr(error, 'lightscale_message', '') or one_line(str(error))}", file=sys.stderr)
        sys.exit(2)
    except (ArgumentError, UserError, ValueError, OSError, MisconfigurationException) as error:
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(f"lightscale: error: {with_location(one_line(str(error)), argv)}", file=sys.stderr)
        sys.exit(2)
