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


# Which train-state leaves are sharded on `data` (along their first axis) is declared, not guessed: the trainer
# passes the paths each method declares (`Method.batch_sharded`, e.g. "synth/pool"); every other leaf (parameters,
# optimizer states, counters, keys) is replicated. A path names a subtree: "synth/pool" covers the pool's images,
# labels and groups. Scalars under a declared path (the pool's count) stay replicated.
def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def leaf_path(path) -> str:
    """A pytree path as "synth/pool/images" (dict keys, attribute names and sequence indices joined by '/')."""
    return "/".join(_path_names(path))


def _is_batch_sharded(path, leaf, sharded_paths: tuple[str, ...]) -> bool:
    names = _path_names(path)
    declared = any(names[:len(prefix)] == prefix for prefix in (tuple(p.split("/")) for p in sharded_paths))
    return declared and getattr(leaf, "ndim", 0) >= 1


def state_shardings(state, mesh: Mesh, sharded_paths: tuple[str, ...] = ()):
    """The sharding of every leaf of a train state (concrete or abstract): batch-sharded under `sharded_paths`,
    replicated elsewhere."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: batch_sharded(mesh) if _is_batch_sharded(path, leaf, sharded_paths) else replicated(mesh),
        state)


def constrain_state(state, mesh: Mesh, sharded_paths: tuple[str, ...] = ()):
    """Inside jit: pin every leaf of `state` to its declared sharding (keeps donated buffers where they are)."""
    return jax.lax.with_sharding_constraint(state, state_shardings(state, mesh, sharded_paths))
