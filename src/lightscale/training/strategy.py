"""Lightning's ``ModelParallelStrategy`` (FSDP2 and tensor parallelism over a device mesh) with sharded checkpoints
that a kill cannot leave half-written, and that ``checkpoint.async_save`` writes in the background
(:mod:`lightscale.resilience.sharded_checkpoint`). The presets in ``configs/trainer/`` name this class; everything
else is Lightning's.
"""

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.strategies import ModelParallelStrategy as LightningModelParallelStrategy

from lightscale.resilience.sharded_checkpoint import BackgroundShardedWriter, publish, staging_path


class ModelParallelStrategy(LightningModelParallelStrategy):
    """``lightning.pytorch.strategies.ModelParallelStrategy``, same arguments; with ``save_distributed_checkpoint``
    each save is written into a hidden folder and swapped in whole once every rank has written its shards."""

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.writes_shards = save_distributed_checkpoint
        self.background: BackgroundShardedWriter | None = None

    def save_in_background(self) -> None:
        """Write sharded checkpoints in the background from now on (``checkpoint.async_save``)."""
        if self.writes_shards and self.background is None:
            self.background = BackgroundShardedWriter()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any | None = None
    ) -> None:
        if not self.writes_shards:  # one full file, written by rank 0 through the (atomic) CheckpointIO
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        staging = Path(self.broadcast(str(staging_path(path))))  # rank 0's name, for every rank
        if self.background is None:
            super().save_checkpoint(checkpoint, staging, storage_options)
            self.barrier("sharded checkpoint written")
            if self.is_global_zero:
                publish(staging, path)
            self.barrier("sharded checkpoint in place")
            return None
        # Lightning's layout of a sharded checkpoint (as its save_checkpoint writes it), so that its loader reads it
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        self.background.save(state, checkpoint, path, staging, self.is_global_zero)
        return None

    def remove_checkpoint(self, filepath: str | Path) -> None:
        if self.background is not None and self.is_global_zero:  # not before the checkpoint replacing it is in place
            self.background.after_pending(lambda: super(ModelParallelStrategy, self).remove_checkpoint(filepath))
        else:
            super().remove_checkpoint(filepath)

    def wait_for_checkpoints(self) -> None:
        """Block until the checkpoint being written in the background is in place; raise its failure, if any."""
        if self.background is not None:
            self.background.wait()

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        self.wait_for_checkpoints()
        return super().load_checkpoint(checkpoint_path, weights_only)

    def teardown(self) -> None:
        try:
            self.wait_for_checkpoints()  # the run's end waits for its last checkpoint
        finally:
            super().teardown()
