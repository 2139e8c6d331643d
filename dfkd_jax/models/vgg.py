"""VGG with BatchNorm as in RepDistiller and the CMI zoo (vgg8_bn, vgg11_bn).

Each `block{k}` mirrors PyTorch's `nn.Sequential` of [conv, BN, ReLU, conv, BN, ...] (the block's last ReLU is applied
outside), so checkpoint index `block2.3` is the second conv of block 2 here too.
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from dfkd_jax.models.layers import INITS, BatchNorm, Init, conv3x3, global_avg_pool, linear, max_pool_2x2

VGG8_WIDTHS = ((64,), (128,), (256,), (512,), (512,))
VGG11_WIDTHS = ((64,), (128,), (256, 256), (512, 512), (512, 512))


def _block(in_channels: int, widths: Sequence[int], init: Init, rngs: nnx.Rngs) -> nnx.List:
    layers = []
    for width in widths:
        layers += [conv3x3(in_channels, width, use_bias=True, init=init, rngs=rngs), BatchNorm(width), jax.nn.relu]
        in_channels = width
    return nnx.List(layers[:-1])


class VGG(nnx.Module):
    def __init__(self, block_widths: Sequence[Sequence[int]], num_classes: int, *, init: Init | None = None,
                 rngs: nnx.Rngs):
        init = init or INITS["vgg"]  # RepDistiller's `_initialize_weights`
        in_channels = 3
        for k, widths in enumerate(block_widths):
            setattr(self, f"block{k}", _block(in_channels, widths, init, rngs))
            in_channels = widths[-1]
        self.num_blocks = len(block_widths)
        self.classifier = linear(in_channels, num_classes, init=init, rngs=rngs)

    def __call__(self, x_bhwc: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array, tuple]:
        """(logits, penultimate features, the output of each `block{k}` after its ReLU and before its pool, as
        RepDistiller's VGG returns its feature maps)."""
        input_size = x_bhwc.shape[1]
        out = x_bhwc
        stages = []
        for k in range(self.num_blocks):
            for layer in getattr(self, f"block{k}"):
                out = layer(out, train=train) if isinstance(layer, BatchNorm) else layer(out)
            out = jax.nn.relu(out)
            stages.append(out)
            # Max-pool after blocks 0-2; after block 3 only for 64-pixel inputs (upstream's `if h == 64`).
            if k < 3 or (k == 3 and input_size == 64):
                out = max_pool_2x2(out)
        features = global_avg_pool(out)
        return self.classifier(features), features, tuple(stages)


def vgg8_bn(num_classes: int, *, init: Init | None = None, rngs: nnx.Rngs) -> VGG:
    return VGG(VGG8_WIDTHS, num_classes, init=init, rngs=rngs)


def vgg11_bn(num_classes: int, *, init: Init | None = None, rngs: nnx.Rngs) -> VGG:
    return VGG(VGG11_WIDTHS, num_classes, init=init, rngs=rngs)
