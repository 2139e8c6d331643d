"""A zoo network as pure functions: a static graph definition plus a pytree of variables.

`Network.apply(variables, images, train=...)` returns the logits, the penultimate feature, the input of every
BatchNorm layer (with that layer's running statistics) and the output of every stage from one forward pass, and the
updated batch statistics.
Images are in [0, 1], NHWC; each network normalises with the statistics it was trained with (`NetworkSpec`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dfkd_jax.models import zoo

Variables = dict[str, nnx.State]  # {"params": ..., "batch_stats": ...}

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def default_normalisation(num_classes: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The DFKD zoo's convention: CIFAR-100 statistics for 100 classes, CIFAR-10's otherwise."""
    return (CIFAR100_MEAN, CIFAR100_STD) if num_classes == 100 else (CIFAR10_MEAN, CIFAR10_STD)


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """Everything needed to rebuild a network: architecture, classes, options and input normalisation."""

    arch: str
    num_classes: int
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD

    def __post_init__(self):
        zoo.check_arch(self.arch, self.options)
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != 3:
                raise ValueError(f"{name} needs 3 values (R, G, B), got {list(values)}")
        if min(self.std) <= 0:
            raise ValueError(f"std values must be positive, got {list(self.std)}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def build(self, rngs: nnx.Rngs, init: str = "upstream") -> nnx.Module:
        return zoo.build(self.arch, self.num_classes, rngs=rngs, init=init, **self.options)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "NetworkSpec":
        return cls(arch=data["arch"], num_classes=int(data["num_classes"]), options=dict(data.get("options", {})),
                   mean=tuple(data["mean"]), std=tuple(data["std"]))


class BNInput(NamedTuple):
    """What a BatchNorm layer saw in one forward pass, next to what it expects (its running statistics)."""

    inputs: jax.Array  # (B, H, W, C) or (B, C)
    running_mean: jax.Array  # (C,)
    running_var: jax.Array  # (C,)


class Output(NamedTuple):
    logits: jax.Array  # (B, K)
    features: jax.Array  # (B, D), the classifier's input
    bn_inputs: tuple[BNInput, ...]  # one per BatchNorm layer, in module-path order (the stem's BN first)
    # The output of each residual stage (He ResNet / ResNet `layer{k}`, WRN `block{k}`) or VGG block, (B, H, W, C)
    # each. They are activations the forward pass computes anyway: under jit an unused one costs nothing.
    stages: tuple[jax.Array, ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)
class Network:
    spec: NetworkSpec
    graphdef: nnx.GraphDef

    @classmethod
    def create(cls, spec: NetworkSpec, seed: int = 0, init: str = "upstream") -> tuple["Network", Variables]:
        """A network with freshly initialised variables (as its PyTorch layout's code initialises it)."""
        graphdef, params, batch_stats = nnx.split(spec.build(nnx.Rngs(seed), init), nnx.Param, nnx.BatchStat)
        return cls(spec, graphdef), {"params": params, "batch_stats": batch_stats}

    def init(self, key: jax.Array, init: str = "upstream") -> Variables:
        """Fresh variables from a PRNG key (jittable); `init` as in `zoo.build`."""
        _, params, batch_stats = nnx.split(self.spec.build(nnx.Rngs(params=key), init), nnx.Param, nnx.BatchStat)
        return {"params": params, "batch_stats": batch_stats}

    @classmethod
    def abstract(cls, spec: NetworkSpec) -> tuple["Network", Variables]:
        """The network and the shapes/dtypes of its variables, without allocating them."""
        model = nnx.eval_shape(lambda: spec.build(nnx.Rngs(0)))
        graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        return cls(spec, graphdef), {"params": params, "batch_stats": batch_stats}

    def apply(self, variables: Variables, images: jax.Array, *, train: bool = False) -> tuple[Output, nnx.State]:
        """One forward pass on images in [0, 1] (B, H, W, 3).

        train=True normalises with batch statistics and returns the updated running statistics; train=False uses
        the running statistics and returns them unchanged.
        """
        # copy=True: fresh Variables owned by this trace, so BatchNorm can update them under jax.grad too.
        model = nnx.merge(self.graphdef, variables["params"], variables["batch_stats"], copy=True)
        forward = nnx.capture(model, nnx.Intermediate)  # collects what each BatchNorm sows: its input
        (logits, features, stages), recorded = forward(normalise(images, self.spec.mean, self.spec.std), train=train)
        running = dict(nnx.to_flat_state(variables["batch_stats"]))
        bn_inputs = tuple(
            BNInput(inputs, running[path[:-1] + ("mean",)][...], running[path[:-1] + ("var",)][...])
            for path, variable in nnx.to_flat_state(recorded)
            for inputs in variable.get_value())
        return Output(logits, features, bn_inputs, stages), nnx.state(model, nnx.BatchStat)

    def bn_channels(self, image_shape: tuple[int, int, int]) -> list[int]:
        """Channels of every BatchNorm layer, in the order of `Output.bn_inputs` (shapes only, no compute)."""
        _, abstract = Network.abstract(self.spec)
        images = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
        output = jax.eval_shape(lambda variables, x: self.apply(variables, x)[0], abstract, images)
        return [bn_input.inputs.shape[-1] for bn_input in output.bn_inputs]


def normalise(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"images must be floats in [0, 1], got dtype {images.dtype} (divide uint8 pixels by 255)")
    mean_c = jnp.asarray(mean, jnp.float32)
    std_c = jnp.asarray(std, jnp.float32)
    return ((images.astype(jnp.float32) - mean_c) / std_c).astype(images.dtype)


def count_params(params: nnx.State) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))
