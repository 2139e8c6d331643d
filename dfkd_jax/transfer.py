"""Transfer evaluation: how well a network's features carry over to labelled data it never saw.

    python -m dfkd_jax.transfer --network DIR --train SOURCE --test SOURCE --mode linear [--features stages]
    python -m dfkd_jax.transfer --network DIR --train digits --test digits --mode finetune [--epochs 10 --lr 0.01]
    python -m dfkd_jax.transfer --random-init resnet20 --train SOURCE --test SOURCE --mode linear   # the floor

SOURCE is `digits` (scikit-learn's handwritten digits, shipped with it: the train or test part of the project's
split, upsampled by pixel repetition), an `.npz` with `x` (uint8, N×H×W×3) and `y`, an `.npz` of concatenated JPEG
files with `jpeg`, `offsets` and `y` (../shared/data/cifar10_train_jpeg.npz), or a tensorflow-datasets name read as
`python -m dfkd_jax.evaluate` reads it (`--train-split`, `--test-split`, `--data-dir`). Images whose size differs
from the network's input (`--image-size`, default 32) are resized to it, bilinearly, and the output says so.

- linear: the frozen network's penultimate feature (`--features stages`: each stage's output, globally average
  pooled and concatenated; `both`: the two side by side) for every image, from a jitted forward pass sharded over all
  devices, then a multinomial logistic regression on standardised features (scikit-learn, L2). Its regularisation
  strength C is chosen on a stratified held-out part of the training split, and the chosen C is refit on the whole
  training split and scored on the test split.
- finetune: the whole network with a fresh classifier for the new classes (initialised as the layout's PyTorch code
  initialises it), SGD with momentum 0.9 and coupled weight decay, cosine learning rate, random crop (+ horizontal
  flip, except for digits), BatchNorm in train mode, batches sharded over the mesh; top-1 on the test split at the
  end, beside the top-1 of the untrained new head (`top1_before`).

`--limit-train N` / `--limit-test N` take a fixed random subset of N images (not the first N: the shared CIFAR-10
training file is grouped by class). The last line printed is JSON: {"top1": <percent>, "n": <test images>,
"mode": ..., ...}.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import os
import sys
import time
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from dfkd_jax import parallel
from dfkd_jax.data.sources import ImageSource, open_source
from dfkd_jax.evaluate import evaluate
from dfkd_jax.models import Network, NetworkSpec, Variables, default_normalisation, zoo

MODES = ("linear", "finetune")
FEATURES = ("penultimate", "stages", "both")
DEFAULT_IMAGE_SIZE = 32  # every network of the zoo is a CIFAR network; the digits networks pass --image-size 16
# Inverse L2 strengths tried on standardised features: from nearly constant predictions to nearly unregularised.
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
HOLDOUT_FRACTION = 0.15  # of the training split, for choosing C
MAX_ITERATIONS = 1000  # lbfgs; the result says whether every fit converged
SUBSET_SEED = 0  # which images --limit-train / --limit-test keep; fixed so every network sees the same ones


# --------------------------------------------------------------------------------------------------------- sources

@dataclasses.dataclass
class JpegSource:
    """Concatenated JPEG files, image i = jpeg[offsets[i]:offsets[i+1]], decoded when read."""

    jpeg: np.ndarray  # (bytes,) uint8
    offsets: np.ndarray  # (N + 1,) int64
    labels: np.ndarray  # (N,)
    description: str

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        images = [np.asarray(Image.open(io.BytesIO(self.jpeg[self.offsets[i]:self.offsets[i + 1]].tobytes()))
                             .convert("RGB")) for i in indices]
        return np.stack(images), self.labels[indices].astype(np.int32)


@dataclasses.dataclass
class Subset:
    """The images of `source` at `indices`, in that order."""

    source: ImageSource
    indices: np.ndarray
    description: str

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.source.read(self.indices[indices])


@dataclasses.dataclass
class Resized:
    """`source` with every image resized to size×size when read (bilinear; PIL antialiases when shrinking)."""

    source: ImageSource
    size: int
    description: str

    def __len__(self) -> int:
        return len(self.source)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        images, labels = self.source.read(indices)
        return np.stack([np.asarray(Image.fromarray(image).resize((self.size, self.size), Image.BILINEAR))
                         for image in images]), labels


def _open_jpeg_npz(path: str) -> JpegSource:
    with np.load(path) as data:
        jpeg, offsets, labels = data["jpeg"], data["offsets"], data["y"]
    if offsets.shape != (len(labels) + 1,):
        raise ValueError(f"{path}: 'offsets' must hold one more entry than 'y' (image i is "
                         f"jpeg[offsets[i]:offsets[i+1]]), got {offsets.shape} for {len(labels)} labels")
    return JpegSource(jpeg, offsets, labels, f"{path} ({len(labels)} JPEG images)")


def _open_digits(split: str, image_size: int) -> tuple[ImageSource, str | None]:
    """Pixel repetition, the project's digits convention, wherever the size is a multiple of 8 (otherwise the 8×8
    digits are resized bilinearly like any other images)."""
    from dfkd_jax.data.digits import DIGITS_SIZE, load_digits_split

    if split not in ("train", "test"):
        raise ValueError(f"digits has the splits train and test, not {split!r}")
    repeated = image_size if image_size % DIGITS_SIZE == 0 else DIGITS_SIZE
    train, test = load_digits_split(image_size=repeated)
    note = f"digits: 8x8 upsampled to {repeated}x{repeated} by pixel repetition" if repeated > DIGITS_SIZE else None
    return (train if split == "train" else test), note


def _open_unsized(name: str, split: str, data_dir: str | None, image_size: int) -> tuple[ImageSource, str | None]:
    """`name` at its own size: digits, a JPEG-layout .npz, or what `open_source` reads (an x/y .npz, a tfds name)."""
    if name == "digits":
        return _open_digits(split, image_size)
    if (name.endswith(".npz") or os.path.sep in name) and not os.path.isfile(name):
        raise FileNotFoundError(f"no data file at {name}: --train/--test take digits, an .npz (x and y, or jpeg, "
                                "offsets and y) or a tensorflow-datasets name such as cifar10")
    if name.endswith(".npz"):
        with np.load(name) as data:
            if {"jpeg", "offsets", "y"} <= set(data.files):
                return _open_jpeg_npz(name), None
    return open_source(name, split, data_dir), None


def open_probe_source(name: str, split: str, image_size: int, *, data_dir: str | None = None,
                      limit: int | None = None) -> tuple[ImageSource, list[str]]:
    """The source at the network's input size, and the lines that say what was done to its images."""
    source, note = _open_unsized(name, split, data_dir, image_size)
    notes = [note] if note else []
    if len(source) == 0:
        raise ValueError(f"{source.description} holds no images")
    if limit and limit < len(source):
        kept = np.sort(np.random.default_rng(SUBSET_SEED).permutation(len(source))[:limit])
        source = Subset(source, kept, f"{limit} random images of {source.description}")
    height, width = source.read(np.zeros(1, np.int64))[0].shape[1:3]
    if (height, width) != (image_size, image_size):
        source = Resized(source, image_size, f"{source.description}, resized to {image_size}x{image_size}")
        notes.append(f"resizing {name} images from {height}x{width} to the network's {image_size}x{image_size} "
                     "(bilinear)")
    return source, notes


