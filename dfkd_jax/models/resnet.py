"""CIFAR ResNets: He et al.'s resnet20..110 (shortcut option A or B) and the DFKD zoo's resnet18/34.

Attribute names mirror the PyTorch checkpoints (`conv1`, `bn1`, `layer{k}.{i}.conv1`, `shortcut.{0,1}`, `linear`),
so conversion is a rename of leaves only. chenyaofo's option-B checkpoints name the projection `downsample` and the
head `fc`; the converter aliases those keys (see `dfkd_jax.convert`).
"""

from __future__ import annotations

from typing import Literal, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dfkd_jax.models.layers import INITS, BatchNorm, Init, conv1x1, conv3x3, global_avg_pool, linear

Shortcut = Literal["A", "B"]


class BasicBlock(nnx.Module):
    """conv3x3 → BN → ReLU → conv3x3 → BN, plus shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: Shortcut, *, init: Init, rngs: nnx.Rngs):
        self.conv1 = conv3x3(in_planes, planes, stride=stride, init=init, rngs=rngs)
        self.bn1 = BatchNorm(planes)
        self.conv2 = conv3x3(planes, planes, init=init, rngs=rngs)
        self.bn2 = BatchNorm(planes)
        reshapes = stride != 1 or in_planes != planes
        # Option A (akamaster): parameter-free subsample + zero-pad of planes//4 channels on each side.
        self.zero_pad = planes // 4 if reshapes and shortcut == "A" else 0
        self.shortcut = (nnx.List([conv1x1(in_planes, planes, stride=stride, init=init, rngs=rngs),
                                   BatchNorm(planes)])
                         if reshapes and shortcut == "B" else None)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x), train=train))
        out = self.bn2(self.conv2(out), train=train)
        return jax.nn.relu(out + self._shortcut(x, train))

    def _shortcut(self, x: jax.Array, train: bool) -> jax.Array:
        if self.shortcut is not None:
            conv, bn = self.shortcut
            return bn(conv(x), train=train)
        if self.zero_pad:
            pad = self.zero_pad
            return jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (pad, pad)))
        return x


class CifarResNet(nnx.Module):
    """3×3 stem (no max-pool) → stages of BasicBlocks (stride 2 from the second stage) → global pool → linear."""

    def __init__(self, blocks_per_stage: Sequence[int], widths: Sequence[int], num_classes: int,
                 shortcut: Shortcut, *, init: Init, rngs: nnx.Rngs):
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        self.conv1 = conv3x3(3, widths[0], init=init, rngs=rngs)
        self.bn1 = BatchNorm(widths[0])
        in_planes = widths[0]
        for stage, (num_blocks, planes) in enumerate(zip(blocks_per_stage, widths)):
            blocks = []
            for i in range(num_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride, shortcut, init=init, rngs=rngs))
                in_planes = planes
            setattr(self, f"layer{stage + 1}", nnx.List(blocks))
        self.num_stages = len(widths)
        self.linear = linear(in_planes, num_classes, init=init, rngs=rngs)

    def __call__(self, x_bhwc: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array, tuple]:
        """(logits, penultimate features, the output of each stage `layer{k}`)."""
        out = jax.nn.relu(self.bn1(self.conv1(x_bhwc), train=train))
        stages = []
        for stage in range(1, self.num_stages + 1):
            for block in getattr(self, f"layer{stage}"):
                out = block(out, train=train)
            stages.append(out)
        features = global_avg_pool(out)
        return self.linear(features), features, tuple(stages)


def he_resnet(depth: int, num_classes: int, *, shortcut: Shortcut = "A", init: Init | None = None,
              rngs: nnx.Rngs) -> CifarResNet:
    """He et al. (2016) CIFAR ResNet of depth 6n+2, widths 16/32/64. Initialised as the layout's own code does:
    akamaster's (shortcut A) kaiming_normal_ fan-in on convs and the Linear, chenyaofo's (B) fan-out convs."""
    if (depth - 2) % 6:
        raise ValueError(f"He CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    init = init or INITS["kaiming_fan_in" if shortcut == "A" else "kaiming_fan_out"]
    return CifarResNet((n, n, n), (16, 32, 64), num_classes, shortcut, init=init, rngs=rngs)


def resnet18(num_classes: int, *, init: Init | None = None, rngs: nnx.Rngs) -> CifarResNet:
    """CMI's ResNet-18 for CIFAR, with PyTorch's default initialisation (its code has no other)."""
    return CifarResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, "B", init=init or INITS["torch_default"],
                       rngs=rngs)


def resnet34(num_classes: int, *, init: Init | None = None, rngs: nnx.Rngs) -> CifarResNet:
    return CifarResNet((3, 4, 6, 3), (64, 128, 256, 512), num_classes, "B", init=init or INITS["torch_default"],
                       rngs=rngs)
