"""Supervised training of a zoo network on labelled arrays: how the project makes its own teachers (and real-data
baselines) where no pretrained checkpoint is at hand.

The recipe is the CIFAR one: SGD with momentum and PyTorch-style (coupled) weight decay, cosine learning rate over all
steps, cross-entropy, random crop from a zero-padded copy (+ horizontal flip, unless `flip=False`, as for digits).
"""

from __future__ import annotations

import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from dfkd_jax import augment as augmentations
from dfkd_jax import parallel
from dfkd_jax.data.sources import ArraySource
from dfkd_jax.models import Network, NetworkSpec, Variables

# The initialiser (nnx.Rngs(seed)) draws fold_in(key(seed), n) for n = 0, 1, ...: augmentation keys branch off a
# count it never reaches (split(key)[1] would equal its second draw).
AUGMENT_STREAM = 2**31 - 1


# --- optimizer -----------------------------------------------------------------------------------------------------

def make_optimizer(learning_rate: float, momentum: float, weight_decay: float, total_steps: int
                   ) -> optax.GradientTransformation:
    """Weight decay added to the gradient before momentum, as torch.optim.SGD(weight_decay=...) does."""
    schedule = optax.cosine_decay_schedule(learning_rate, decay_steps=total_steps)
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=momentum))


# --- step ----------------------------------------------------------------------------------------------------------

def augment_batch(images_bhwc: jax.Array, key: jax.Array, padding: int, flip: bool) -> jax.Array:
    """Random crop from a zero-padded copy; horizontal flips only when `flip` (a flipped digit is another glyph)."""
    draws = augmentations.crop_flip_params(key, images_bhwc.shape[0], padding)
    if not flip:
        draws = draws._replace(flips_b=jnp.zeros_like(draws.flips_b))
    return augmentations.crop_flip(images_bhwc, draws, padding)


def make_train_step(network: Network, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh, *,
                    padding: int, augment: bool, flip: bool) -> Callable:
    """(state, images uint8 (B,H,W,3), labels (B,), key) -> (state, {"loss", "accuracy"}), jitted over the mesh.

    state = {"params", "batch_stats", "opt"} is replicated and donated; the batch is sharded on `data`, so BatchNorm
    normalises with the statistics of the global batch.
    """
    replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)

    def loss_fn(params, batch_stats, images, labels):
        output, new_batch_stats = network.apply({"params": params, "batch_stats": batch_stats}, images, train=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(output.logits, labels).mean()
        return loss, (output.logits, new_batch_stats)

    def train_step(state, images_u8, labels, key):
        images = images_u8.astype(jnp.float32) / 255.0
        if augment:
            images = augment_batch(images, key, padding, flip)
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["batch_stats"], images, labels)
        updates, opt = optimizer.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        accuracy = (jnp.argmax(logits, axis=-1) == labels).mean()
        return {"params": params, "batch_stats": batch_stats, "opt": opt}, {"loss": loss, "accuracy": accuracy}

    return jax.jit(train_step, in_shardings=(replicated, sharded, sharded, replicated),
                   out_shardings=replicated, donate_argnums=0)


# --- loop ----------------------------------------------------------------------------------------------------------

def check_inputs(spec: NetworkSpec, train: ArraySource, epochs: int, batch_size: int, global_batch: int) -> None:
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if batch_size < 1 or global_batch > len(train):
        rounded = f" (rounded up to {global_batch}, a multiple of the device count)" * (global_batch > batch_size)
        raise ValueError(f"batch_size {batch_size}{rounded} must lie between 1 and the {len(train)} images of "
                         f"{train.description}; lower it")
    if train.images.dtype != np.uint8 or train.images.ndim != 4 or train.images.shape[-1] != 3:
        raise ValueError(f"{train.description}: images must be uint8 (N, H, W, 3), got "
                         f"{train.images.dtype} {train.images.shape}")
    labels = np.asarray(train.labels)
    if labels.min() < 0 or labels.max() >= spec.num_classes:
        raise ValueError(f"{train.description} has labels in [{int(labels.min())}, {int(labels.max())}] but "
                         f"{spec.arch} has {spec.num_classes} classes; set NetworkSpec.num_classes to match")


def train_classifier(spec: NetworkSpec, train: ArraySource, *, epochs: int, batch_size: int,
                     learning_rate: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4, seed: int = 0,
                     mesh: jax.sharding.Mesh | None = None, augment: bool = True, flip: bool = True,
                     progress: bool = True) -> Variables:
    """Train `spec` from scratch on `train`; returns its variables {"params", "batch_stats"}.

    An epoch is one pass over a fresh permutation of the training set, dropping the last incomplete batch;
    `batch_size` is the global batch, rounded up to a multiple of the device count. Deterministic for a given seed
    and device count. Pass flip=False for data whose mirror image is another class (digits, text).
    """
    mesh = mesh or parallel.make_data_mesh()
    global_batch = parallel.round_up_to_devices(batch_size, mesh)
    check_inputs(spec, train, epochs, batch_size, global_batch)
    steps_per_epoch = len(train) // global_batch
    padding = max(1, train.images.shape[1] // 8)  # 4 for 32×32 (the CIFAR recipe), 2 for 16×16

    network, variables = Network.create(spec, seed)
    optimizer = make_optimizer(learning_rate, momentum, weight_decay, epochs * steps_per_epoch)
    state = jax.device_put({**variables, "opt": optimizer.init(variables["params"])}, parallel.replicated(mesh))
    train_step = make_train_step(network, optimizer, mesh, padding=padding, augment=augment, flip=flip)

    order_rng = np.random.default_rng(seed)
    step_key = jax.random.fold_in(jax.random.key(seed), AUGMENT_STREAM)
    rows = parallel.host_local_slice(global_batch)
    bar = tqdm(total=epochs * steps_per_epoch, desc="train", unit="step", disable=not progress, file=sys.stderr)
    for epoch in range(epochs):
        order = order_rng.permutation(len(train))
        bar.set_description(f"train epoch {epoch + 1}/{epochs}")
        totals = {"loss": 0.0, "accuracy": 0.0}
        for step in range(steps_per_epoch):
            images, labels = train.read(order[step * global_batch:(step + 1) * global_batch][rows])
            key = jax.random.fold_in(step_key, epoch * steps_per_epoch + step)
            state, metrics = train_step(state, parallel.shard_host_batch(images, mesh),
                                        parallel.shard_host_batch(labels, mesh), key)
            totals = jax.tree.map(jnp.add, totals, metrics)  # stays on device: no sync per step
            bar.update()
        if progress:  # the finished epoch's means; reading them is the loop's only sync
            means = {name: float(total) / steps_per_epoch for name, total in totals.items()}
            bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{100 * means['accuracy']:.1f}%")
    bar.close()
    return {"params": state["params"], "batch_stats": state["batch_stats"]}
