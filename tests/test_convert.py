"""PyTorch -> Flax conversion: real teachers, the DFKD zoo layouts, file-format variants and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from dfkd_jax import convert, parallel
from dfkd_jax.data.sources import ArraySource
from dfkd_jax.evaluate import evaluate
from dfkd_jax.models import IMAGENET_MEAN, IMAGENET_STD, CIFAR10_MEAN, CIFAR10_STD, Network
from dfkd_jax.network_io import load_network

from benchmarks import torch_models as torch_reference
from tests.conftest import REPO

torch.set_num_threads(2)
TOLERANCE = 1e-4

# file, architecture, shortcut, reference network, normalisation, top-1 on exact932 from shared/data/README.md
TEACHERS = [
    *[(f"akamaster/resnet{d}-{tag}.th", f"resnet{d}", "A", torch_reference.AkamasterResNet, "imagenet", top1)
      for d, tag, top1 in [(20, "12fca82f", 91.63), (32, "d509ac18", 93.03), (44, "014dd654", 93.45),
                           (56, "4bfd9763", 92.60)]],
    *[(f"chenyaofo/cifar10_resnet{d}.pth", f"resnet{d}", "B", torch_reference.ChenyaofoResNet, "cifar10", top1)
      for d, top1 in [(20, 92.38), (32, 93.24), (44, 94.21), (56, 94.53)]],
]
NORMALISATION = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "cifar10": (CIFAR10_MEAN, CIFAR10_STD)}


def torch_logits(model: torch.nn.Module, images_u8: np.ndarray, mean, std, train: bool = False) -> np.ndarray:
    x = torch.from_numpy(images_u8.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    model.train(train)
    with torch.no_grad():
        return model(x).numpy()


@pytest.mark.parametrize("file, arch, shortcut, reference, normalisation, table_top1", TEACHERS,
                         ids=[t[0] for t in TEACHERS])
def test_real_teacher_matches_pytorch_and_published_accuracy(shared, exact932, tmp_path, file, arch, shortcut,
                                                             reference, normalisation, table_top1):
    path = str(shared / "teachers" / file)
    out = convert.main(["--torch", path, "--arch", arch, "--out", str(tmp_path / "net"),
                        "--normalisation", normalisation])
    network, variables, metadata = load_network(out)
    assert metadata["spec"]["options"] == {"shortcut": shortcut}
    assert metadata["provenance"]["sha256"] == convert.sha256(path)
    mean, std = NORMALISATION[normalisation]

    # The PyTorch side loads the original file the way its authors' code does.
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    depth = int(arch[len("resnet"):])
    model = reference(depth)
    if "state_dict" in checkpoint:  # akamaster: DataParallel-wrapped state_dict
        model = torch.nn.DataParallel(model)
        checkpoint = checkpoint["state_dict"]
    model.load_state_dict(checkpoint)
    images, labels = exact932
    expected = torch_logits(model, images[:256], mean, std)
    output, _ = jax.jit(lambda v, x: network.apply(v, x, train=False))(variables, images[:256] / np.float32(255))
    np.testing.assert_allclose(np.asarray(output.logits), expected, rtol=0, atol=TOLERANCE)

    result = evaluate(network, variables, ArraySource(images, labels, "exact932"), progress=False)
    assert result["n"] == 932
    assert abs(result["correct"] - round(table_top1 * 932 / 100)) <= 1, result


@pytest.fixture(scope="module")
def layouts(shared):
    with open(shared / "docs" / "cmi_zoo_layouts.json") as f:
        return json.load(f)


@pytest.mark.parametrize("arch", sorted(torch_reference.ZOO))
def test_zoo_network_converts_with_parity_in_eval_and_train_mode(arch, layouts, tmp_path):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch_reference.randomise_batchnorm(torch_reference.ZOO[arch](10), generator)
    state_dict = model.state_dict()
    assert {k: list(v.shape) for k, v in state_dict.items()} == layouts[arch], "reference differs from the zoo"
    path = tmp_path / f"{arch}.pth"
    torch.save(state_dict, path)

    spec, variables = convert.convert(str(path), arch)
    network = Network(spec, Network.abstract(spec)[0].graphdef)
    assert spec.num_classes == 10
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    x = images / np.float32(255)

    expected = torch_logits(model, images, spec.mean, spec.std, train=False)
    output, _ = jax.jit(lambda v, x: network.apply(v, x, train=False))(variables, x)
    np.testing.assert_allclose(np.asarray(output.logits), expected, rtol=0, atol=TOLERANCE)

    # Train mode: batch statistics of the global batch, here sharded over all devices, and PyTorch's running-stat
    # update (unbiased variance, momentum 0.1).
    mesh = parallel.make_data_mesh()
    expected = torch_logits(model, images, spec.mean, spec.std, train=True)
    output, batch_stats = jax.jit(lambda v, x: network.apply(v, x, train=True))(
        jax.device_put(variables, parallel.replicated(mesh)), jax.device_put(x, parallel.batch_sharded(mesh)))
    np.testing.assert_allclose(np.asarray(output.logits), expected, rtol=0, atol=TOLERANCE)
    updated = model.state_dict()
    for path_, variable in nnx.to_flat_state(batch_stats):
        key = ".".join(map(str, path_[:-1])) + (".running_mean" if path_[-1] == "mean" else ".running_var")
        np.testing.assert_allclose(np.asarray(variable[...]), updated[key].numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=key)


# ------------------------------------------------------------------------------------------- file-format variants

@pytest.fixture(scope="module")
def small_resnet():
    torch.manual_seed(1)
    model = torch_reference.randomise_batchnorm(torch_reference.AkamasterResNet(20), torch.Generator().manual_seed(1))
    return model.state_dict()


@pytest.mark.parametrize("variant", ["bare", "state_dict", "model_state_dict", "model", "module_prefix",
                                     "no_num_batches_tracked", "legacy_format", "akamaster_like"])
def test_checkpoint_variants_convert_to_the_same_variables(small_resnet, tmp_path, variant):
    state = dict(small_resnet)
    if variant in ("no_num_batches_tracked", "akamaster_like"):
        state = {k: v for k, v in state.items() if "num_batches_tracked" not in k}
    if variant in ("module_prefix", "akamaster_like"):
        state = {f"module.{k}": v for k, v in state.items()}
    content = {"bare": state, "module_prefix": state, "no_num_batches_tracked": state, "legacy_format": state,
               "akamaster_like": {"state_dict": state, "best_prec1": 91.7}}.get(variant, {variant: state,
                                                                                          "epoch": 3})
    path = tmp_path / "ckpt.pth"
    torch.save(content, path, _use_new_zipfile_serialization=variant not in ("legacy_format", "akamaster_like"))
    with open(path, "rb") as f:
        magic = f.read(4)
    assert (magic == convert.ZIP_MAGIC) == (variant not in ("legacy_format", "akamaster_like"))

    spec, variables = convert.convert(str(path), "resnet20")
    assert spec.options == {"shortcut": "A"}
    kernel = np.asarray(variables["params"]["layer2"][0]["conv1"]["kernel"][...])
    np.testing.assert_array_equal(kernel, small_resnet["layer2.0.conv1.weight"].numpy().transpose(2, 3, 1, 0))
    var = np.asarray(variables["batch_stats"]["bn1"]["var"][...])
    np.testing.assert_array_equal(var, small_resnet["bn1.running_var"].numpy())


# ------------------------------------------------------------------------------------------------------ bad input

def test_wrong_architecture_lists_missing_unexpected_and_wrong_shapes(shared, tmp_path):
    path = str(shared / "teachers" / "chenyaofo" / "cifar10_resnet56.pth")
    with pytest.raises(convert.LayoutMismatchError) as error:
        convert.convert(path, "resnet110")
    # Blocks 9..17 of each of the 3 stages, 10 tensors each (two convs, two BNs with 4 tensors).
    assert len(error.value.missing) == 3 * 9 * 10
    assert "layer1.9.conv1.weight" in error.value.missing and not error.value.unexpected
    assert "fits: resnet56 (shortcut B)" in str(error.value)

    with pytest.raises(convert.LayoutMismatchError) as error:
        convert.convert(path, "resnet20")
    assert "layer3.8.bn2.running_var" in error.value.unexpected and not error.value.missing

    torch.manual_seed(0)
    narrow = tmp_path / "wrn_16_1.pth"
    torch.save(torch_reference.ZOO["wrn_16_1"](10).state_dict(), narrow)
    with pytest.raises(convert.LayoutMismatchError) as error:
        convert.convert(str(narrow), "wrn_16_2")
    message = str(error.value)
    assert error.value.wrong_shape["block1.layer.0.conv1.weight"] == ((16, 16, 3, 3), (32, 16, 3, 3))
    assert "block1.layer.0.convShortcut.weight" in error.value.missing  # wrn_16_2 widens in its first block
    assert "wrong shape" in message and "missing" in message and "fits: wrn_16_1" in message

    with pytest.raises(convert.LayoutMismatchError, match="expected"):
        convert.convert(path, "resnet56", num_classes=100)


def test_cli_wrong_architecture_exits_with_the_listing_and_writes_nothing(shared, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "dfkd_jax.convert", "--torch",
         str(shared / "teachers" / "akamaster" / "resnet32-d509ac18.th"), "--arch", "vgg8_bn", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert "does not fit vgg8_bn" in result.stderr and "resnet32 (shortcut A)" in result.stderr
    assert "Nothing was written." in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("source", ["chenyaofo/cifar10_resnet20.pth", "akamaster/resnet20-12fca82f.th"])
def test_truncated_checkpoint_is_reported_as_truncated(shared, tmp_path, source):
    data = (shared / "teachers" / source).read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(convert.CheckpointFormatError, match="truncated or corrupted"):
        convert.convert(str(path), "resnet20")


def test_non_checkpoint_files_are_reported(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(convert.CheckpointFormatError, match="not a PyTorch checkpoint"):
        convert.convert(str(text), "resnet20")
    archive = tmp_path / "arrays.npz"
    np.savez(archive, x=np.zeros(3))
    with pytest.raises(convert.CheckpointFormatError, match="zip archive but not a PyTorch checkpoint"):
        convert.convert(str(archive), "resnet20")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(convert.CheckpointFormatError, match="empty"):
        convert.convert(str(empty), "resnet20")
    with pytest.raises(convert.CheckpointFormatError, match="no checkpoint file"):
        convert.convert(str(tmp_path / "absent.pth"), "resnet20")
    tensor_only = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(convert.CheckpointFormatError, match="not a state_dict"):
        convert.convert(str(tensor_only), "resnet20")


def test_existing_output_is_never_overwritten(shared, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="already exists"):
        convert.main(["--torch", str(shared / "teachers" / "chenyaofo" / "cifar10_resnet20.pth"),
                      "--arch", "resnet20", "--out", str(out)])
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_half_given_normalisation_is_refused(shared, tmp_path):
    with pytest.raises(ValueError, match="--mean and --std together"):
        convert.main(["--torch", str(shared / "teachers" / "chenyaofo" / "cifar10_resnet20.pth"),
                      "--arch", "resnet20", "--out", str(tmp_path / "o"), "--mean", "0.5,0.5,0.5"])
    assert not (tmp_path / "o").exists()
