"""How the Trainer runs: process-wide speed settings, a bf16 precision plugin that lets fused optimizers clip,
FSDP2 sharding and a ``ModelParallelStrategy`` whose sharded checkpoints are atomic (and optionally written in the
background), Lightning's LR and batch-size finders kept in step with the schedule, and the check that turns a
model's failure on its first batch into one line.

Imports :mod:`lightscale.core`, :mod:`lightscale.resilience` and Lightning; nothing above them.
"""
