"""Top-1 accuracy of a converted network on labelled images.

    python -m dfkd_jax.evaluate --teacher DIR --data ../shared/data/cifar10_test_exact932.npz
    python -m dfkd_jax.evaluate --teacher DIR --data cifar10 [--split test] [--data-dir DIR]

The data is an `.npz` with `x` (uint8, N×H×W×3) and `y`, or a tensorflow-datasets name read with
`tfds.data_source` (prepare CIFAR from local files with `python -m dfkd_jax.data.build`). Batches are sharded over all
devices; the last batch is padded and masked, so the result does not depend on the device count. In a multi-process
run each process reads its rows of every batch and the counts are summed over all of them. The last line
printed is JSON: {"top1": <percent>, "n": <images>}.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from dfkd_jax import parallel
from dfkd_jax.data.sources import ImageSource, open_source
from dfkd_jax.models import Network, Variables


@functools.lru_cache(maxsize=16)  # one compiled step per (network, mesh): periodic evaluation never recompiles
def make_eval_step(network: Network, mesh: jax.sharding.Mesh) -> Callable:
    """(variables, images uint8, labels, valid) -> (number correct, logits), jitted over the mesh."""

    @jax.jit
    def eval_step(variables, images_u8, labels, valid):
        output, _ = network.apply(variables, images_u8.astype(jnp.float32) / 255.0, train=False)
        correct = (jnp.argmax(output.logits, axis=-1) == labels) & valid
        return jax.lax.with_sharding_constraint(correct.sum(), parallel.replicated(mesh)), output.logits

    return eval_step


def evaluate(network: Network, variables: Variables, source: ImageSource, *, batch_size: int | None = None,
             mesh: jax.sharding.Mesh | None = None, limit: int | None = None, progress: bool = True,
             return_logits: bool = False) -> dict:
    """{"top1": percent, "n": images, "correct": count} (+ "logits" (n, K) when asked) of `network` on `source`."""
    mesh = mesh or parallel.make_data_mesh()
    batch_size = batch_size or parallel.round_up_to_devices(512, mesh)
    parallel.check_batch_divisible(batch_size, mesh, "--batch-size")
    n = min(len(source), limit) if limit else len(source)
    if n == 0:
        raise ValueError(f"{source.description} holds no images")
    variables = jax.device_put(variables, parallel.replicated(mesh))
    eval_step = make_eval_step(network, mesh)
    rows = parallel.host_local_slice(batch_size)
    correct, all_logits = 0, []
    for start in tqdm(range(0, n, batch_size), desc="evaluate", unit="batch",
                      disable=not progress or jax.process_index() != 0, file=sys.stderr):
        # Pad the last batch to the full size (one compiled shape) and mask the padding out of the count.
        indices = np.arange(start, start + batch_size)
        valid = indices < n
        images, labels = source.read(np.minimum(indices, n - 1)[rows])
        _check_labels(labels, network.spec.num_classes, source)
        batch_correct, logits = eval_step(variables, parallel.shard_host_batch(images, mesh),
                                          parallel.shard_host_batch(labels, mesh),
                                          parallel.shard_host_batch(valid[rows], mesh))
        correct += int(batch_correct)
        if return_logits:
            all_logits.append(np.asarray(multihost_utils.process_allgather(logits, tiled=True)))
    result = {"top1": 100.0 * correct / n, "n": n, "correct": correct}
    if return_logits:
        result["logits"] = np.concatenate(all_logits)[:n]
    return result


def _check_labels(labels: np.ndarray, num_classes: int, source: ImageSource) -> None:
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{source.description} has label {int(labels.max())} but the network has "
                         f"{num_classes} classes; is it the right dataset for this network?")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dfkd_jax.evaluate", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", "--network", dest="network", required=True,
                        help="directory of a converted network (python -m dfkd_jax.convert)")
    parser.add_argument("--data", required=True, help="an .npz file with x and y, or a tfds name (cifar10, cifar100)")
    parser.add_argument("--split", default="test", help="tfds split (default: test)")
    parser.add_argument("--data-dir", help="tfds data directory (default: tfds's)")
    parser.add_argument("--batch-size", type=int,
                        help="global batch, a multiple of the device count (default: 512 rounded up to one)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N images")
    parser.add_argument("--precision", default="highest", choices=["default", "high", "highest"],
                        help="matmul/conv precision (default: highest, i.e. float32 also on GPU/TPU)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from dfkd_jax.network_io import load_network

    network, variables, _ = load_network(args.network)
    source = open_source(args.data, args.split, args.data_dir)
    mesh = parallel.make_data_mesh()
    print(f"{network.spec.arch} from {args.network} on {source.description}; "
          f"{mesh.devices.size} {jax.devices()[0].platform} device(s)", file=sys.stderr)
    with jax.default_matmul_precision(args.precision):
        result = evaluate(network, variables, source, batch_size=args.batch_size, mesh=mesh, limit=args.limit)
    print(f"top-1 {result['top1']:.2f}% ({result['correct']}/{result['n']})", file=sys.stderr)
    print(json.dumps({"top1": round(result["top1"], 4), "n": result["n"]}))
    return result


def cli() -> None:
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    cli()
