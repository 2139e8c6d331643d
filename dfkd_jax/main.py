"""The entry point: flags only.

    python -m dfkd_jax.main --config=configs/teacher.py[:preset] [--workdir=DIR] [--config.field=value ...]

The workdir defaults to workdirs/<config name>; a workdir that already holds results is continued, not overwritten.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dfkd_jax import jobs

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file, optionally with ':preset'.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and results (default: workdirs/<config name>).")
flags.mark_flags_as_required(["config"])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    config = FLAGS.config
    workdir = FLAGS.workdir or os.path.join("workdirs", config.name)
    try:
        jobs.run(config, workdir)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as error:
        # These carry messages that name the bad input and the fix; a traceback would bury them.
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main)