def source_labels(source: ImageSource, chunk: int = 1024) -> np.ndarray:
    """Every label of `source` (read straight from the arrays where it has them)."""
    while isinstance(source, Resized):
        source = source.source
    if isinstance(source, Subset):
        return source_labels(source.source)[source.indices]
    if hasattr(source, "labels"):
        return np.asarray(source.labels, np.int32)
    return np.concatenate([source.read(np.arange(start, min(start + chunk, len(source))))[1]
                           for start in range(0, len(source), chunk)])


# -------------------------------------------------------------------------------------------------------- networks

def random_network(arch: str, num_classes: int = 10, seed: int = 0) -> tuple[Network, Variables]:
    """A freshly initialised network, as its PyTorch layout's code initialises it (He ResNets: akamaster's option-A
    layout, kaiming_normal_ fan-in), with the zoo's input normalisation for that class count: the floor every
    trained network's probe should clear."""
    options = {"shortcut": "A"} if "shortcut" in zoo.get(arch).options else {}
    mean, std = default_normalisation(num_classes)
    return Network.create(NetworkSpec(arch, num_classes, options, mean=mean, std=std), seed)


def with_new_head(network: Network, variables: Variables, num_classes: int, seed: int = 0
                  ) -> tuple[Network, Variables]:
    """The same network with a fresh classifier for `num_classes` classes; every other weight and all batch
    statistics are kept."""
    from flax import nnx

    spec = dataclasses.replace(network.spec, num_classes=num_classes)
    tuned, fresh = Network.create(spec, seed)
    head = zoo.get(spec.arch).head
    kept = nnx.to_pure_dict(variables["params"])
    new = nnx.to_pure_dict(fresh["params"])
    nnx.replace_by_pure_dict(fresh["params"], {name: new[name] if name == head else kept[name] for name in new})
    return tuned, {"params": fresh["params"], "batch_stats": variables["batch_stats"]}


