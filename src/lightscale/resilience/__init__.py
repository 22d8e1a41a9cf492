"""Runs that survive what goes wrong: checkpoints that a crash cannot truncate and that cannot run code when
loaded, resuming from the right checkpoint (``--ckpt_path auto``) exactly where it was written (weights, optimizer,
random generators, data position), stopping cleanly on a signal or a SLURM requeue, and never training on or
saving a NaN.

Imports :mod:`lightscale.core`, :mod:`lightscale.cluster` and Lightning; nothing above them.
"""
