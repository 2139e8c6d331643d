"""What a DFKD method is to the trainer: how it makes synthetic images, what the student trains on, and how.

An epoch is `plan(epoch).cycles` × (one call of `synthesize`, then `plan(epoch).kd_steps` student steps). NAYER and
DeepInversion synthesise once per epoch then distil from the pool; DAFL/DFAD alternate one generator step with a
few student steps on fresh generator samples. Every hot function a method defines is a pure jitted function of the
whole train state (donated) and returns the new state and a flat dict of measurements.

The train state is a dict:
    student, student_opt   the student's variables and optimizer state (exported as `student/` at the end)
    extras, extras_opt     trainable parameters the method keeps beside the student (a projection head, an
                           adapter) and their optimizer state: checkpointed, never exported
    synth                  the method's own state (generators, pools, memory banks), from `init`
    rng, epoch, kd_step    PRNG key and counters

A method declares which leaves of `synth` carry a batch axis first (`batch_sharded`), its own config ranges
(`CONFIG_RULES`), and may replace the student step (`make_student_step`) or only its loss (`student_loss`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dfkd_jax import augment, distill, losses, parallel, pool
from dfkd_jax.models import Network, Output

State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    cycles: int  # synthesis → distillation cycles in this epoch
    kd_steps: int  # student steps after each synthesis (0 during warm-up)
    synthesis_steps: int  # generator/pixel steps per cycle (for progress and budget accounting)
    synthesis_batch: int  # images per synthesis step


class Method:
    """Base class: subclasses set `name` and implement `init`, `plan`, `synthesize` and `student_batch`."""

    name = "method"
    # Subtrees of `state["synth"]` whose leaves have a batch (or pool-capacity) axis first: sharded on `data`.
    # Everything else is replicated; tests/test_engine.py fails for a batch-leading leaf left out here.
    batch_sharded: tuple[str, ...] = ()
    # Ranges of this method's own config fields, checked with the shared ones before anything is written
    # (`dfkd_jax.validate`): {"synthesis.g_steps": validate.integer(1), ...}.
    CONFIG_RULES: dict = {}

    def __init__(self, config: ml_collections.ConfigDict, teacher: Network, student: Network,
                 mesh: jax.sharding.Mesh):
        self.config = config
        self.teacher = teacher
        self.student = student
        self.mesh = mesh
        self.num_classes = teacher.spec.num_classes
        self.image_shape = tuple(config.data.image_shape)

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        """Relations between this method's fields that CONFIG_RULES cannot state; raise a validate.ConfigError.
        Called with the range checks, before anything is written."""

    # ------------------------------------------------------------------------------------------ to implement
    def init(self, key: jax.Array) -> dict:
        """The method's part of the train state (`state["synth"]`)."""
        raise NotImplementedError

    def plan(self, epoch: int) -> EpochPlan:
        raise NotImplementedError

    def synthesize(self, state: State, teacher_variables: dict, epoch: int, on_step=None) -> tuple[State, dict]:
        """One synthesis phase (host loop over jitted steps). Returns the state and mean measurements; `on_step(
        images, measurements)` is called after every step (progress, and the trainer's non-finite check)."""
        raise NotImplementedError

    def student_batch(self, synth: dict, key: jax.Array) -> tuple[dict, dict]:
        """Traced inside the student step: ({"images": (B, H, W, C) in [0, 1], and whatever the method's loss reads:
        "labels", "groups", ...}, synth with any sampler state it moved)."""
        raise NotImplementedError

    # --------------------------------------------------------------------------------- the student step
    def init_extras(self, key: jax.Array) -> dict:
        """Trainable parameters beside the student (`state["extras"]`): none by default."""
        del key
        return {}

    def extras_optimizer(self, student_optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
        """How the extras are trained: by default like the student (same SGD, same schedule, own state)."""
        return student_optimizer

    def student_loss(self, student_out: Output, teacher_out: Output, batch: dict, extras: dict,
                     synth: dict) -> tuple[jax.Array, dict, dict]:
        """(loss, measurements, synth). Differentiated w.r.t. the student's parameters and `extras`; the returned
        `synth` replaces the method's state (unchanged here; a memory bank would be written). Default: KL_τ(s, t),
        the CMI/Fast/NAYER distillation loss."""
        loss = losses.kl_divergence(student_out.logits, teacher_out.logits, self.config.student.temperature)
        return loss, {"kd/kl": loss}, synth

    def make_student_step(self, optimizer: optax.GradientTransformation):
        """(state, teacher_variables) -> (state, measurements), jitted once by the trainer with the state donated.
        Default: `dfkd_jax.distill.make_student_step` (the method's batch, its loss, one optimizer step)."""
        return distill.make_student_step(self, optimizer)

    # ---------------------------------------------------------------------------------------- defaults
    def kept_images(self, state: State) -> int | None:
        """How many synthetic images the method keeps (its pool), or None when it keeps none."""
        synth_pool = state["synth"].get("pool")
        return None if synth_pool is None else int(synth_pool["count"])

    preview_columns: int | None = None  # columns of the PNG grid (None: a square grid)

    def preview(self, state: State) -> np.ndarray | None:
        """Images for the PNG grid at each evaluation (the newest synthetic batch). Called on every process: read
        sharded arrays with `distributed.fetch` (a gather across processes), not `jax.device_get`."""
        return None

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def sharded_paths(self) -> tuple[str, ...]:
        """The batch-sharded subtrees of the whole train state."""
        return tuple(f"synth/{path}" for path in self.batch_sharded)

    def constrain(self, state: State) -> State:
        """Inside jit: pin every leaf of the train state to its declared sharding."""
        return parallel.constrain_state(state, self.mesh, self.sharded_paths)

    def batch_constraint(self, x: jax.Array) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, parallel.batch_sharded(self.mesh))

    def draw_noise_and_labels(self, key: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
        """For a class-conditional generator: z ~ N(0, I) (B, config.synthesis.nz) and labels uniform over the
        classes (B,) (CPSC's upstream `torch.randint`; CGDD's preset labels), both sharded on the batch."""
        z_key, label_key = jax.random.split(key)
        z = jax.random.normal(z_key, (batch, self.config.synthesis.nz))
        labels = jax.random.randint(label_key, (batch,), 0, self.num_classes, jnp.int32)
        return self.batch_constraint(z), self.batch_constraint(labels)

    def pool_capacity(self, kept_batches: int, batch: int) -> int:
        """Room for every batch the schedule keeps unless config.pool.capacity caps it (then the oldest are
        overwritten), rounded up to a multiple of the device count."""
        capacity = self.config.pool.capacity or max(kept_batches, 1) * batch
        return parallel.round_up_to_devices(capacity, self.mesh)

    def sample_pool(self, synth_pool: pool.Pool, key: jax.Array) -> tuple[dict, pool.Pool]:
        """A student batch from the pool with crop + flip, {"images", "labels", "groups", "indices"}, and the pool
        (its shuffled order moved), sampled as config.pool.sampling says: uniformly with replacement, without
        replacement in a shuffled order (upstream's data loader), or with every label at least twice."""
        sample_key, augment_key = jax.random.split(key)
        batch, sampling = self.config.student.batch_size, self.config.pool.sampling
        if sampling == "label_pairs":
            drawn = pool.sample_label_pairs(synth_pool, sample_key, batch, self.num_classes)
        elif sampling == "shuffled":
            drawn, synth_pool = pool.sample_shuffled(synth_pool, sample_key, batch)
        else:
            drawn = pool.sample(synth_pool, sample_key, batch)
        images = augment.random_crop_flip(self.batch_constraint(drawn["images"]), augment_key)
        return drawn | {"images": images}, synth_pool


def class_balanced_targets(key: jax.Array, batch: int, num_classes: int) -> jax.Array:
    """NAYER's `generate_ys`: every class ⌊B/K⌋ times (in class order), the remaining B mod K drawn at random."""
    repeats = jnp.tile(jnp.arange(num_classes, dtype=jnp.int32), batch // num_classes)
    remainder = jax.random.randint(key, (batch % num_classes,), 0, num_classes, jnp.int32)
    return jnp.concatenate([repeats, remainder])


def label_embedding(num_classes: int, dim: int, path: str | None, seed: int) -> np.ndarray:
    """(K, D) class embeddings: from a .npy file (e.g. CLIP text embeddings) or a fixed random orthogonal matrix."""
    if path:
        table = np.load(path)
        if table.ndim != 2 or table.shape[0] != num_classes:
            raise ValueError(f"{path} holds an array of shape {table.shape}; the label embedding must be "
                             f"(num_classes={num_classes}, dim)")
        return table.astype(np.float32)
    if num_classes > dim:
        raise ValueError(f"a random orthogonal embedding needs dim >= num_classes ({dim} < {num_classes})")
    gaussian = np.random.default_rng(seed).standard_normal((dim, num_classes))
    q, _ = np.linalg.qr(gaussian)  # orthonormal columns
    return np.ascontiguousarray(q.T, np.float32)


def grid_by_class(images_bhwc: np.ndarray, labels_b: np.ndarray, num_classes: int, per_class: int = 10,
                  max_classes: int = 20) -> np.ndarray:
    """Images arranged for a grid of `per_class` columns: one row per class (the first `max_classes` classes),
    up to `per_class` images of that class in it, blank (white) where a class has fewer."""
    images, labels = np.asarray(images_bhwc), np.asarray(labels_b)
    rows = []
    for label in range(min(num_classes, max_classes)):
        chosen = images[labels == label][:per_class]
        blank = np.ones((per_class - len(chosen), *images.shape[1:]), images.dtype)
        rows.append(np.concatenate([chosen, blank]))
    return np.concatenate(rows)


def run_steps(step, state: State, teacher_variables: dict, count: int, batch: int,
              on_step=None) -> tuple[State, dict]:
    """`count` calls of a jitted synthesis step `step(state, teacher_variables) -> (state, measurements)`, telling
    `on_step(batch, measurements)` after each; returns the state and the mean measurements."""
    history = []
    for _ in range(count):
        state, metrics = step(state, teacher_variables)
        history.append(metrics)
        if on_step:
            on_step(batch, metrics)
    return state, mean_metrics(history)


def mean_metrics(history: list[dict]) -> dict:
    """Average a list of per-step measurement dicts (device arrays) with one transfer to the host."""
    if not history:
        return {}
    stacked = jax.device_get({k: jnp.stack([m[k] for m in history]) for k in history[0]})
    return {k: float(np.mean(v)) for k, v in stacked.items()}
