"""Runs that survive what goes wrong: checkpoints that a crash cannot truncate and that cannot run code when
loaded, resuming from the right checkpoint (``--ckpt_path auto``) exactly where it was written (weights, optimizer,
random generators, data position), stopping cleanly on a signal or a SLURM requeue, never training on or saving
a NaN, and ending a run that hangs with the stalled rank's name and every rank's stack.

Imports :mod:`lightscale.core`, :mod:`lightscale.cluster` and Lightning; nothing above them.
"""