# ------------------------------------------------------------------------------------------------------- features

def select_features(output, kind: str) -> jax.Array:
    """(B, D): the penultimate feature, each stage's output average-pooled over space and concatenated, or both."""
    pooled = [stage.mean(axis=(1, 2)) for stage in output.stages]
    parts = {"penultimate": [output.features], "stages": pooled, "both": [output.features, *pooled]}[kind]
    return jnp.concatenate(parts, axis=-1)


@functools.lru_cache(maxsize=16)  # one compiled step per (network, mesh, kind)
def make_feature_step(network: Network, mesh: jax.sharding.Mesh, kind: str) -> Callable:
    """(variables, images uint8 (B, H, W, 3)) -> features (B, D), jitted, batch sharded on the mesh."""

    @jax.jit
    def feature_step(variables, images_u8):
        output, _ = network.apply(variables, images_u8.astype(jnp.float32) / 255.0, train=False)
        return jax.lax.with_sharding_constraint(select_features(output, kind), parallel.batch_sharded(mesh))

    return feature_step


def extract_features(network: Network, variables: Variables, source: ImageSource, *, features: str = "penultimate",
                     batch_size: int | None = None, mesh: jax.sharding.Mesh | None = None, progress: bool = True,
                     desc: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, labels (N,) int32) of every image of `source`, with the network in eval mode.

    Batches are sharded over the mesh and the last one is padded to the full size (one compiled shape) and its
    padding dropped, so the features do not depend on the device count.
    """
    if features not in FEATURES:
        raise ValueError(f"features must be one of {', '.join(FEATURES)}, got {features!r}")
    mesh = mesh or parallel.make_data_mesh()
    batch_size = batch_size or parallel.round_up_to_devices(512, mesh)
    parallel.check_batch_divisible(batch_size, mesh, "--batch-size")
    n = len(source)
    variables = jax.device_put(variables, parallel.replicated(mesh))
    feature_step = make_feature_step(network, mesh, features)
    rows = parallel.host_local_slice(batch_size)
    all_features, all_labels = [], []
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress, file=sys.stderr):
        indices = np.minimum(np.arange(start, start + batch_size), n - 1)
        images, labels = source.read(indices[rows])
        batch_features = feature_step(variables, parallel.shard_host_batch(images, mesh))
        all_features.append(np.asarray(multihost_utils.process_allgather(batch_features, tiled=True)))
        all_labels.append(np.asarray(multihost_utils.process_allgather(labels, tiled=True)))
    return (np.concatenate(all_features)[:n].astype(np.float32),
            np.concatenate(all_labels)[:n].astype(np.int32))


# --------------------------------------------------------------------------------------------------- linear probe

def _logistic_regression(inverse_strength: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # lbfgs minimises the multinomial loss; the default penalty is L2.
    return make_pipeline(StandardScaler(), LogisticRegression(C=inverse_strength, max_iter=MAX_ITERATIONS))


def _holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified by class where every class has two images or more (a tiny --limit-train may leave one)."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    fit, held_out = train_test_split(np.arange(len(labels)), test_size=fraction, stratify=stratify,
                                     random_state=seed)
    return np.sort(fit), np.sort(held_out)


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                     grid: tuple[float, ...] = C_GRID, holdout: float = HOLDOUT_FRACTION, seed: int = 0,
                     progress: bool = False) -> dict:
    """Multinomial logistic regression on standardised features: C chosen on a held-out part of the training split
    (ties go to the stronger regularisation), refit on the whole split, scored on the test split."""
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    if len(np.unique(train_y)) < 2:
        raise ValueError(f"the training split has a single class ({int(train_y[0])}); a probe needs two or more "
                         "(a --limit-train that is too small?)")
    fit, held_out = _holdout_split(train_y, holdout, seed)
    # One BLAS thread: the products here are small (N×D by D×K), and OpenBLAS's spinning threads made a 42,500×64
    # fit 8× slower on a 2-core machine with another job running (8.4 s against 1.1 s, measured).
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("always", ConvergenceWarning)
        held_out_top1 = {}
        for inverse_strength in tqdm(grid, desc="choose C", disable=not progress, file=sys.stderr):
            model = _logistic_regression(inverse_strength).fit(train_x[fit], train_y[fit])
            held_out_top1[inverse_strength] = 100.0 * float(np.mean(model.predict(train_x[held_out])
                                                                    == train_y[held_out]))
        chosen = max(grid, key=lambda c: (held_out_top1[c], -c))
        model = _logistic_regression(chosen).fit(train_x, train_y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return {"top1": 100.0 * float(np.mean(model.predict(test_x) == test_y)), "n": len(test_y),
            "n_train": len(train_y), "C": chosen, "held_out_top1": {str(c): round(v, 2) for c, v in
                                                                    held_out_top1.items()},
            "train_top1": 100.0 * float(np.mean(model.predict(train_x) == train_y)), "converged": converged}


def linear_probe(network: Network, variables: Variables, train_source: ImageSource, test_source: ImageSource, *,
                 features: str = "penultimate", grid: tuple[float, ...] = C_GRID, seed: int = 0,
                 batch_size: int | None = None, mesh: jax.sharding.Mesh | None = None, progress: bool = True
                 ) -> dict:
    """Top-1 of a logistic regression on the frozen network's features (see fit_linear_probe), with timings."""
    started = time.perf_counter()
    extract = functools.partial(extract_features, network, variables, features=features, batch_size=batch_size,
                                mesh=mesh, progress=progress)
    train_x, train_y = extract(train_source, desc="train features")
    test_x, test_y = extract(test_source, desc="test features")
    extracted = time.perf_counter()
    result = fit_linear_probe(train_x, train_y, test_x, test_y, grid=grid, seed=seed, progress=progress)
    return {"mode": "linear", **result, "features": features, "feature_dim": int(train_x.shape[1]),
            "extract_seconds": round(extracted - started, 1),
            "fit_seconds": round(time.perf_counter() - extracted, 1)}


