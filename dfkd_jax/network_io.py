"""Saving and loading a converted network: an orbax checkpoint with two items.

- `variables`: {"params": ..., "batch_stats": ...} as pure dicts of arrays;
- `network`: JSON metadata: the `NetworkSpec` (architecture, classes, options, input normalisation) and provenance.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Sharding

import dfkd_jax
from dfkd_jax.models import Network, NetworkSpec, Variables

FORMAT = "dfkd_jax.network"
FORMAT_VERSION = 1


def _checkpointer() -> ocp.Checkpointer:
    """This process alone reads or writes: a network directory is written once (by process 0 of a multi-process run,
    from host copies of replicated variables) and read by each process on its own, with no barrier to wait on."""
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                               active_processes={jax.process_index()})
    handler = ocp.CompositeCheckpointHandler(
        composite_options=ocp.CompositeOptions(multiprocessing_options=alone),
        variables=ocp.StandardCheckpointHandler(multiprocessing_options=alone),
        network=ocp.JsonCheckpointHandler(multiprocessing_options=alone))
    return ocp.Checkpointer(handler, multiprocessing_options=alone)


def save_network(directory: str | os.PathLike, spec: NetworkSpec, variables: Variables,
                 provenance: dict[str, Any] | None = None) -> str:
    """Write `variables` and `spec` to a new directory (never overwrites); returns its absolute path."""
    path = os.path.abspath(os.fspath(directory))
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"{path} already exists and is not empty; choose a new --out directory or remove it.")
    if os.path.isdir(path):
        os.rmdir(path)  # orbax creates the directory itself, atomically
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "dfkd_jax_version": dfkd_jax.__version__,
                "spec": spec.to_json(), "provenance": provenance or {}}
    # Host copies: device arrays of one process cannot be written alone in a multi-process run.
    pure = jax.device_get({collection: nnx.to_pure_dict(state) for collection, state in variables.items()})
    _checkpointer().save(path, args=ocp.args.Composite(variables=ocp.args.StandardSave(pure),
                                                       network=ocp.args.JsonSave(metadata)))
    return path


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    path = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(os.path.join(path, "network")):
        raise FileNotFoundError(
            f"no converted network at {path} (expected an orbax checkpoint with a 'network' item). Convert a PyTorch "
            "checkpoint first: python -m dfkd_jax.convert --torch FILE --arch NAME --out DIR")
    metadata = _checkpointer().restore(path, args=ocp.args.Composite(network=ocp.args.JsonRestore()))["network"]
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a dfkd_jax network checkpoint (format {metadata.get('format')!r})")
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer dfkd_jax ({metadata.get('dfkd_jax_version')}); upgrade.")
    return metadata


def load_network(directory: str | os.PathLike, sharding: Sharding | None = None
                 ) -> tuple[Network, Variables, dict[str, Any]]:
    """The network, its variables (placed with `sharding` when given, e.g. replicated on a mesh) and metadata."""
    metadata = read_metadata(directory)
    network, abstract = Network.abstract(NetworkSpec.from_json(metadata["spec"]))

    def target(leaf):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    targets = {collection: jax.tree_util.tree_map(target, nnx.to_pure_dict(state))
               for collection, state in abstract.items()}
    restored = _checkpointer().restore(os.path.abspath(os.fspath(directory)), args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(targets)))["variables"]
    if sharding is None:  # the same kind of array however the directory was written (host copies are saved)
        restored = jax.tree_util.tree_map(jnp.asarray, restored)
    for collection, state in abstract.items():
        nnx.replace_by_pure_dict(state, restored[collection])
    return network, abstract, metadata
