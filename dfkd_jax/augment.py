"""Image augmentations inside jitted steps, on NHWC images in [0, 1].

Each augmentation is a pure function of its random draws (`*_params`) so parity tests can fix them, plus a
convenience wrapper that draws them from a PRNG key.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class CropFlip(NamedTuple):
    offsets_b2: jax.Array  # (B, 2) int32 top-left corner (row, col) in the padded image, in [0, 2·padding]
    flips_b: jax.Array  # (B,) bool: flip horizontally


def crop_flip_params(key: jax.Array, batch: int, padding: int = 4) -> CropFlip:
    offsets_key, flip_key = jax.random.split(key)
    return CropFlip(jax.random.randint(offsets_key, (batch, 2), 0, 2 * padding + 1, jnp.int32),
                    jax.random.bernoulli(flip_key, 0.5, (batch,)))


def crop_flip(images_bhwc: jax.Array, params: CropFlip, padding: int = 4) -> jax.Array:
    """Per-image random crop of the original size from a zero-padded copy, then horizontal flip (torchvision's
    RandomCrop(size, padding) + RandomHorizontalFlip, kornia's on-device equivalents)."""
    b, h, w, c = images_bhwc.shape
    padded = jnp.pad(images_bhwc, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

    def crop_one(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    cropped = jax.vmap(crop_one)(padded, params.offsets_b2)
    return jnp.where(params.flips_b[:, None, None, None], cropped[:, :, ::-1, :], cropped)


def random_crop_flip(images_bhwc: jax.Array, key: jax.Array, padding: int = 4) -> jax.Array:
    return crop_flip(images_bhwc, crop_flip_params(key, images_bhwc.shape[0], padding), padding)


class JitterFlip(NamedTuple):
    shift_2: jax.Array  # (2,) int32 roll along (rows, cols), in [-limit, limit]
    flip: jax.Array  # () bool


def jitter_flip_params(key: jax.Array, limit: int = 4) -> JitterFlip:
    shift_key, flip_key = jax.random.split(key)
    return JitterFlip(jax.random.randint(shift_key, (2,), -limit, limit + 1, jnp.int32),
                      jax.random.bernoulli(flip_key, 0.5, ()))


def jitter_flip(images_bhwc: jax.Array, params: JitterFlip) -> jax.Array:
    """DeepInversion's augmentation: one circular shift and one flip decision for the whole batch."""
    rolled = jnp.roll(images_bhwc, (params.shift_2[0], params.shift_2[1]), axis=(1, 2))
    return jnp.where(params.flip, rolled[:, :, ::-1, :], rolled)


def random_jitter_flip(images_bhwc: jax.Array, key: jax.Array, limit: int = 4) -> jax.Array:
    return jitter_flip(images_bhwc, jitter_flip_params(key, limit))