# ------------------------------------------------------------------------------------------------------- finetune

def finetune(network: Network, variables: Variables, train_source: ImageSource, test_source: ImageSource, *,
             epochs: int = 10, learning_rate: float = 0.01, batch_size: int = 128, weight_decay: float = 5e-4,
             momentum: float = 0.9, flip: bool = True, seed: int = 0, mesh: jax.sharding.Mesh | None = None,
             progress: bool = True) -> dict:
    """Top-1 on `test_source` after fine-tuning the whole network with a new head on `train_source`.

    An epoch is one pass over a fresh permutation of the training split, dropping the last incomplete batch;
    `batch_size` is the global batch, rounded up to a multiple of the device count.
    """
    from dfkd_jax import supervised

    mesh = mesh or parallel.make_data_mesh()
    global_batch = parallel.round_up_to_devices(batch_size, mesh)
    if epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {epochs}")
    if not 1 <= global_batch <= len(train_source):
        raise ValueError(f"--batch-size {global_batch} must lie between 1 and the {len(train_source)} training "
                         "images; lower it")
    labels = source_labels(train_source)
    num_classes = int(labels.max()) + 1
    steps_per_epoch = len(train_source) // global_batch
    image_size = train_source.read(np.zeros(1, np.int64))[0].shape[1]
    started = time.perf_counter()

    tuned, variables = with_new_head(network, variables, num_classes, seed)
    top1_before = evaluate(tuned, variables, test_source, mesh=mesh, progress=False)["top1"]
    optimizer = supervised.make_optimizer(learning_rate, momentum, weight_decay, epochs * steps_per_epoch)
    state = jax.device_put({**variables, "opt": optimizer.init(variables["params"])}, parallel.replicated(mesh))
    train_step = supervised.make_train_step(tuned, optimizer, mesh, padding=max(1, image_size // 8), augment=True,
                                            flip=flip)

    order_rng = np.random.default_rng(seed)
    step_key = jax.random.fold_in(jax.random.key(seed), supervised.AUGMENT_STREAM)
    rows = parallel.host_local_slice(global_batch)
    bar = tqdm(total=epochs * steps_per_epoch, desc="finetune", unit="step", disable=not progress, file=sys.stderr)
    for epoch in range(epochs):
        order = order_rng.permutation(len(train_source))
        totals = {"loss": 0.0, "accuracy": 0.0}
        for step in range(steps_per_epoch):
            images, batch_labels = train_source.read(order[step * global_batch:(step + 1) * global_batch][rows])
            key = jax.random.fold_in(step_key, epoch * steps_per_epoch + step)
            state, metrics = train_step(state, parallel.shard_host_batch(images, mesh),
                                        parallel.shard_host_batch(batch_labels, mesh), key)
            totals = jax.tree.map(jnp.add, totals, metrics)  # stays on device: no sync per step
            bar.update()
        if progress:
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(totals['loss']) / steps_per_epoch:.3f}",
                            acc=f"{100 * float(totals['accuracy']) / steps_per_epoch:.1f}%")
    bar.close()
    trained = {"params": state["params"], "batch_stats": state["batch_stats"]}
    result = evaluate(tuned, trained, test_source, mesh=mesh, progress=False)
    return {"mode": "finetune", "top1": result["top1"], "n": result["n"], "top1_before": top1_before,
            "n_train": len(train_source), "classes": num_classes, "epochs": epochs, "steps": epochs * steps_per_epoch,
            "batch_size": global_batch, "lr": learning_rate, "weight_decay": weight_decay, "flip": flip,
            "train_seconds": round(time.perf_counter() - started, 1)}


