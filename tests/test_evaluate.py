"""Evaluation: sharded top-1 that does not depend on the device count, from .npz files and tfds."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest

from dfkd_jax import convert, parallel
from dfkd_jax.data import cifar
from dfkd_jax.data.sources import ArraySource, load_npz, open_source
from dfkd_jax.evaluate import evaluate
from dfkd_jax.network_io import load_network

from tests.conftest import REPO


@pytest.fixture(scope="module")
def resnet20_dir(shared, tmp_path_factory):
    """chenyaofo's resnet20 (CIFAR-10 normalisation): 92.38% on exact932, 81.05% on the JPEG test set."""
    out = tmp_path_factory.mktemp("teacher") / "resnet20"
    return convert.main(["--torch", str(shared / "teachers" / "chenyaofo" / "cifar10_resnet20.pth"),
                         "--arch", "resnet20", "--out", str(out)])


def run_evaluate_cli(args: list[str], devices: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "dfkd_jax.evaluate", *args], capture_output=True, text=True,
                          cwd=REPO, env=env)


def test_cli_prints_json_last_and_gives_the_same_result_on_1_and_8_devices(shared, resnet20_dir):
    data = str(shared / "data" / "cifar10_test_exact932.npz")
    results = []
    for devices in (1, 8):
        completed = run_evaluate_cli(["--teacher", resnet20_dir, "--data", data], devices)
        assert completed.returncode == 0, completed.stderr
        assert f"{devices} cpu device(s)" in completed.stderr
        results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    assert results[0] == results[1] == {"top1": round(100 * 861 / 932, 4), "n": 932}  # 92.38 in the table


def test_logits_do_not_depend_on_the_device_count_or_batch_padding(exact932, resnet20_dir):
    network, variables, _ = load_network(resnet20_dir)
    images, labels = exact932
    source = ArraySource(images[:100], labels[:100], "first 100")
    one = evaluate(network, variables, source, batch_size=64, mesh=parallel.make_data_mesh(jax.devices()[:1]),
                   progress=False, return_logits=True)
    eight = evaluate(network, variables, source, batch_size=64, mesh=parallel.make_data_mesh(), progress=False,
                     return_logits=True)
    assert jax.device_count() == 8
    assert one["correct"] == eight["correct"] and one["n"] == eight["n"] == 100
    np.testing.assert_allclose(one["logits"], eight["logits"], rtol=0, atol=1e-5)
    # The padded rows of the second batch (100 images in batches of 64) do not leak into the count.
    per_image = (one["logits"].argmax(-1) == labels[:100]).sum()
    assert one["correct"] == per_image


def test_batch_size_must_divide_over_the_devices(exact932, resnet20_dir):
    network, variables, _ = load_network(resnet20_dir)
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        evaluate(network, variables, ArraySource(*exact932, "exact932"), batch_size=100, progress=False)


def test_npz_sources_are_validated(tmp_path):
    bad_keys = tmp_path / "bad_keys.npz"
    np.savez(bad_keys, images=np.zeros((2, 32, 32, 3), np.uint8), labels=np.zeros(2))
    with pytest.raises(ValueError, match=r"must hold arrays 'x'.*'y'.*\['images', 'labels'\]"):
        load_npz(str(bad_keys))
    floats = tmp_path / "floats.npz"
    np.savez(floats, x=np.zeros((2, 32, 32, 3), np.float32), y=np.zeros(2))
    with pytest.raises(ValueError, match="must be uint8 images"):
        load_npz(str(floats))
    nchw = tmp_path / "nchw.npz"
    np.savez(nchw, x=np.zeros((2, 3, 32, 32), np.uint8), y=np.zeros(2))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        load_npz(str(nchw))
    with pytest.raises(FileNotFoundError, match="no data file"):
        open_source(str(tmp_path / "absent.npz"))


def test_labels_beyond_the_class_count_are_refused(resnet20_dir):
    network, variables, _ = load_network(resnet20_dir)
    source = ArraySource(np.zeros((8, 32, 32, 3), np.uint8), np.full(8, 42), "cifar100-like")
    with pytest.raises(ValueError, match="label 42 but the network has 10 classes"):
        evaluate(network, variables, source, progress=False)


