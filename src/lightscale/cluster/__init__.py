"""Clusters: SLURM job identity, run directories that survive requeues, requeueing, sweeps as job arrays, the
resources an ``sbatch`` script asks for, and how a process was launched (``srun``, ``torchrun``).

Imports :mod:`lightscale.core` only (no torch, no Lightning): batch scripts call these modules in milliseconds.
"""
