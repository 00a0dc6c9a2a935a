"""Orbax checkpoints of the train state together with the grain data-iterator state.

Restoring both reproduces the run exactly: the next batch is the one the interrupted run would have seen.
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from d2i_jax.data.files import PathLike, absolute


class Checkpointer:
    """Keeps the last `max_to_keep` checkpoints of `(state, data iterator)` under `directory` (local or `gs://`:
    orbax writes through tensorstore / etils.epath and commits a step only once all of it is written)."""

    def __init__(self, directory: PathLike, *, max_to_keep: int = 2):
        self.directory = absolute(directory)
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        )

    @property
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def reached_preemption(self, step: int) -> bool:
        """Whether JAX's preemption sync point (TPU maintenance / preemption notice) is at `step`; call it every
        step on every process. False where the preemption service is off (single process, most GPU clusters)."""
        return self._manager.reached_preemption(step)

    def save(self, step: int, state: Any, data_iterator: Any = None) -> None:
        """Saves synchronously (a stage may end right after)."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._manager.wait_until_finished()

    def restore(self, abstract_state: Any, data_iterator: Any = None, step: int | None = None) -> Any:
        """Restores the state (shapes, dtypes and shardings of `abstract_state`) and, in place, the iterator."""
        step = self.latest_step if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        items = {"state": ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self._manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def close(self) -> None:
        self._manager.close()
