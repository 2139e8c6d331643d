"""The entry point: flags only.

    python -m dfkd_jax.main --config=configs/<method>.py[:preset] [--workdir=DIR] [--config.field=value ...]
        [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]

The workdir defaults to workdirs/<config name>; a workdir that already holds results is continued, not overwritten.
Several processes (one per host, or `launch/local.sh` on one machine) run the same command together over the devices
of all of them (dfkd_jax/distributed.py: on SLURM, Open MPI and Cloud TPU pods nothing needs to be passed). SIGTERM
stops a training run after its current epoch with a checkpoint (exit status 0); the same command resumes it.
Bad input (a missing config file, an unknown preset or field, a value out of range, missing data) ends the run
with one line naming the problem and the fix, before anything is written.
"""

from __future__ import annotations

import glob
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dfkd_jax import distributed, jobs
from dfkd_jax.train import NonFiniteError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file, optionally with ':preset'.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and results (default: workdirs/<config name>).")
flags.DEFINE_string("coordinator_address", None, "Multi-process runs: HOST:PORT of process 0, the same for every "
                    "process (default: $JAX_COORDINATOR_ADDRESS, or found by JAX on SLURM / Open MPI / Cloud TPU).")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many processes (default: $JAX_NUM_PROCESSES, or "
                     "found by JAX on a cluster; 1 = one process, jax.distributed is not initialised).")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index, 0..num_processes-1 (default: "
                     "$JAX_PROCESS_ID, or found by JAX on a cluster).")
flags.DEFINE_integer("heartbeat_timeout", 100, "Multi-process runs: seconds without a heartbeat after which a process "
                     "counts as dead and every other process stops with an error instead of waiting for it.")
flags.mark_flags_as_required(["config"])


def _one_line(error: BaseException) -> str:
    """The useful line of a flag-parsing error: ml_collections wraps a config's own exception in a traceback
    string, and a misspelt field arrives as a quoted KeyError."""
    message = str(error).strip()
    if "Traceback (most recent call last)" in message:
        last = [line for line in message.splitlines() if line.strip()][-1].strip()
        message = re.sub(r"^[\w.]+(Error|Exception): ", "", last)
    suggestion = re.search(r"'(\w+)'.*Did you mean \"(\w+)\"", message.replace("\\'", "'").replace("\\n", " "))
    if isinstance(error, (AttributeError, KeyError)) and suggestion:
        return f"the config has no field {suggestion.group(1)!r} (did you mean {suggestion.group(2)!r}?)"
    if isinstance(error, (AttributeError, KeyError)):
        return f"the config has no such field: {message.strip(chr(39))}"
    return message


def parse_flags(argv: list[str]) -> list[str]:
    config_path = next((arg.split("=", 1)[1].split(":", 1)[0] for arg in argv[1:] if arg.startswith("--config=")),
                       None)
    if config_path is not None and not os.path.isfile(config_path):
        known = ", ".join(sorted(glob.glob(os.path.join("configs", "*.py")))) or "none under ./configs"
        sys.exit(f"error: no config file {config_path} (run from the repository root; configs: {known})")
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as error:
        sys.exit(f"error: {_one_line(error)}")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    try:  # before anything else touches JAX's devices
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                               FLAGS.heartbeat_timeout)
    except distributed.DistributedConfigError as error:
        sys.exit(f"error: {error}")

    config = FLAGS.config
    workdir = FLAGS.workdir or os.path.join("workdirs", config.name)
    try:
        jobs.run(config, workdir)
    except distributed.Preempted as stop:
        print(stop, file=sys.stderr)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError, NonFiniteError) as error:
        # These carry messages that name the bad input and the fix; a traceback would bury them.
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
