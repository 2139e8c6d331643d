"""Runs on several processes (one per host): JAX's own multi-controller runtime, `jax.distributed`.

Every process runs the same `python -m dfkd_jax.main ...`; together they see one mesh over the devices of all hosts.
Which run is multi-process, in this order:

1. `--num_processes` (or JAX_NUM_PROCESSES) given: 1 means one process (no initialisation, also on a cluster);
   more needs the coordinator's host:port (`--coordinator_address` or JAX_COORDINATOR_ADDRESS) and this process's
   index (`--process_id` or JAX_PROCESS_ID). This is how `launch/local.sh` starts N processes on one machine.
2. A cluster JAX detects by itself, with more than one task: SLURM (`srun`, SLURM_NTASKS > 1), Open MPI (`mpirun`,
   OMPI_COMM_WORLD_SIZE > 1), a Cloud TPU VM (a pod slice's workers are found from the TPU metadata; a single-host VM
   gives one process). JAX then finds the coordinator, the process count and index itself.
3. Otherwise one process, and `jax.distributed` is never initialised.

The initialisation must come before anything else touches JAX's devices: `main.py` calls `initialize` first.

A process that dies (killed, out of memory, its host lost) stops sending heartbeats; after `heartbeat_timeout` seconds
the coordination service ends every other process with "Terminating process because the JAX distributed service
detected fatal errors ... another task died" (exit status 134), instead of leaving them blocked in a collective.
Restart all processes with the same command: the run resumes from its newest checkpoint.

Preemption: a preempted TPU VM and a SLURM time limit send SIGTERM. `StopOnSigterm` records it; at the end of each
epoch the trainer asks `requested()`, a collective in which every process learns whether any of them got the signal,
so all stop after the same epoch, write its checkpoint together and exit 0 (`Preempted`).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Mapping

import jax
import numpy as np

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


class DistributedConfigError(ValueError):
    """Inconsistent multi-process settings; the message names the flag or variable to fix."""


def _integer(value, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedConfigError(f"{name} = {value!r} is not a whole number") from None


def _more_than_one(environ: Mapping[str, str], name: str) -> bool:
    try:
        return int(environ.get(name, "1")) > 1
    except ValueError:
        return False


def detected_cluster(environ: Mapping[str, str]) -> str | None:
    """'slurm', 'ompi' or 'tpu' where JAX's auto-detection will find more than one process (or, on a Cloud TPU VM,
    the workers of the slice); None elsewhere. Reads the environment only (no device is touched)."""
    # The variables JAX's own SlurmCluster and OmpiCluster require (jax/_src/clusters), and more than one task.
    if all(name in environ for name in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                                         "SLURM_LOCALID")) and _more_than_one(environ, "SLURM_NTASKS"):
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in environ and _more_than_one(environ, "OMPI_COMM_WORLD_SIZE"):
        return "ompi"
    workers = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES")  # GKE sets these
    if workers and "," in workers:
        return "tpu"
    if environ is os.environ and _on_cloud_tpu_vm():
        return "tpu"
    return None


def _on_cloud_tpu_vm() -> bool:
    """JAX's own answer (set when jax is imported: libtpu installed and TPU chips on the PCI bus)."""
    try:
        from jax._src import cloud_tpu_init
    except ImportError:  # moved in another JAX: TPU chips show up as /dev/accel* or /dev/vfio
        return os.path.exists("/dev/accel0")
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def settings(coordinator_address: str | None = None, num_processes: int | None = None,
             process_id: int | None = None, environ: Mapping[str, str] = os.environ) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize`, or None for a one-process run (see the module
    docstring for the order). Flags win over the environment variables."""
    coordinator_address = coordinator_address or environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _integer(environ.get(ENV_NUM_PROCESSES),
                                                                              ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _integer(environ.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
    if num_processes is not None:
        if num_processes < 1:
            raise DistributedConfigError(f"--num_processes = {num_processes}: it must be at least 1")
        if num_processes == 1:
            if process_id not in (None, 0):
                raise DistributedConfigError(f"--process_id = {process_id} with --num_processes = 1: the only "
                                             "process is 0")
            return None
        if coordinator_address is None:
            raise DistributedConfigError(f"--num_processes = {num_processes} needs the coordinator: pass "
                                         f"--coordinator_address=HOST:PORT (or set {ENV_COORDINATOR}), the address "
                                         "of process 0, the same for every process")
        if process_id is None:
            raise DistributedConfigError(f"--num_processes = {num_processes} needs this process's index: pass "
                                         f"--process_id=0..{num_processes - 1} (or set {ENV_PROCESS_ID})")
        if not 0 <= process_id < num_processes:
            raise DistributedConfigError(f"--process_id = {process_id} is out of range for --num_processes = "
                                         f"{num_processes}: it must be 0..{num_processes - 1}")
        # Explicit values: JAX's cluster detection stays off (inside a SLURM allocation it would choose devices).
        return {"coordinator_address": coordinator_address, "num_processes": num_processes,
                "process_id": process_id, "cluster_detection_method": "deactivate"}
    if process_id is not None:
        raise DistributedConfigError(f"--process_id = {process_id} without --num_processes: pass both (and "
                                     "--coordinator_address), or neither on a cluster JAX detects")
    cluster = detected_cluster(environ)
    if cluster is None:
        return None
    return {"coordinator_address": coordinator_address}  # the rest from the cluster (None: JAX's choice too)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout: int = 100) -> bool:
    """Initialise `jax.distributed` when this is a multi-process run; returns whether it is. Call it before any
    other JAX call. The CPU backend then uses gloo collectives across processes (JAX's default)."""
    kwargs = settings(coordinator_address, num_processes, process_id)
    if kwargs is None:
        return False
    # SIGTERM is ours (StopOnSigterm): JAX's preemption notifier would install its own handler for it.
    try:
        jax.config.update("jax_enable_preemption_service", False)
    except (AttributeError, KeyError):  # a JAX without the option
        pass
    jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=heartbeat_timeout)
    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local and "
          f"{jax.device_count()} global {jax.devices()[0].platform} device(s)", file=sys.stderr)
    return True


def is_main_process() -> bool:
    """Process 0: the one that writes the workdir's files (config, metrics, images, student/, summary)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches `barrier(name)` (nothing to wait for on one process). Names must be the same
    on all processes, in the same order."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any of them (a collective on several processes)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def fetch(tree):
    """Host copies (NumPy) of arrays that may be sharded over the devices of several processes: `jax.device_get`
    where this process holds every shard, a gather across processes where it does not. Every process must call it
    with the same tree (it is a collective then)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree_util.tree_map(one, tree)


class Preempted(Exception):
    """The run stopped early on SIGTERM after writing a checkpoint; the same command resumes it."""

    def __init__(self, epoch: int):
        self.epoch = epoch
        super().__init__(f"preempted after epoch {epoch}: run the same command again to resume")


class StopOnSigterm:
    """Between `install()` and `uninstall()`, SIGTERM only records that it came; `requested()` says, at a point every
    process reaches, whether any process got it."""

    def __init__(self):
        self.received = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        del frame
        if not self.received:
            print(f"\nprocess {jax.process_index()}: signal {signum} received; stopping after this epoch, with a "
                  "checkpoint", file=sys.stderr, flush=True)
        self.received = True

    def install(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: signals cannot be handled here, SIGTERM keeps its effect
            self._previous = None

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def requested(self) -> bool:
        return any_process(self.received)
