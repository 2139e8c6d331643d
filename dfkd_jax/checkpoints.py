"""Training checkpoints: the whole train state (student, optimizer states, the method's generator(s), pool, BN-EMA,
PRNG key, counters) plus JSON metadata, written atomically by orbax and keyed by the number of finished epochs.

A workdir with a checkpoint is resumed from the newest one, no flag needed. The teacher is never saved here.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from dfkd_jax import parallel


def latest_metadata(directory: str) -> dict | None:
    """The JSON record of the newest checkpoint in `directory`, read without creating or changing anything there
    (None when there is none)."""
    if not os.path.isdir(directory):
        return None
    manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "metadata"),
                                    options=ocp.CheckpointManagerOptions(create=False, read_only=True))
    try:
        epoch = manager.latest_step()
        if epoch is None:
            return None
        return manager.restore(epoch, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
    finally:
        manager.close()


class Checkpoints:
    def __init__(self, directory: str, keep: int = 2, sharded_paths: tuple[str, ...] = ()):
        self.directory = os.path.abspath(directory)
        self.sharded_paths = sharded_paths  # the method's batch-sharded subtrees (`Method.sharded_paths`)
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "metadata"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_epoch(self) -> int | None:
        return self.manager.latest_step()

    def save(self, epoch: int, state: Any, metadata: dict) -> None:
        self.manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         metadata=ocp.args.JsonSave(metadata)))

    def restore(self, epoch: int, abstract_state: Any, mesh: jax.sharding.Mesh) -> tuple[Any, dict]:
        """The state saved after `epoch` epochs, every leaf placed with its sharding on `mesh`."""
        shardings = parallel.state_shardings(abstract_state, mesh, self.sharded_paths)
        target = jax.tree_util.tree_map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                                                   sharding=sharding),
                                        abstract_state, shardings)
        restored = self.manager.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                       metadata=ocp.args.JsonRestore()))
        return restored["state"], restored["metadata"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
