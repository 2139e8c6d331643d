"""Layers shared by the model zoo, with PyTorch's semantics so converted teachers behave identically."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dfkd_jax.models.conv import Conv

# kaiming_normal_(mode='fan_out', nonlinearity='relu'), the same as normal_(0, sqrt(2 / (k·k·out_channels))).
kaiming_normal_fan_out = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# kaiming_normal_() with its defaults: fan_in, gain √2.
kaiming_normal_fan_in = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# PyTorch's Conv2d / Linear default, kaiming_uniform_(a=√5): U(±1/sqrt(fan_in)).
torch_default = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class Init:
    """How a network's layers start. A data-free student is trained from scratch, so its initialisation is part of a
    method's behaviour: each family follows the code of the PyTorch layout it mirrors (`INITS`, `FAMILY_INIT` in
    zoo.py). A bias init of None is PyTorch's default, U(±1/sqrt(fan_in)); BatchNorm always starts at (1, 0)."""

    conv_kernel: Callable
    linear_kernel: Callable
    conv_bias: Callable | None = None
    linear_bias: Callable | None = None


INITS = {
    # akamaster's He ResNets: `_weights_init` runs kaiming_normal_(m.weight) on every Conv2d and Linear.
    "kaiming_fan_in": Init(kaiming_normal_fan_in, kaiming_normal_fan_in),
    # chenyaofo's He ResNets: kaiming_normal_(fan_out, relu) on convs, the Linear left at PyTorch's default. This
    # project used it for every family before (config.student.init = "kaiming_fan_out" restores that).
    "kaiming_fan_out": Init(kaiming_normal_fan_out, torch_default),
    # CMI / Fast / NAYER's resnet18/34: no init code at all.
    "torch_default": Init(torch_default, torch_default),
    # ZSKT's WideResNet (CMI's wresnet.py): normal_(0, sqrt(2/n)) convs, the Linear's bias zeroed.
    "wrn": Init(kaiming_normal_fan_out, torch_default, linear_bias=jax.nn.initializers.zeros),
    # RepDistiller's VGG (`_initialize_weights`): normal_(0, sqrt(2/n)) convs with zero bias, Linear N(0, 0.01) and 0.
    "vgg": Init(kaiming_normal_fan_out, jax.nn.initializers.normal(0.01), conv_bias=jax.nn.initializers.zeros,
                linear_bias=jax.nn.initializers.zeros),
}


def conv3x3(in_channels: int, out_channels: int, *, stride: int = 1, use_bias: bool = False, init: Init,
            rngs: nnx.Rngs) -> Conv:
    # Explicit (1, 1) padding: 'SAME' pads stride-2 convs asymmetrically, unlike PyTorch's padding=1.
    return Conv(in_channels, out_channels, 3, stride=stride, padding=1, use_bias=use_bias,
                kernel_init=init.conv_kernel,
                bias_init=init.conv_bias or symmetric_uniform(1.0 / (9 * in_channels) ** 0.5), rngs=rngs)


def conv1x1(in_channels: int, out_channels: int, *, stride: int = 1, init: Init, rngs: nnx.Rngs) -> Conv:
    return Conv(in_channels, out_channels, 1, stride=stride, kernel_init=init.conv_kernel, rngs=rngs)


def symmetric_uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def linear(in_features: int, out_features: int, *, init: Init, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, kernel_init=init.linear_kernel,
                      bias_init=init.linear_bias or symmetric_uniform(1.0 / in_features ** 0.5), rngs=rngs)


def global_avg_pool(x_bhwc: jax.Array) -> jax.Array:
    return x_bhwc.mean(axis=(1, 2))


def max_pool_2x2(x_bhwc: jax.Array) -> jax.Array:
    return nnx.max_pool(x_bhwc, (2, 2), strides=(2, 2))


