"""The model zoo: BatchNorm semantics, what one forward pass returns, and input validation."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfkd_jax.convert import TORCH_LEAF
from dfkd_jax.models import ARCHITECTURES, Network, NetworkSpec
from dfkd_jax.models.layers import BatchNorm


def test_batchnorm_matches_a_float64_hand_computation():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (4, 5, 5, 6)).astype(np.float32)
    bn = BatchNorm(6, momentum=0.1, epsilon=1e-5)
    bn.scale[...] = rng.normal(size=6).astype(np.float32)
    bn.bias[...] = rng.normal(size=6).astype(np.float32)
    running_mean = rng.normal(size=6).astype(np.float32)
    running_var = rng.uniform(0.5, 2.0, 6).astype(np.float32)
    bn.mean[...], bn.var[...] = running_mean, running_var

    x64 = x.astype(np.float64).reshape(-1, 6)
    mean, biased_var, unbiased_var = x64.mean(0), x64.var(0), x64.var(0, ddof=1)
    scale, bias = np.asarray(bn.scale[...], np.float64), np.asarray(bn.bias[...], np.float64)

    eval_out, recorded = nnx.capture(bn, nnx.Intermediate)(x, train=False)
    np.testing.assert_array_equal(recorded["inputs"].get_value()[0], x)  # the layer records its input
    expected = (x64 - running_mean) / np.sqrt(running_var.astype(np.float64) + 1e-5) * scale + bias
    np.testing.assert_allclose(np.asarray(eval_out).reshape(-1, 6), expected, rtol=1e-5, atol=1e-5)

    train_out, _ = nnx.capture(bn, nnx.Intermediate)(x, train=True)
    expected = (x64 - mean) / np.sqrt(biased_var + 1e-5) * scale + bias  # normalises with the biased variance
    np.testing.assert_allclose(np.asarray(train_out).reshape(-1, 6), expected, rtol=1e-5, atol=1e-5)
    # ... but tracks the unbiased one, as PyTorch does.
    np.testing.assert_allclose(np.asarray(bn.mean[...]), 0.9 * running_mean + 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.var[...]), 0.9 * running_var + 0.1 * unbiased_var, rtol=1e-5)


@pytest.mark.parametrize("arch", ["resnet20", "resnet18", "wrn_16_2", "vgg8_bn"])
def test_apply_returns_logits_features_and_every_bn_input_in_one_pass(arch):
    network, variables = Network.create(NetworkSpec(arch, 7), seed=0)
    images = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype(np.float32)
    output, batch_stats = jax.jit(lambda v, x: network.apply(v, x, train=False))(variables, images)

    num_bn = len(nnx.to_flat_state(variables["batch_stats"])) // 2  # mean and var per layer
    assert output.logits.shape == (4, 7)
    assert len(output.bn_inputs) == num_bn
    stem = output.bn_inputs[0]  # the stem's BN (the first conv's output), first
    first_conv_width = 16 if arch.startswith(("resnet20", "wrn")) else 64
    assert stem.inputs.shape == (4, 32, 32, first_conv_width)
    for bn_input in output.bn_inputs:
        assert bn_input.running_mean.shape == bn_input.running_var.shape == bn_input.inputs.shape[-1:]
    # The feature is the classifier's input: applying the classifier to it gives the logits.
    head = nnx.merge(network.graphdef, variables["params"], variables["batch_stats"])
    head = getattr(head, ARCHITECTURES[arch].head)
    np.testing.assert_allclose(np.asarray(head(output.features)), np.asarray(output.logits), rtol=1e-5, atol=1e-5)
    # Eval mode leaves the running statistics untouched.
    jax.tree_util.tree_map(np.testing.assert_array_equal, batch_stats, variables["batch_stats"])


def test_every_zoo_layout_is_the_published_one(shared):
    layouts = json.loads((shared / "docs" / "cmi_zoo_layouts.json").read_text())
    for arch, layout in layouts.items():
        _, abstract = Network.abstract(NetworkSpec(arch, 10))
        keys = {}
        for collection in ("params", "batch_stats"):
            for path, variable in nnx.to_flat_state(abstract[collection]):
                shape = variable.get_value().shape
                torch_shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
                keys[".".join(map(str, path[:-1])) + "." + TORCH_LEAF[path[-1]]] = list(torch_shape)
        expected = {k: v for k, v in layout.items() if not k.endswith("num_batches_tracked")}
        assert keys == expected, arch


def test_he_resnet_key_counts_match_the_akamaster_checkpoints():
    # shared/teachers/README.md: 97 / 157 / 217 / 277 tensors for resnet20/32/44/56.
    for depth, tensors in [(20, 97), (32, 157), (44, 217), (56, 277)]:
        _, abstract = Network.abstract(NetworkSpec(f"resnet{depth}", 10, {"shortcut": "A"}))
        count = sum(len(nnx.to_flat_state(abstract[c])) for c in ("params", "batch_stats"))
        assert count == tensors, depth


@pytest.mark.parametrize("kwargs, message", [
    (dict(arch="resnet21", num_classes=10), "unknown architecture 'resnet21'"),
    (dict(arch="resnet18", num_classes=10, options={"shortcut": "A"}), "takes no option 'shortcut'"),
    (dict(arch="resnet20", num_classes=10, options={"shortcut": "C"}), "must be one of"),
    (dict(arch="resnet20", num_classes=0), "num_classes must be positive"),
    (dict(arch="resnet20", num_classes=10, mean=(0.5, 0.5)), "mean needs 3 values"),
    (dict(arch="resnet20", num_classes=10, std=(0.2, 0.0, 0.2)), "std values must be positive"),
])
def test_bad_network_specs_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NetworkSpec(**kwargs)


def test_uint8_images_are_refused_rather_than_misread():
    network, variables = Network.create(NetworkSpec("resnet20", 10))
    with pytest.raises(TypeError, match="divide uint8 pixels by 255"):
        network.apply(variables, np.zeros((1, 32, 32, 3), np.uint8))


@pytest.mark.parametrize("kernel, stride, padding, cin, cout", [
    (3, 1, 1, 16, 16), (3, 2, 1, 16, 32), (1, 2, 0, 16, 32), (1, 1, 0, 8, 4), (3, 1, 1, 3, 8), (3, 2, 1, 5, 7)])
def test_gemm_weight_gradient_equals_xla_autodiff(kernel, stride, padding, cin, cout):
    from dfkd_jax.models import conv

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 9, 10, cin)).astype(np.float32)  # odd, unequal sizes exercise stride/padding edges
    w = (0.2 * rng.standard_normal((kernel, kernel, cin, cout))).astype(np.float32)
    pad = ((padding, padding), (padding, padding))
    target = rng.standard_normal(np.shape(conv._xla_conv(x, w, stride, pad))).astype(np.float32)

    def loss(conv_fn, x, w):
        return jnp.sum((conv_fn(x, w, stride, pad) - target) ** 2)

    reference = jax.grad(functools.partial(loss, conv._xla_conv), argnums=(0, 1))(x, w)
    gemm = jax.jit(jax.grad(functools.partial(loss, conv._conv_gemm_weight_grad), argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(gemm[0], reference[0], rtol=1e-5, atol=1e-5)  # input gradient: XLA's own
    np.testing.assert_allclose(gemm[1], reference[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(conv._conv_gemm_weight_grad(x, w, stride, pad), conv._xla_conv(x, w, stride, pad))


@pytest.mark.parametrize("shape", [(16, 6, 5, 8), (32, 12)])  # BatchNorm2d on NHWC, BatchNorm1d on (N, C)
def test_training_batchnorm_value_gradients_and_moments_match_float64_pytorch(shape):
    """The closed-form gradient of `batch_norm_train`, including the paths through the returned mean and variance
    (the running statistics use them), against PyTorch's autograd in float64."""
    import torch

    from dfkd_jax.models.layers import batch_norm_train

    rng = np.random.default_rng(0)
    channels = shape[-1]
    x = (rng.standard_normal(shape) + 1.5).astype(np.float32)  # a large mean: the centring must be right
    scale, bias = (rng.random(channels) + 0.5).astype(np.float32), rng.standard_normal(channels).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    dmean, dvar = rng.standard_normal(channels).astype(np.float32), rng.standard_normal(channels).astype(np.float32)

    (y, mean, var), vjp = jax.vjp(lambda x, s, b: batch_norm_train(x, s, b, 1e-5), x, scale, bias)
    dx, dscale, dbias = jax.jit(vjp)((dy, dmean, dvar))

    to_torch = functools.partial(torch.tensor, dtype=torch.float64, requires_grad=True)
    xt = to_torch(np.moveaxis(x, -1, 1))
    batch_norm = torch.nn.BatchNorm2d(channels) if len(shape) == 4 else torch.nn.BatchNorm1d(channels)
    batch_norm = batch_norm.double().train()
    with torch.no_grad():
        batch_norm.weight.copy_(torch.from_numpy(scale)), batch_norm.bias.copy_(torch.from_numpy(bias))
    yt = batch_norm(xt)
    dims = [0] + list(range(2, xt.ndim))
    mean_t, var_t = xt.mean(dims), xt.var(dims, unbiased=False)
    objective = ((yt * torch.tensor(np.moveaxis(dy, -1, 1), dtype=torch.float64)).sum()
                 + (mean_t * torch.tensor(dmean, dtype=torch.float64)).sum()
                 + (var_t * torch.tensor(dvar, dtype=torch.float64)).sum())
    dx_t, dscale_t, dbias_t = torch.autograd.grad(objective, [xt, batch_norm.weight, batch_norm.bias])

    def close(actual, expected, what, tolerance=1e-5):
        expected = expected.detach().numpy()
        error = np.linalg.norm(np.asarray(actual, np.float64) - expected) / np.linalg.norm(expected)
        assert error < tolerance, f"{what}: relative error {error:.1e}"
    close(y, torch.moveaxis(yt, 1, -1), "y")
    close(mean, mean_t, "mean")
    close(var, var_t, "variance")
    close(dx, torch.moveaxis(dx_t, 1, -1), "∂/∂x")
    close(dscale, dscale_t, "∂/∂scale")
    close(dbias, dbias_t, "∂/∂bias")