# ---------------------------------------------------------------------------------- tfds from local files

def _write_python_version(manual_dir, dataset: str, train: int, test: int, seed: int = 0) -> dict:
    """A miniature cifar-{10,100}-python.tar.gz in the official layout (pickled dicts, CHW rows)."""
    rng = np.random.default_rng(seed)
    num_classes = 10 if dataset == "cifar10" else 100
    layout = cifar._PYTHON_LAYOUT[dataset]
    splits = {"train": train, "test": test}
    made = {}
    members = {}
    for split, names in layout["splits"].items():
        per_file = splits[split] // len(names)
        images, fine = [], []
        for name in names:
            x = rng.integers(0, 256, (per_file, 32, 32, 3), dtype=np.uint8)
            y = rng.integers(0, num_classes, per_file)
            entry = {b"data": x.transpose(0, 3, 1, 2).reshape(per_file, -1)}
            if dataset == "cifar10":
                entry[b"labels"] = [int(v) for v in y]
            else:
                entry[b"fine_labels"] = [int(v) for v in y]
                entry[b"coarse_labels"] = [int(v) // 5 for v in y]
            members[name] = pickle.dumps(entry)
            images.append(x)
            fine.append(y)
        made[split] = (np.concatenate(images), np.concatenate(fine))
    meta = ({b"label_names": [c.encode() for c in cifar.CIFAR10_CLASSES]} if dataset == "cifar10" else
            {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
             b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    members[layout["meta"]] = pickle.dumps(meta)
    with tarfile.open(manual_dir / layout["archive"], "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"{layout['folder']}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return made


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_tfds_cifar_builds_from_the_python_tarball_and_reads_back_exactly(tmp_path, dataset):
    import tensorflow_datasets as tfds

    manual = tmp_path / "downloads"
    manual.mkdir()
    made = _write_python_version(manual, dataset, train=50 if dataset == "cifar10" else 20, test=10)
    cifar.prepare(dataset, str(manual), str(tmp_path / "tfds"))

    for split, (images, labels) in made.items():
        source = tfds.data_source(dataset, split=split, data_dir=str(tmp_path / "tfds"), download=False)
        assert len(source) == len(labels)
        for record in source:  # tfds shuffles the order; the id (b"train_00042") says where each came from
            index = int(record["id"].decode().rsplit("_", 1)[1])
            np.testing.assert_array_equal(record["image"], images[index])
            assert record["label"] == labels[index]
            if dataset == "cifar100":
                assert record["coarse_label"] == labels[index] // 5
    assert "tensorflow" not in sys.modules, "the tfds path must not import TensorFlow"


def test_missing_files_and_unprepared_datasets_say_what_to_do(tmp_path):
    with pytest.raises(cifar.MissingDataError, match=r"cifar-100-python\.tar\.gz"):
        cifar.prepare("cifar100", str(tmp_path), str(tmp_path / "tfds"))
    assert not (tmp_path / "tfds").exists()
    with pytest.raises(FileNotFoundError, match="python -m dfkd_jax.data.build --dataset cifar10"):
        open_source("cifar10", data_dir=str(tmp_path / "tfds"))


def test_tfds_cifar10_from_the_shared_npz_files_evaluates_like_the_table(shared, tmp_path, resnet20_dir):
    manual = tmp_path / "manual"
    manual.mkdir()
    for name in ("cifar10_train_jpeg.npz", "cifar10_test_jpeg.npz"):
        os.symlink(shared / "data" / name, manual / name)
    built = subprocess.run([sys.executable, "-m", "dfkd_jax.data.build", "--dataset", "cifar10", "--manual-dir",
                            str(manual), "--data-dir", str(tmp_path / "tfds")], capture_output=True, text=True,
                           cwd=REPO)
    assert built.returncode == 0, built.stderr
    assert "train 50000" in built.stdout and "test 10000" in built.stdout

    completed = run_evaluate_cli(["--teacher", resnet20_dir, "--data", "cifar10", "--data-dir",
                                  str(tmp_path / "tfds")], devices=8)
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["n"] == 10000
    assert abs(result["top1"] - 81.05) <= 0.01 + 1e-9  # the table's "jpeg full test" column, within one image
