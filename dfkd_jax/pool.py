"""The synthetic pool: a fixed-capacity, device-resident ring buffer of images in [0, 1].

Upstream (CMI / Fast / NAYER) writes every kept batch to disk as PNG files and rebuilds a data loader each round.
Here the pool is one array sharded over the mesh's `data` axis, written and sampled inside jitted steps, and saved
with the training checkpoints. Images are clipped to [0, 1] on the way in; `uint8` storage then reproduces upstream's 8-bit files
exactly (they truncate `clip(x, 0, 1) * 255`), `float32` keeps full precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Pool = dict  # {"images": (capacity, H, W, C), "count": () int32, "next": () int32}

DTYPES = {"uint8": jnp.uint8, "float32": jnp.float32}


def create(capacity: int, image_shape: tuple[int, int, int], dtype: str = "uint8") -> Pool:
    if dtype not in DTYPES:
        raise ValueError(f"pool dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if capacity < 1:
        raise ValueError(f"pool capacity must be positive, got {capacity}")
    return {"images": jnp.zeros((capacity, *image_shape), DTYPES[dtype]),
            "count": jnp.zeros((), jnp.int32), "next": jnp.zeros((), jnp.int32)}


def _store(images: jax.Array, dtype) -> jax.Array:
    images = jnp.clip(images, 0.0, 1.0)
    if dtype == jnp.uint8:
        return jnp.floor(images * 255.0).astype(jnp.uint8)  # upstream: (x.clamp(0, 1) * 255).astype('uint8')
    return images.astype(dtype)


def _load(stored: jax.Array) -> jax.Array:
    if stored.dtype == jnp.uint8:
        return stored.astype(jnp.float32) / 255.0
    return stored.astype(jnp.float32)


def add(pool: Pool, images_bhwc: jax.Array) -> Pool:
    """Write a batch after the newest entry, overwriting the oldest once the pool is full."""
    capacity = pool["images"].shape[0]
    batch = images_bhwc.shape[0]
    if batch > capacity:
        raise ValueError(f"a batch of {batch} does not fit a pool of capacity {capacity}")
    slots = (pool["next"] + jnp.arange(batch)) % capacity
    stored = pool["images"].at[slots].set(_store(images_bhwc, pool["images"].dtype))
    return {"images": stored, "count": jnp.minimum(pool["count"] + batch, capacity),
            "next": (pool["next"] + batch) % capacity}


def sample(pool: Pool, key: jax.Array, batch: int) -> jax.Array:
    """`batch` images drawn uniformly with replacement from the filled part (float32 in [0, 1]).

    Upstream shuffles the pool without replacement once per data-loader pass; with replacement keeps one compiled
    shape whatever the fill level. Sampling an empty pool returns slot 0 (zeros): callers start distilling only
    after the first synthesis round.
    """
    indices = jax.random.randint(key, (batch,), 0, jnp.maximum(pool["count"], 1))
    return _load(pool["images"][indices])


def images(pool: Pool) -> jax.Array:
    """The filled entries, oldest first is not guaranteed after wrap-around (host-side use: grids, export)."""
    return _load(pool["images"][: int(pool["count"])])
