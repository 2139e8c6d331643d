"""The synthetic pool: a fixed-capacity, device-resident ring buffer of images in [0, 1] with, per image, the label it
was synthesised for and a group id (the latent or embedding draw several views of one image share).

Upstream (CMI / Fast / NAYER) writes every kept batch to disk as PNG files and rebuilds a data loader each round.
Here the pool is arrays sharded over the mesh's `data` axis, written and sampled inside jitted steps, and saved with
the training checkpoints. Images are clipped to [0, 1] on the way in; `uint8` storage then reproduces upstream's
8-bit files exactly (they truncate `clip(x, 0, 1) * 255`), `float32` keeps full precision. Entries written without
a label or group hold -1 there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# {"images": (capacity, H, W, C), "labels": (capacity,) int32, "groups": (capacity,) int32, "count": () int32,
#  "next": () int32, "order": (capacity,) int32, "cursor": () int32}; every leaf with a capacity axis is
# batch-sharded (methods declare "pool" as such). `order` and `cursor` serve `sample_shuffled`.
Pool = dict

DTYPES = {"uint8": jnp.uint8, "float32": jnp.float32}
SAMPLING = ("uniform", "shuffled", "label_pairs")


def create(capacity: int, image_shape: tuple[int, int, int], dtype: str = "uint8") -> Pool:
    if dtype not in DTYPES:
        raise ValueError(f"pool dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if capacity < 1:
        raise ValueError(f"pool capacity must be positive, got {capacity}")
    return {"images": jnp.zeros((capacity, *image_shape), DTYPES[dtype]),
            "labels": jnp.full((capacity,), -1, jnp.int32), "groups": jnp.full((capacity,), -1, jnp.int32),
            "count": jnp.zeros((), jnp.int32), "next": jnp.zeros((), jnp.int32),
            "order": jnp.arange(capacity, dtype=jnp.int32), "cursor": jnp.full((), _RESHUFFLE, jnp.int32)}


_RESHUFFLE = 2 ** 30  # a cursor past any pool: the next shuffled draw starts a new order


def _store(images: jax.Array, dtype) -> jax.Array:
    images = jnp.clip(images, 0.0, 1.0)
    if dtype == jnp.uint8:
        return jnp.floor(images * 255.0).astype(jnp.uint8)  # upstream: (x.clamp(0, 1) * 255).astype('uint8')
    return images.astype(dtype)


def _load(stored: jax.Array) -> jax.Array:
    if stored.dtype == jnp.uint8:
        return stored.astype(jnp.float32) / 255.0
    return stored.astype(jnp.float32)


def add(pool: Pool, images_bhwc: jax.Array, labels_b: jax.Array | None = None,
        groups_b: jax.Array | None = None) -> Pool:
    """Write a batch (and its labels and group ids) after the newest entry, overwriting the oldest once full."""
    capacity = pool["images"].shape[0]
    batch = images_bhwc.shape[0]
    if batch > capacity:
        raise ValueError(f"a batch of {batch} does not fit a pool of capacity {capacity}")
    slots = (pool["next"] + jnp.arange(batch)) % capacity
    missing = jnp.full((batch,), -1, jnp.int32)
    labels = missing if labels_b is None else jnp.asarray(labels_b, jnp.int32)
    groups = missing if groups_b is None else jnp.asarray(groups_b, jnp.int32)
    # A new batch restarts the shuffled order, as upstream rebuilds its data loader after every round.
    return pool | {"images": pool["images"].at[slots].set(_store(images_bhwc, pool["images"].dtype)),
                   "labels": pool["labels"].at[slots].set(labels), "groups": pool["groups"].at[slots].set(groups),
                   "count": jnp.minimum(pool["count"] + batch, capacity), "next": (pool["next"] + batch) % capacity,
                   "cursor": jnp.full((), _RESHUFFLE, jnp.int32)}


def _gather(pool: Pool, indices: jax.Array) -> dict:
    return {"images": _load(pool["images"][indices]), "labels": pool["labels"][indices],
            "groups": pool["groups"][indices], "indices": indices}


def sample(pool: Pool, key: jax.Array, batch: int) -> dict:
    """{"images" (float32 in [0, 1]), "labels", "groups", "indices"}: `batch` entries drawn uniformly with
    replacement from the filled part.

    Upstream shuffles the pool without replacement once per data-loader pass; with replacement keeps one compiled
    shape whatever the fill level. Sampling an empty pool returns slot 0 (zeros): callers start distilling only
    after the first synthesis round.
    """
    indices = jax.random.randint(key, (batch,), 0, jnp.maximum(pool["count"], 1))
    return _gather(pool, indices)


def sample_shuffled(pool: Pool, key: jax.Array, batch: int) -> tuple[dict, Pool]:
    """Like `sample`, but without replacement, as upstream's `DataLoader(pool, shuffle=True)`: the filled entries in
    a random order, `batch` at a time; when fewer than `batch` are left, a new order (upstream would yield that short
    batch first: dropped here to keep one compiled shape). `add` restarts the order, as upstream rebuilds its loader
    after every round. A pool smaller than a batch repeats its order within the batch. Returns (batch, pool)."""
    capacity = pool["order"].shape[0]
    count = jnp.maximum(pool["count"], 1)
    filled = jnp.arange(capacity) < pool["count"]
    exhausted = pool["cursor"] + batch > count
    fresh_order = jnp.argsort(jnp.where(filled, jax.random.uniform(key, (capacity,)), 2.0)).astype(jnp.int32)
    order = jnp.where(exhausted, fresh_order, pool["order"])
    cursor = jnp.where(exhausted, 0, pool["cursor"])
    indices = order[(cursor + jnp.arange(batch)) % count]
    return _gather(pool, indices), pool | {"order": order, "cursor": cursor + batch}


def sample_label_pairs(pool: Pool, key: jax.Array, batch: int, num_classes: int) -> dict:
    """Like `sample`, but every label in the batch appears at least twice, so that a supervised contrastive loss
    has a positive for every anchor however many classes there are: `batch / 2` anchors drawn uniformly, each
    followed by a partner drawn uniformly among the pool's entries with the anchor's label (the anchor itself when
    it is the only one). Rows 2i and 2i+1 are a pair. Entries without a label (-1) are paired among themselves.

    Per step this sorts the pool's labels (capacity log capacity on int32s), not its images.
    """
    if batch % 2:
        raise ValueError(f"label-pair sampling needs an even batch, got {batch}")
    anchor_key, partner_key = jax.random.split(key)
    filled = jnp.arange(pool["labels"].shape[0]) < pool["count"]
    # Unlabelled entries sort as class `num_classes`, empty slots last: each class is one run of `order`.
    sort_labels = jnp.where(filled, jnp.where(pool["labels"] < 0, num_classes, pool["labels"]), num_classes + 1)
    order = jnp.argsort(sort_labels, stable=True)
    counts = jnp.bincount(sort_labels, length=num_classes + 2)
    starts = jnp.cumsum(counts) - counts
    anchors = jax.random.randint(anchor_key, (batch // 2,), 0, jnp.maximum(pool["count"], 1))
    anchor_class = sort_labels[anchors]
    offsets = jnp.floor(jax.random.uniform(partner_key, (batch // 2,)) * counts[anchor_class]).astype(jnp.int32)
    partners = order[starts[anchor_class] + jnp.minimum(offsets, jnp.maximum(counts[anchor_class] - 1, 0))]
    return _gather(pool, jnp.stack([anchors, partners], axis=1).reshape(batch))


def images(pool: Pool) -> jax.Array:
    """The filled entries, oldest first is not guaranteed after wrap-around (host-side use: grids, export)."""
    return _load(pool["images"][: int(pool["count"])])