# ------------------------------------------------------------------------------------------- stage outputs

@pytest.mark.parametrize("arch, stage_names, after_relu", [
    ("resnet20", ["layer1", "layer2", "layer3"], False),
    ("resnet18", ["layer1", "layer2", "layer3", "layer4"], False),
    ("wrn_16_2", ["block1", "block2", "block3"], False),
    # RepDistiller's VGG applies each block's last ReLU outside the block: the stage is relu(block(x)).
    ("vgg8_bn", ["block0", "block1", "block2", "block3", "block4"], True),
])
def test_stage_outputs_are_what_pytorch_hooks_on_each_stage_see(arch, stage_names, after_relu):
    import torch

    from benchmarks import pairs

    raw, network, variables = pairs.fresh_student(arch, NetworkSpec(arch, 10, mean=(0.5,) * 3, std=(0.25,) * 3))
    seen = {}
    for name in stage_names:
        getattr(raw, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.detach()))
    images = np.random.default_rng(1).uniform(size=(4, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        raw.eval()(torch.from_numpy((images.transpose(0, 3, 1, 2) - 0.5) / 0.25))
    output, _ = jax.jit(lambda v, x: network.apply(v, x, train=False))(variables, images)
    assert len(output.stages) == len(stage_names)
    for name, stage in zip(stage_names, output.stages):
        expected = seen[name].numpy().transpose(0, 2, 3, 1)
        expected = np.maximum(expected, 0) if after_relu else expected
        np.testing.assert_allclose(np.asarray(stage), expected, rtol=1e-4, atol=1e-4, err_msg=name)


# ----------------------------------------------------------------------------------- conditional BatchNorm

def test_conditional_batchnorm_is_plain_normalisation_then_per_class_scale_and_shift():
    from dfkd_jax.models.layers import ConditionalBatchNorm

    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 3.0, size=(6, 4, 4, 5)).astype(np.float32)
    labels = np.int32([0, 2, 2, 1, 0, 2])
    layer = ConditionalBatchNorm(5, 3, epsilon=1e-3)
    scale = rng.normal(size=(3, 5)).astype(np.float32)
    bias = rng.normal(size=(3, 5)).astype(np.float32)
    layer.scale[...], layer.bias[...] = scale, bias
    y = np.asarray(layer(jnp.asarray(x), jnp.asarray(labels), train=True))
    # float64 by hand: batch statistics over (N, H, W), biased variance, eps 1e-3, then γ[y], β[y] per sample.
    x64 = x.astype(np.float64)
    normalised = (x64 - x64.mean((0, 1, 2))) / np.sqrt(x64.var((0, 1, 2)) + 1e-3)
    expected = normalised * scale[labels][:, None, None, :] + bias[labels][:, None, None, :]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    # The running statistics move as an affine-free PyTorch BatchNorm's do (momentum 0.1, unbiased variance).
    count = 6 * 4 * 4
    np.testing.assert_allclose(np.asarray(layer.norm.var[...]), 0.9 + 0.1 * x64.var((0, 1, 2)) * count / (count - 1),
                               rtol=1e-5)


@pytest.mark.parametrize("kind", ["conditional_dcgan", "cpsc"])
def test_conditional_generators_follow_the_labels_and_train_only_the_rows_they_use(kind):
    from dfkd_jax.models.generators import Generator

    generator, variables = Generator.create(kind, 0, num_classes=5, nz=8, ngf=4, image_size=16)
    # Conditional BN tables start at γ = 1, β = 0 for every class (then all classes look alike): randomise them.
    rng = np.random.default_rng(1)
    pure = jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(1.0, 0.5, x.shape), x.dtype) if x.ndim == 2 and x.shape[0] == 5 else x,
        nnx.to_pure_dict(variables["params"]))
    nnx.replace_by_pure_dict(variables["params"], pure)
    z = jnp.asarray(np.random.default_rng(0).normal(size=(6, 8)), jnp.float32)
    labels = jnp.int32([0, 0, 1, 1, 3, 3])
    images, _ = generator.apply(variables, z, labels, train=True)
    assert images.shape == (6, 16, 16, 3)
    other, _ = generator.apply(variables, z, jnp.int32([2, 2, 1, 1, 3, 3]), train=True)
    assert not np.allclose(np.asarray(images[:2]), np.asarray(other[:2]))  # another label, another image
    with pytest.raises(ValueError, match="class-conditional"):
        generator.apply(variables, z, train=True)

    grads = jax.grad(lambda p: jnp.sum(generator.apply({"params": p, "batch_stats": variables["batch_stats"]},
                                                       z, labels, train=True)[0] ** 2))(variables["params"])
    tables = [np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads))
              if any(getattr(p, "key", None) in ("embedding", "scale", "bias") for p in path[-1:])
              and np.ndim(leaf) == 2 and np.shape(leaf)[0] == 5]
    assert tables, "no per-class table found"
    for table in tables:  # rows of labels 2 and 4 were not used: no gradient reaches them
        assert np.all(table[[2, 4]] == 0) and np.any(table[[0, 1, 3]] != 0)