# ------------------------------------------------------------------------------------ probes of a distillation run

def _configured(config):
    transfer = config.get("transfer")
    return transfer if transfer is not None and transfer.modes else None


def _open_configured(transfer, image_size: int) -> tuple[ImageSource, ImageSource]:
    data_dir = transfer.data_dir or None
    train, _ = open_probe_source(transfer.train, transfer.train_split, image_size, data_dir=data_dir,
                                 limit=transfer.limit_train or None)
    test, _ = open_probe_source(transfer.test, transfer.test_split, image_size, data_dir=data_dir,
                                limit=transfer.limit_test or None)
    return train, test


def check_configured(config) -> None:
    """Open the data config.transfer names before a run starts: a missing file fails now, not after distillation."""
    transfer = _configured(config)
    if transfer is not None:
        _open_configured(transfer, config.data.image_shape[0])


def run_configured(config, network: Network, variables: Variables, mesh: jax.sharding.Mesh | None = None) -> dict:
    """{"transfer": {mode: result}} for the probes config.transfer asks for; {} when it asks for none (the default).

    The images are the run's own size (config.data.image_shape); see the module docstring for each mode.
    """
    transfer = _configured(config)
    if transfer is None:
        return {}
    train, test = _open_configured(transfer, config.data.image_shape[0])
    progress = config.get("progress", True)
    results = {}
    for mode in transfer.modes:
        print(f"transfer probe ({mode}): {train.description} -> {test.description}", file=sys.stderr)
        with jax.default_matmul_precision("highest"):  # as the run's own evaluation
            if mode == "linear":
                results[mode] = linear_probe(network, variables, train, test, features=transfer.features,
                                             seed=config.seed, mesh=mesh, progress=progress)
            else:
                results[mode] = finetune(network, variables, train, test, epochs=transfer.epochs,
                                         learning_rate=transfer.lr, batch_size=transfer.batch_size,
                                         weight_decay=transfer.weight_decay, flip=transfer.train != "digits",
                                         seed=config.seed, mesh=mesh, progress=progress)
        results[mode] |= {"train": train.description, "test": test.description}
    return {"transfer": results}


