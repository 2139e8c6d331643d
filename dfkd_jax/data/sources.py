"""Labelled evaluation images from an `.npz` file or a tensorflow-datasets name, read without TensorFlow."""

from __future__ import annotations

import dataclasses
import os
from typing import Protocol

import numpy as np


class ImageSource(Protocol):
    description: str

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (n, H, W, 3) uint8 and labels (n,) int32 at `indices`."""


@dataclasses.dataclass
class ArraySource:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,)
    description: str

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices].astype(np.int32)


@dataclasses.dataclass
class TfdsSource:
    data_source: object  # tfds random-access data source
    image_key: str
    label_key: str
    description: str

    def __len__(self) -> int:
        return len(self.data_source)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        records = self.data_source.__getitems__([int(i) for i in indices])
        images = np.stack([r[self.image_key] for r in records])
        if images.ndim == 3:  # greyscale stored without a channel axis
            images = images[..., None]
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        return images, np.asarray([r[self.label_key] for r in records], np.int32)


def load_npz(path: str) -> ArraySource:
    with np.load(path) as data:
        if "x" not in data or "y" not in data:
            raise ValueError(f"{path} must hold arrays 'x' (uint8 images, N×H×W×3) and 'y' (labels); "
                             f"it holds {sorted(data.files)}")
        images, labels = data["x"], data["y"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: 'x' must be uint8 images of shape (N, H, W, 3) (NHWC, RGB), "
                         f"got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"{path}: 'y' must hold one label per image, got shape {labels.shape} for "
                         f"{len(images)} images")
    return ArraySource(images, labels, f"{path} ({len(labels)} images)")


def load_tfds(name: str, split: str = "test", data_dir: str | None = None) -> TfdsSource:
    import tensorflow_datasets as tfds
    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # tfds warns about the missing folder before we can say it better
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared()
    finally:
        absl_logging.set_verbosity(verbosity)
    if not prepared:
        build = (f"python -m dfkd_jax.data.build --dataset {name} --manual-dir DIR_WITH_THE_FILES"
                 + (f" --data-dir {data_dir}" if data_dir else ""))
        raise FileNotFoundError(
            f"tensorflow-datasets '{name}' is not prepared in {builder.data_dir} (nothing is downloaded here): "
            f"prepare it from local files with `{build}` (python -m dfkd_jax.data.build --help lists the accepted "
            "files), give the directory it was prepared in (--data-dir, --config.eval.data_dir), or evaluate on "
            "an .npz (the CIFAR presets' eval=shared reads ../shared's lossless test images)")
    supervised = builder.info.supervised_keys or ("image", "label")
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    return TfdsSource(source, supervised[0], supervised[1],
                      f"tfds {name}:{builder.info.version} split {split} ({len(source)} images, {builder.data_dir})")


def open_source(source: str, split: str = "test", data_dir: str | None = None) -> ImageSource:
    """An `.npz` path, or a tensorflow-datasets name such as `cifar10`."""
    if source.endswith(".npz") or os.path.sep in source:
        if not os.path.isfile(source):
            raise FileNotFoundError(f"no data file at {source}")
        return load_npz(source)
    return load_tfds(source, split, data_dir)
