"""The machine: its CPU name and the node it runs on, from the standard library only (benchmarks import it without
loading Lightning)."""

import os
import platform
import socket
from pathlib import Path


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def node_name() -> str:
    """The node as the cluster names it (``SLURMD_NODENAME`` under SLURM, which is what ``squeue`` and
    ``scontrol`` show), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()