class BatchNorm(nnx.Module):
    """BatchNorm over the last axis with PyTorch's semantics.

    Differs from `nnx.BatchNorm` in one place that matters for fidelity: the running variance is updated with the
    *unbiased* batch variance, as PyTorch does, so a student trained here keeps the same running statistics as one
    trained upstream. `momentum` is PyTorch's (the weight of the new batch). Every call records its input as an
    `nnx.Intermediate` named `inputs`; `dfkd_jax.models.Network.apply` collects them for BN-statistics losses.
    """

    def __init__(self, num_features: int, *, momentum: float = 0.1, epsilon: float = 1e-5, affine: bool = True):
        self.num_features = num_features
        self.momentum = momentum
        self.epsilon = epsilon
        self.affine = affine
        if affine:
            self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
            self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        self.sow(nnx.Intermediate, "inputs", x)
        scale = self.scale[...] if self.affine else jnp.ones((self.num_features,), jnp.float32)
        bias = self.bias[...] if self.affine else jnp.zeros((self.num_features,), jnp.float32)
        if train:
            y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
            count = x.size // x.shape[-1]
            m = self.momentum
            self.mean[...] = (1 - m) * self.mean[...] + m * mean
            self.var[...] = (1 - m) * self.var[...] + m * var * (count / max(count - 1, 1))
            return y
        y = (x - self.mean[...]) * jax.lax.rsqrt(self.var[...] + self.epsilon) * scale + bias
        return y.astype(x.dtype)


class ConditionalBatchNorm(nnx.Module):
    """Class-conditional BatchNorm: BatchNorm without affine parameters, then a per-class scale and shift,
    y = γ[label] · BN(x) + β[label], from K×C tables initialised to 1 and 0 (CPSC-DFKD's "category feature
    embedding"; a conditional generator passes the labels it draws for, one per sample)."""

    def __init__(self, num_features: int, num_classes: int, *, momentum: float = 0.1, epsilon: float = 1e-5):
        self.norm = BatchNorm(num_features, momentum=momentum, epsilon=epsilon, affine=False)
        self.scale = nnx.Param(jnp.ones((num_classes, num_features), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_classes, num_features), jnp.float32))

    def __call__(self, x: jax.Array, labels: jax.Array, *, train: bool) -> jax.Array:
        normalised = self.norm(x, train=train)
        per_sample = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)  # (B, 1, 1, C) or (B, C)
        scale = self.scale[...][labels].reshape(per_sample)
        bias = self.bias[...][labels].reshape(per_sample)
        return (normalised * scale + bias).astype(x.dtype)


def batch_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance over every axis but the last (channels), in float32."""
    x = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    var = jnp.square(x - mean).mean(axes)
    return mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array,
                     epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode BatchNorm over the last axis: (y, batch mean, biased batch variance).

    The gradient is the textbook closed form, one pass over x and the output gradient with two per-channel sums.
    XLA's autodiff of the two-pass moments takes several passes more: resnet20's BN + ReLU layers at batch 256
    (32×32×16, 16×16×32, 8×8×64) take 52 / 33 / 11 ms forward + backward that way, 27 / 14 / 4 ms this way
    (PyTorch 14 / 14 / 8), at the same float32 accuracy against float64 (3e-7).
    """
    return _batch_norm_train_forward(x, scale, bias, epsilon)[0]


def _batch_norm_train_forward(x, scale, bias, epsilon):
    mean, var = batch_moments(x)
    inv_std = jax.lax.rsqrt(var + epsilon)
    y = ((x.astype(jnp.float32) - mean) * (inv_std * scale) + bias).astype(x.dtype)
    return (y, mean, var), (x, mean, inv_std, scale)


def _batch_norm_train_backward(epsilon, residuals, cotangents):
    x, mean, inv_std, scale = residuals
    dy, dmean, dvar = (c.astype(jnp.float32) for c in cotangents)
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    centred = x.astype(jnp.float32) - mean
    normalised = centred * inv_std
    dbias = dy.sum(axes)
    dscale = (dy * normalised).sum(axes)
    # Through y (mean and variance depend on x too), then through the returned mean and variance themselves.
    dx = (scale * inv_std) * (dy - (dbias + normalised * dscale) / count) + (dmean + 2 * dvar * centred) / count
    return dx.astype(x.dtype), dscale, dbias


batch_norm_train.defvjp(_batch_norm_train_forward, _batch_norm_train_backward)
