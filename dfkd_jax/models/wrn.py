"""Wide ResNets as in ZSKT and the CMI zoo (pre-activation blocks), e.g. wrn_40_2.

Attribute names mirror the PyTorch checkpoints (`block{k}.layer.{i}.bn1`, `convShortcut`, `fc`).
"""

from __future__ import annotations

import jax
from flax import nnx

from dfkd_jax.models.layers import INITS, BatchNorm, Init, conv1x1, conv3x3, global_avg_pool, linear


class WideBasicBlock(nnx.Module):
    """BN → ReLU → conv3×3(stride) → BN → ReLU → conv3×3, plus the input or a 1×1 projection of the activated
    input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, *, init: Init, rngs: nnx.Rngs):
        self.bn1 = BatchNorm(in_planes)
        self.conv1 = conv3x3(in_planes, out_planes, stride=stride, init=init, rngs=rngs)
        self.bn2 = BatchNorm(out_planes)
        self.conv2 = conv3x3(out_planes, out_planes, init=init, rngs=rngs)
        self.convShortcut = (conv1x1(in_planes, out_planes, stride=stride, init=init, rngs=rngs)
                             if in_planes != out_planes else None)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        activated = jax.nn.relu(self.bn1(x, train=train))
        out = jax.nn.relu(self.bn2(self.conv1(activated), train=train))
        out = self.conv2(out)
        # When the width changes, the pre-activated input feeds both paths (upstream's in-place ReLU).
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return out + shortcut


class NetworkBlock(nnx.Module):
    def __init__(self, num_layers: int, in_planes: int, out_planes: int, stride: int, *, init: Init,
                 rngs: nnx.Rngs):
        self.layer = nnx.List([
            WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, init=init,
                           rngs=rngs)
            for i in range(num_layers)])

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for block in self.layer:
            x = block(x, train=train)
        return x


class WideResNet(nnx.Module):
    def __init__(self, depth: int, widen_factor: int, num_classes: int, *, init: Init | None = None,
                 rngs: nnx.Rngs):
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        init = init or INITS["wrn"]  # ZSKT's: fan-out normal convs, the classifier's bias zeroed
        self.conv1 = conv3x3(3, widths[0], init=init, rngs=rngs)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, init=init, rngs=rngs)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, init=init, rngs=rngs)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, init=init, rngs=rngs)
        self.bn1 = BatchNorm(widths[3])
        self.fc = linear(widths[3], num_classes, init=init, rngs=rngs)

    def __call__(self, x_bhwc: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array, tuple]:
        """(logits, penultimate features, the output of each `block{k}`). The stage outputs are the blocks' raw
        sums, before the final BN + ReLU, as the attention-transfer code takes them from its wide ResNets."""
        stages = []
        out = self.conv1(x_bhwc)
        for block in (self.block1, self.block2, self.block3):
            out = block(out, train=train)
            stages.append(out)
        features = global_avg_pool(jax.nn.relu(self.bn1(out, train=train)))
        return self.fc(features), features, tuple(stages)
