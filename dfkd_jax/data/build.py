"""Prepare tensorflow-datasets CIFAR from local files, without TensorFlow and without internet.

    python -m dfkd_jax.data.build --dataset cifar10 --manual-dir ~/Downloads [--data-dir ~/tensorflow_datasets]

then read it with `tfds.data_source("cifar10", split="test")` or `python -m dfkd_jax.evaluate --data cifar10`.
"""

from __future__ import annotations

import argparse
import sys

from dfkd_jax.data import cifar


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dfkd_jax.data.build", description=__doc__.split("\n\n")[0],
                                     epilog=cifar.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=sorted(cifar.BUILDERS))
    parser.add_argument("--manual-dir", required=True, help="folder holding the dataset files (see below)")
    parser.add_argument("--data-dir", help="tfds data directory (default: tfds's, usually ~/tensorflow_datasets)")
    args = parser.parse_args(argv)
    try:
        builder = cifar.prepare(args.dataset, args.manual_dir, args.data_dir)
    except cifar.MissingDataError as error:
        sys.exit(f"error: {error}")
    splits = ", ".join(f"{name} {info.num_examples}" for name, info in builder.info.splits.items())
    print(f"prepared {args.dataset} {builder.info.version} in {builder.data_dir} ({splits})")


if __name__ == "__main__":
    main()