# ---------------------------------------------------------------------------------------------- initialisation

def _std_and_bound(variables, name):
    leaves = dict((".".join(map(str, path)), np.asarray(v[...])) for path, v in nnx.to_flat_state(variables["params"]))
    return leaves[name]


@pytest.mark.parametrize("arch, options, expect", [
    # (leaf, what the layout's PyTorch code draws it from), worked out from each code's init call:
    # akamaster `_weights_init`: kaiming_normal_(w) on convs and the Linear -> N(0, 2 / fan_in).
    ("resnet20", {"shortcut": "A"}, {"layer3.0.conv1.kernel": ("normal", (2 / (9 * 32)) ** 0.5),
                                     "linear.kernel": ("normal", (2 / 64) ** 0.5)}),
    # chenyaofo: kaiming_normal_(w, mode="fan_out") on convs; the Linear at PyTorch's default U(±1/sqrt(fan_in)).
    ("resnet20", {"shortcut": "B"}, {"layer3.0.conv1.kernel": ("normal", (2 / (9 * 64)) ** 0.5),
                                     "linear.kernel": ("uniform", 1 / 64 ** 0.5)}),
    # CMI's resnet18/34 have no init code: PyTorch's default U(±1/sqrt(fan_in)) everywhere.
    ("resnet18", {}, {"layer4.0.conv1.kernel": ("uniform", 1 / (9 * 256) ** 0.5),
                      "linear.kernel": ("uniform", 1 / 512 ** 0.5)}),
    # ZSKT's WRN: normal_(0, sqrt(2 / (k·k·out))) convs, the fc bias zeroed.
    ("wrn_16_2", {}, {"block3.layer.0.conv1.kernel": ("normal", (2 / (9 * 128)) ** 0.5), "fc.bias": ("zero", 0)}),
    # RepDistiller's VGG: normal_(0, sqrt(2 / (k·k·out))) convs with zero bias; Linear N(0, 0.01), bias 0.
    ("vgg8_bn", {}, {"block3.0.kernel": ("normal", (2 / (9 * 512)) ** 0.5), "block3.0.bias": ("zero", 0),
                     "classifier.kernel": ("normal", 0.01), "classifier.bias": ("zero", 0)}),
])
def test_each_family_is_initialised_as_its_pytorch_layout_s_code_does(arch, options, expect):
    network, variables = Network.create(NetworkSpec(arch, 100, options), seed=3)
    for name, (kind, scale) in expect.items():
        values = _std_and_bound(variables, name).ravel()
        if kind == "zero":
            assert np.all(values == 0), name
        elif kind == "normal":  # sample std within 3% (tensors of 40k+ values), unbounded tails
            assert abs(values.std() / scale - 1) < 0.03 and abs(values.mean()) < 0.05 * scale, name
            assert np.abs(values).max() > 2.5 * scale, f"{name}: looks truncated or uniform"
        else:  # uniform on [-scale, scale]: std scale/√3, never beyond the bound
            assert np.abs(values).max() <= scale and abs(values.std() / (scale / 3 ** 0.5) - 1) < 0.03, name
    # The old single scheme stays reachable: kaiming fan-out convs everywhere (config.student.init).
    _, legacy = Network.create(NetworkSpec(arch, 100, options), seed=3, init="kaiming_fan_out")
    conv = next(name for name in expect if "conv" in name or name.startswith("block"))
    fan_out = 9 * _std_and_bound(legacy, conv).shape[-1]
    assert abs(_std_and_bound(legacy, conv).std() / (2 / fan_out) ** 0.5 - 1) < 0.03
