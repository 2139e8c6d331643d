"""One device mesh with a `data` axis: parameters replicated, batches sharded on `data`."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over all devices (of every host). Auto axes: the compiler places the collectives that make
    batch statistics those of the global batch."""
    devices = list(devices) if devices is not None else jax.devices()
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divisible(global_batch: int, mesh: Mesh, what: str = "batch size") -> None:
    devices = mesh.devices.size
    if global_batch % devices:
        raise ValueError(f"{what} {global_batch} is not divisible by the {devices} devices of the mesh; "
                         f"use a multiple of {devices}.")


def round_up_to_devices(size: int, mesh: Mesh) -> int:
    devices = mesh.devices.size
    return -(-size // devices) * devices


def host_local_slice(global_batch: int) -> slice:
    """The rows of a global batch this process supplies (all of them on a single host)."""
    per_process = global_batch // jax.process_count()
    start = jax.process_index() * per_process
    return slice(start, start + per_process)


def shard_host_batch(host_batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """Assemble the global batch-sharded array from each process's rows (see `host_local_slice`)."""
    return jax.make_array_from_process_local_data(batch_sharded(mesh), host_batch)


# Train-state leaves holding batches of images (the pool, pixel batches, best batches) are sharded on `data` along
# their first axis; every other leaf (parameters, optimizer states, counters, keys) is replicated.
BATCH_SHARDED_NAMES = frozenset({"images", "pixels", "best_images"})


def _is_batch_sharded(path, leaf) -> bool:
    names = {str(getattr(p, "key", getattr(p, "name", p))) for p in path}
    return bool(names & BATCH_SHARDED_NAMES) and getattr(leaf, "ndim", 0) >= 1


def state_shardings(state, mesh: Mesh):
    """The sharding of every leaf of a train state (concrete or abstract), by the rule above."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: batch_sharded(mesh) if _is_batch_sharded(path, leaf) else replicated(mesh), state)


def constrain_state(state, mesh: Mesh):
    """Inside jit: pin every leaf of `state` to its rule-given sharding (keeps donated buffers where they are)."""
    return jax.lax.with_sharding_constraint(state, state_shardings(state, mesh))
