"""The student step: one SGD step of the student on a synthetic batch chosen by the method.

The learning rate follows the upstream schedules, stepped once per epoch as PyTorch's schedulers are there:
cosine to `eta_min` over the distillation epochs (NAYER, Fast), or ×0.1 at fractions of training (CMI: 120/150/180
of 200 epochs).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dfkd_jax import parallel
from dfkd_jax.methods.base import Method, State
from dfkd_jax.models import Network


def learning_rate_at_epoch(student: ml_collections.ConfigDict, distill_epoch, distill_epochs: int):
    """The student's learning rate during its `distill_epoch`-th epoch of distillation (0-based)."""
    if student.schedule == "cosine":
        progress = distill_epoch / max(distill_epochs, 1)
        return student.eta_min + (student.lr - student.eta_min) * (1 + jnp.cos(math.pi * progress)) / 2
    if student.schedule == "multistep":
        boundaries = jnp.asarray([round(f * distill_epochs) for f in student.milestones])
        return student.lr * 0.1 ** jnp.sum(distill_epoch >= boundaries)
    if student.schedule == "constant":
        return jnp.asarray(student.lr, jnp.float32)
    raise ValueError(f"config.student.schedule must be cosine, multistep or constant, got {student.schedule!r}")


def make_optimizer(student: ml_collections.ConfigDict, kd_steps_per_epoch: int, distill_epochs: int
                   ) -> tuple[optax.GradientTransformation, Callable]:
    """PyTorch's SGD (coupled weight decay, heavy-ball momentum) with the schedule above; returns it and the
    schedule as a function of the number of student steps taken."""

    def schedule(count):
        return learning_rate_at_epoch(student, count // max(kd_steps_per_epoch, 1), distill_epochs)

    optimizer = optax.chain(optax.add_decayed_weights(student.weight_decay),
                            optax.sgd(schedule, momentum=student.momentum or None))
    return optimizer, schedule


def make_kd_update(teacher: Network, student: Network, optimizer: optax.GradientTransformation,
                   student_loss: Callable) -> Callable:
    """The pure core of a student step on a given batch: (student variables, optimizer state, images, teacher
    variables, batch) -> (variables, optimizer state, loss, measurements). `student_loss(student_out, teacher_out,
    batch)` is the method's. The benchmark and the PyTorch parity tests call it directly."""

    def kd_update(student_variables: dict, opt_state, images: jax.Array, teacher_variables: dict,
                  batch: dict | None = None):
        teacher_out, _ = teacher.apply(teacher_variables, images, train=False)
        teacher_out = jax.lax.stop_gradient(teacher_out)

        def loss_fn(params):
            student_out, batch_stats = student.apply(
                {"params": params, "batch_stats": student_variables["batch_stats"]}, images, train=True)
            loss, terms = student_loss(student_out, teacher_out, batch)
            return loss, (student_out, batch_stats, terms)

        params = student_variables["params"]
        (loss, (student_out, batch_stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        agreement = jnp.mean(jnp.argmax(student_out.logits, -1) == jnp.argmax(teacher_out.logits, -1))
        new_variables = {"params": optax.apply_updates(params, updates), "batch_stats": batch_stats}
        return new_variables, opt_state, loss, {"kd/agreement": agreement, **terms}

    return kd_update


def make_distill_step(method: Method, teacher: Network, student: Network, optimizer: optax.GradientTransformation,
                      schedule: Callable, mesh: jax.sharding.Mesh) -> Callable:
    """(state, teacher_variables) -> (state, measurements), jitted once, state donated."""
    kd_update = make_kd_update(teacher, student, optimizer, method.student_loss)

    def distill_step(state: State, teacher_variables: dict) -> tuple[State, dict]:
        rng, batch_key = jax.random.split(state["rng"])
        batch = method.student_batch(state["synth"], batch_key)
        images = jax.lax.with_sharding_constraint(batch["images"], parallel.batch_sharded(mesh))
        student_variables, opt_state, loss, terms = kd_update(state["student"], state["student_opt"], images,
                                                              teacher_variables, batch)
        new_state = state | {"rng": rng, "student": student_variables, "student_opt": opt_state,
                             "kd_step": state["kd_step"] + 1}
        metrics = {"kd/loss": loss, "kd/lr": schedule(state["kd_step"]), **terms}
        return parallel.constrain_state(new_state, mesh), metrics

    return jax.jit(distill_step, donate_argnums=0)
