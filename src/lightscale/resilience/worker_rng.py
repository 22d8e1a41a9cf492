"""Per-worker random state that survives a resume: for datasets that draw random numbers (augmentation).

torchdata's ``StatefulDataLoader`` restores which samples each DataLoader worker has produced, but re-seeds a
restarted worker from the loader's base seed: its Python/numpy/torch generators start over, so a dataset that
augments at random produces different samples after a resume. It does save and restore the state of a dataset
that implements ``state_dict`` / ``load_state_dict`` (snapshotted in the worker with every batch), so a
dataset that puts its process's generator states there resumes its random stream exactly.
"""

from typing import Any

from torch.utils.data import get_worker_info

from lightscale.resilience.exact_resume import collect_rng_states, set_rng_states


class WorkerRNG:
    """Mixin for a map-style ``Dataset`` used with ``num_workers > 0``: records the worker's generator states
    in the loader's checkpointed state and restores them when the worker restarts.

    In the main process (``num_workers=0``) it does nothing: the global generators are restored by
    :class:`~lightscale.resilience.exact_resume.ExactResume`.

    ``class Augmented(WorkerRNG, Dataset): ...`` (override ``state_dict`` / ``load_state_dict`` by calling
    ``super()`` if the dataset has state of its own).
    """

    def state_dict(self) -> dict[str, Any]:
        return {"worker_rng": collect_rng_states()} if get_worker_info() is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if get_worker_info() is not None and state_dict.get("worker_rng"):
            set_rng_states(state_dict["worker_rng"])
