"""What a DFKD method is to the trainer: how it makes synthetic images, what the student trains on, and how.

An epoch is `plan(epoch).cycles` × (one call of `synthesize`, then `plan(epoch).kd_steps` student steps). NAYER and
DeepInversion synthesise once per epoch then distil from the pool; DAFL/DFAD alternate one generator step with a
few student steps on fresh generator samples. Every hot function a method defines is a pure jitted function of the
whole train state (donated) and returns the new state and a flat dict of measurements.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dfkd_jax import losses, parallel
from dfkd_jax.models import Network, Output

State = dict[str, Any]  # the train state: student, student_opt, synth (the method's own), rng, epoch, kd_step


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    cycles: int  # synthesis → distillation cycles in this epoch
    kd_steps: int  # student steps after each synthesis (0 during warm-up)
    synthesis_steps: int  # generator/pixel steps per cycle (for progress and budget accounting)
    synthesis_batch: int  # images per synthesis step


class Method:
    """Base class: subclasses set `name` and implement `init`, `plan`, `synthesize` and `student_batch`."""

    name = "method"

    def __init__(self, config: ml_collections.ConfigDict, teacher: Network, student: Network,
                 mesh: jax.sharding.Mesh):
        self.config = config
        self.teacher = teacher
        self.student = student
        self.mesh = mesh
        self.num_classes = teacher.spec.num_classes
        self.image_shape = tuple(config.data.image_shape)

    # ------------------------------------------------------------------------------------------ to implement
    def init(self, key: jax.Array) -> dict:
        """The method's part of the train state (`state["synth"]`)."""
        raise NotImplementedError

    def plan(self, epoch: int) -> EpochPlan:
        raise NotImplementedError

    def synthesize(self, state: State, teacher_variables: dict, epoch: int, on_step=None) -> tuple[State, dict]:
        """One synthesis phase (host loop over jitted steps). Returns the state and mean measurements."""
        raise NotImplementedError

    def student_batch(self, synth: dict, key: jax.Array) -> dict:
        """Traced inside the student step: {"images": (B, H, W, C) in [0, 1], ...}."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- defaults
    def student_loss(self, student_out: Output, teacher_out: Output, batch: dict) -> tuple[jax.Array, dict]:
        """KL_τ(s, t), the CMI/Fast/NAYER distillation loss."""
        loss = losses.kl_divergence(student_out.logits, teacher_out.logits, self.config.student.temperature)
        return loss, {"kd/kl": loss}

    def kept_images(self, state: State) -> int | None:
        """How many synthetic images the method keeps (its pool), or None when it keeps none."""
        synth_pool = state["synth"].get("pool")
        return None if synth_pool is None else int(synth_pool["count"])

    def preview(self, state: State) -> np.ndarray | None:
        """Images for the PNG grid at each evaluation (the newest synthetic batch)."""
        return None

    # ------------------------------------------------------------------------------------------ helpers
    def constrain(self, tree):
        return parallel.constrain_state(tree, self.mesh)

    def batch_constraint(self, x: jax.Array) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, parallel.batch_sharded(self.mesh))


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


def mean_metrics(history: list[dict]) -> dict:
    """Average a list of per-step measurement dicts (device arrays) with one transfer to the host."""
    if not history:
        return {}
    stacked = jax.device_get({k: jnp.stack([m[k] for m in history]) for k in history[0]})
    return {k: float(np.mean(v)) for k, v in stacked.items()}