# ------------------------------------------------------------------------------------------------------------ CLI

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dfkd_jax.transfer", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    network = parser.add_mutually_exclusive_group(required=True)
    network.add_argument("--network", "--teacher", dest="network",
                         help="directory of a converted network (python -m dfkd_jax.convert, a run's student/)")
    network.add_argument("--random-init", metavar="ARCH", choices=list(zoo.ARCHITECTURES),
                         help=f"a freshly initialised network instead ({', '.join(zoo.ARCHITECTURES)}); its seed is "
                              "--seed")
    parser.add_argument("--train", required=True, help="digits, an .npz or a tfds name")
    parser.add_argument("--test", required=True, help="digits, an .npz or a tfds name")
    parser.add_argument("--mode", required=True, choices=MODES)
    parser.add_argument("--train-split", default="train", help="split of --train (default: train)")
    parser.add_argument("--test-split", default="test", help="split of --test (default: test)")
    parser.add_argument("--data-dir", help="tfds data directory (default: tfds's)")
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE,
                        help="the network's input size; other images are resized to it (default: 32)")
    parser.add_argument("--limit-train", type=int, help="a fixed random subset of N training images")
    parser.add_argument("--limit-test", type=int, help="a fixed random subset of N test images")
    parser.add_argument("--features", default="penultimate", choices=FEATURES,
                        help="linear: the penultimate feature, the pooled stage outputs, or both (default: "
                             "penultimate)")
    parser.add_argument("--epochs", type=int, default=10, help="finetune: epochs (default: 10)")
    parser.add_argument("--lr", type=float, default=0.01, help="finetune: peak learning rate (default: 0.01)")
    parser.add_argument("--batch-size", type=int,
                        help="global batch, rounded up to a multiple of the device count (default: 128 for "
                             "finetune, 512 for feature extraction)")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="finetune: weight decay (default: 5e-4)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction,
                        help="finetune: random horizontal flips (default: on, off for digits)")
    parser.add_argument("--seed", type=int, default=0, help="held-out split, new head, batch order, random init")
    parser.add_argument("--precision", default="highest", choices=["default", "high", "highest"],
                        help="matmul/conv precision (default: highest, i.e. float32 also on GPU/TPU)")
    return parser.parse_args(argv)


def _check_positive(args: argparse.Namespace) -> None:
    for flag in ("image_size", "limit_train", "limit_test", "epochs", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if args.lr <= 0 or args.weight_decay < 0:
        raise ValueError(f"--lr must be > 0 and --weight-decay >= 0, got {args.lr} and {args.weight_decay}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    _check_positive(args)
    started = time.perf_counter()
    if args.network:
        from dfkd_jax.network_io import load_network, read_metadata

        read_metadata(args.network)  # a missing or wrong directory fails first, naming the fix
        description = args.network
    else:
        description = f"a random {args.random_init} (seed {args.seed}, init as its PyTorch layout)"
    train, train_notes = open_probe_source(args.train, args.train_split, args.image_size, data_dir=args.data_dir,
                                           limit=args.limit_train)
    test, test_notes = open_probe_source(args.test, args.test_split, args.image_size, data_dir=args.data_dir,
                                         limit=args.limit_test)
    network, variables = (load_network(args.network)[:2] if args.network else random_network(args.random_init,
                                                                                             seed=args.seed))
    mesh = parallel.make_data_mesh()
    for note in dict.fromkeys(train_notes + test_notes):
        print(note, file=sys.stderr)
    print(f"{args.mode} probe of {network.spec.arch} from {description}: {train.description} -> "
          f"{test.description}; {mesh.devices.size} {jax.devices()[0].platform} device(s)", file=sys.stderr)
    with jax.default_matmul_precision(args.precision):
        if args.mode == "linear":
            result = linear_probe(network, variables, train, test, features=args.features, seed=args.seed,
                                  batch_size=args.batch_size and parallel.round_up_to_devices(args.batch_size, mesh),
                                  mesh=mesh)
        else:
            flip = args.flip if args.flip is not None else args.train != "digits"
            result = finetune(network, variables, train, test, epochs=args.epochs, learning_rate=args.lr,
                              batch_size=args.batch_size or 128, weight_decay=args.weight_decay, flip=flip,
                              seed=args.seed, mesh=mesh)
    result |= {"image_size": args.image_size, "resized": list(dict.fromkeys(train_notes + test_notes)),
               "seconds": round(time.perf_counter() - started, 1)}
    detail = (f"C={result['C']}, {result['feature_dim']} features" if args.mode == "linear"
              else f"before fine-tuning {result['top1_before']:.2f}%")
    print(f"{args.mode} top-1 {result['top1']:.2f}% on {result['n']} test images ({detail})", file=sys.stderr)
    print(json.dumps({"top1": round(result["top1"], 4), "n": result["n"], "mode": args.mode}
                     | {k: v for k, v in result.items() if k not in ("top1", "n", "mode")}))
    return result


def cli() -> None:
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    cli()
