"""CIFAR-10/100 from local files, and tfds builders that prepare `cifar10` / `cifar100` from them without TensorFlow.

Accepted files in the manual directory (the first found wins):
- `cifar-10-python.tar.gz` / `cifar-100-python.tar.gz`, or the extracted `cifar-10-batches-py/` / `cifar-100-python/`
  (the "python version" from the CIFAR page that most users have);
- CIFAR-10 only: `cifar10_train_jpeg.npz` and `cifar10_test_jpeg.npz` (the files in the project's `shared/data`;
  JPEG-decoded pixels, about 10 points below the lossless originals for any classifier).

The builders subclass tfds's own `Cifar10` / `Cifar100`, so the prepared data has the stock features, name and
version, and `tfds.data_source("cifar10", data_dir=...)` reads it back.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import tarfile
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.image_classification.cifar import Cifar10, Cifar100

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclasses.dataclass
class LabelledImages:
    images: np.ndarray  # (N, 32, 32, 3) uint8
    labels: dict[str, np.ndarray]  # label key ("label", "coarse_label") -> (N,) int64


@dataclasses.dataclass
class LocalCifar:
    splits: dict[str, LabelledImages]
    label_names: dict[str, list[str]]
    origin: str


class MissingDataError(FileNotFoundError):
    pass


# -------------------------------------------------------------------------------------- the python-version tarballs

_PYTHON_LAYOUT = {
    "cifar10": dict(archive="cifar-10-python.tar.gz", folder="cifar-10-batches-py",
                    splits={"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                    labels={"label": b"labels"}, meta="batches.meta", names={"label": b"label_names"}),
    "cifar100": dict(archive="cifar-100-python.tar.gz", folder="cifar-100-python",
                     splits={"train": ["train"], "test": ["test"]},
                     labels={"label": b"fine_labels", "coarse_label": b"coarse_labels"}, meta="meta",
                     names={"label": b"fine_label_names", "coarse_label": b"coarse_label_names"}),
}


def _unpickle(data: bytes) -> dict:
    return pickle.loads(data, encoding="bytes")


def _read_members(manual_dir: str, layout: dict, names: list[str]) -> dict[str, bytes] | None:
    """The named batch files, from the extracted folder or straight from the archive; None if neither is there."""
    folder = os.path.join(manual_dir, layout["folder"])
    if os.path.isdir(folder):
        return {name: open(os.path.join(folder, name), "rb").read() for name in names}
    archive = os.path.join(manual_dir, layout["archive"])
    if os.path.isfile(archive):
        with tarfile.open(archive, "r:gz") as tar:
            return {name: tar.extractfile(f"{layout['folder']}/{name}").read() for name in names}
    return None


def read_python_version(manual_dir: str, dataset: str) -> LocalCifar | None:
    layout = _PYTHON_LAYOUT[dataset]
    files = _read_members(manual_dir, layout, [n for names in layout["splits"].values() for n in names]
                          + [layout["meta"]])
    if files is None:
        return None
    splits = {}
    for split, batch_names in layout["splits"].items():
        batches = [_unpickle(files[name]) for name in batch_names]
        images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = {key: np.concatenate([np.asarray(b[field], np.int64) for b in batches])
                  for key, field in layout["labels"].items()}
        splits[split] = LabelledImages(np.ascontiguousarray(images, np.uint8), labels)
    meta = _unpickle(files[layout["meta"]])
    names = {key: [n.decode() for n in meta[field]] for key, field in layout["names"].items()}
    return LocalCifar(splits, names, os.path.join(manual_dir, layout["folder"]))


# ------------------------------------------------------------------------------------------ the shared npz files

def decode_jpeg_array(jpeg: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Concatenated JPEG files (image i is jpeg[offsets[i]:offsets[i+1]]) -> (N, H, W, 3) uint8."""
    return np.stack([np.asarray(Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
                     for i in range(len(offsets) - 1)])


def read_npz_version(manual_dir: str) -> LocalCifar | None:
    train_path = os.path.join(manual_dir, "cifar10_train_jpeg.npz")
    test_path = os.path.join(manual_dir, "cifar10_test_jpeg.npz")
    if not (os.path.isfile(train_path) and os.path.isfile(test_path)):
        return None
    with np.load(train_path) as train, np.load(test_path) as test:
        splits = {"train": LabelledImages(decode_jpeg_array(train["jpeg"], train["offsets"]),
                                          {"label": train["y"].astype(np.int64)}),
                  "test": LabelledImages(test["x"], {"label": test["y"].astype(np.int64)})}
    return LocalCifar(splits, {"label": list(CIFAR10_CLASSES)}, f"{train_path} + {test_path}")


def check_local_files(manual_dir: str, dataset: str) -> None:
    """Raise MissingDataError naming the expected files unless `manual_dir` holds `dataset` in a known layout."""
    if dataset not in _PYTHON_LAYOUT:
        raise ValueError(f"unknown dataset {dataset!r}; choose cifar10 or cifar100")
    layout = _PYTHON_LAYOUT[dataset]
    candidates = [[layout["folder"]], [layout["archive"]]]
    if dataset == "cifar10":
        candidates.append(["cifar10_train_jpeg.npz", "cifar10_test_jpeg.npz"])
    if not any(all(os.path.exists(os.path.join(manual_dir, name)) for name in names) for names in candidates):
        expected = " or ".join(" + ".join(names) for names in candidates)
        raise MissingDataError(f"no {dataset} files in {os.path.abspath(manual_dir)}: expected {expected}.")


def read_local_cifar(manual_dir: str, dataset: str) -> LocalCifar:
    check_local_files(manual_dir, dataset)
    return read_python_version(manual_dir, dataset) or read_npz_version(manual_dir)


# ---------------------------------------------------------------------------------------------------- tfds builders

def _examples(split: str, data: LabelledImages) -> Iterator[tuple[str, dict]]:
    for index, image in enumerate(data.images):
        key = f"{split}_{index:05d}"
        # A PIL image is PNG-encoded by Pillow inside tfds (a NumPy array would need TensorFlow).
        yield key, {"id": key, "image": Image.fromarray(image)} | {k: int(v[index]) for k, v in data.labels.items()}


class _LocalFilesMixin:
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    def _split_generators(self, dl_manager):
        local = read_local_cifar(os.fspath(dl_manager.manual_dir), self.name)
        for key, names in local.label_names.items():
            self.info.features[key].names = names
        return {split: _examples(split, data) for split, data in local.splits.items()}


class LocalCifar10(_LocalFilesMixin, Cifar10, skip_registration=True):
    """tfds `cifar10` prepared from local files."""

    name = "cifar10"


class LocalCifar100(_LocalFilesMixin, Cifar100, skip_registration=True):
    """tfds `cifar100` prepared from local files."""

    name = "cifar100"


BUILDERS = {"cifar10": LocalCifar10, "cifar100": LocalCifar100}


def prepare(dataset: str, manual_dir: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Prepare tfds `dataset` in `data_dir` (tfds's default when None) from the files in `manual_dir`."""
    if dataset not in BUILDERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(BUILDERS)}")
    check_local_files(manual_dir, dataset)  # fail early, before tfds creates any directory
    builder = BUILDERS[dataset](data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder
