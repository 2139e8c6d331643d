"""The student step and the student's learning rates.

A method owns its student step (`Method.make_student_step`); the one built here is the default every method
inherits: draw the method's batch, run the frozen teacher, and take one optimizer step on the method's
`student_loss` jointly over the student and the trainable extras the method keeps beside it (a projection head, an
adapter; `state["extras"]`, with their own optimizer state, never part of the exported student). The loss may also
write the method's own state (`state["synth"]`: a memory bank, a queue).

The learning rate follows the upstream schedules, stepped once per epoch as PyTorch's schedulers are there: cosine to
`eta_min` over the distillation epochs (NAYER, Fast, CMI), a linear warm-up then cosine (CPSC-DFKD's intent), what
CPSC-DFKD's code actually runs (`cpsc_upstream`, below), ×0.1 at
fractions of training (CMI's older scripts: 120/150/180 of 200 epochs), or constant. This module is the one place
that computes it; the rate logged as `kd/lr` is read back from the optimizer state, so it is the one optax applied.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("cosine", "warmup_cosine", "cpsc_upstream", "multistep", "constant")


def learning_rate_at_epoch(student: ml_collections.ConfigDict, distill_epoch, distill_epochs: int):
    """The student's learning rate during its `distill_epoch`-th epoch of distillation (0-based)."""
    def cosine(progress):
        return student.eta_min + (student.lr - student.eta_min) * (1 + jnp.cos(math.pi * progress)) / 2

    if student.schedule == "cosine":
        return cosine(distill_epoch / max(distill_epochs, 1))
    if student.schedule == "warmup_cosine":
        # lr·(e+1)/W during the W warm-up epochs (CPSC: 0.01·e for e = 1..10 at lr 0.1), then cosine from lr over
        # the remaining epochs.
        warmup = student.warmup_epochs
        ramp = student.lr * (distill_epoch + 1) / max(warmup, 1)
        return jnp.where(distill_epoch < warmup, ramp,
                         cosine((distill_epoch - warmup) / max(distill_epochs - warmup, 1)))
    if student.schedule == "cpsc_upstream":
        return cpsc_upstream_rate(student.lr, student.eta_min, student.warmup_epochs, distill_epoch, distill_epochs)
    if student.schedule == "multistep":
        boundaries = jnp.asarray([round(f * distill_epochs) for f in student.milestones])
        return student.lr * 0.1 ** jnp.sum(distill_epoch >= boundaries)
    if student.schedule == "constant":
        return jnp.asarray(student.lr, jnp.float32)
    raise ValueError(f"config.student.schedule must be one of {', '.join(SCHEDULES)}, got {student.schedule!r}")


def cpsc_upstream_rate(lr: float, eta_min: float, warmup: int, distill_epoch, epochs: int):
    """The rate CPSC-DFKD's script trains epoch e = distill_epoch + 1 with. It steps two schedulers at the start of
    every epoch, `CosineAnnealingLR(T_max=epochs)` and a `GradualWarmupScheduler(total_epoch=W)` wrapping it,
    `scheduler_S.step(); scheduler_warmup.step(epoch)`, which gives
        lr·e/W                                     for e ≤ W (the warm-up overwrites the cosine's step),
        η + r²·(lr − η),  r = (1 + cos(π(W+1)/E)) / (1 + cos(πW/E))   for e = W + 1 (the cosine's recursive step
                                                   applied twice: once by itself, once through the warm-up),
        η + (lr − η)·(1 + cos(π(e − W)/E))/2       for e ≥ W + 2 (the warm-up's closed-form call of the cosine),
    so the cosine starts W epochs late, at its second value, and never reaches η (tests/test_cpsc.py checks it
    against the two schedulers themselves)."""
    epoch = distill_epoch + 1
    # (1 + cos θ)/2 written as cos²(θ/2): float32 keeps its relative accuracy near θ = π, where the rate is small.
    ratio = (jnp.cos(math.pi * (warmup + 1) / (2 * epochs)) / jnp.cos(math.pi * warmup / (2 * epochs))) ** 2
    cosine = eta_min + (lr - eta_min) * jnp.cos(math.pi * (epoch - warmup) / (2 * epochs)) ** 2
    return jnp.where(epoch <= warmup, lr * epoch / max(warmup, 1),
                     jnp.where(epoch == warmup + 1, eta_min + ratio ** 2 * (lr - eta_min), cosine))


def make_optimizer(student: ml_collections.ConfigDict, kd_steps_per_epoch: int, distill_epochs: int
                   ) -> tuple[optax.GradientTransformation, Callable]:
    """PyTorch's SGD (coupled weight decay, heavy-ball momentum) with the schedule above; returns it and the
    schedule as a function of the number of student steps taken. The rate is an injected hyperparameter, so the
    optimizer state holds the one it applied last (`learning_rate`)."""

    def schedule(count):
        return learning_rate_at_epoch(student, count // max(kd_steps_per_epoch, 1), distill_epochs)

    optimizer = optax.chain(optax.add_decayed_weights(student.weight_decay),
                            optax.inject_hyperparams(optax.sgd)(learning_rate=schedule,
                                                                momentum=student.momentum or None))
    return optimizer, schedule


def learning_rate(opt_state) -> jax.Array:
    """The learning rate the last update applied (the rate for step 0 before any)."""
    return optax.tree_utils.tree_get(opt_state, "hyperparams")["learning_rate"]


def init_extras_state(method, optimizer: optax.GradientTransformation, key: jax.Array) -> dict:
    """`state["extras"]` and `state["extras_opt"]`: the method's trainable extras and their optimizer state."""
    extras = method.init_extras(key)
    return {"extras": extras, "extras_opt": method.extras_optimizer(optimizer).init(extras)}


def make_kd_update(method, optimizer: optax.GradientTransformation) -> Callable:
    """The pure core of the default student step on a given batch: (state, images, teacher_variables, batch) ->
    (state, loss, measurements). It reads and returns `student`, `student_opt`, `extras`, `extras_opt` and `synth`
    of the state (other keys pass through); `method.student_loss` supplies the loss. The benchmark and the PyTorch
    parity tests call it directly."""
    teacher, student = method.teacher, method.student
    extras_optimizer = method.extras_optimizer(optimizer)

    def kd_update(state: dict[str, Any], images: jax.Array, teacher_variables: dict, batch: dict | None = None):
        batch = {"images": images} if batch is None else batch
        teacher_out, _ = teacher.apply(teacher_variables, images, train=False)
        teacher_out = jax.lax.stop_gradient(teacher_out)

        def loss_fn(trainable):
            student_out, batch_stats = student.apply(
                {"params": trainable["student"], "batch_stats": state["student"]["batch_stats"]}, images, train=True)
            loss, terms, synth = method.student_loss(student_out, teacher_out, batch, trainable["extras"],
                                                     state["synth"])
            return loss, (student_out, batch_stats, terms, synth)

        trainable = {"student": state["student"]["params"], "extras": state["extras"]}
        (loss, (student_out, batch_stats, terms, synth)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, student_opt = optimizer.update(grads["student"], state["student_opt"], trainable["student"])
        extras_updates, extras_opt = extras_optimizer.update(grads["extras"], state["extras_opt"], trainable["extras"])
        agreement = jnp.mean(jnp.argmax(student_out.logits, -1) == jnp.argmax(teacher_out.logits, -1))
        new_state = state | {
            "student": {"params": optax.apply_updates(trainable["student"], updates), "batch_stats": batch_stats},
            "student_opt": student_opt, "extras": optax.apply_updates(trainable["extras"], extras_updates),
            "extras_opt": extras_opt, "synth": jax.lax.stop_gradient(synth)}
        return new_state, loss, {"kd/agreement": agreement, "kd/lr": learning_rate(student_opt), **terms}

    return kd_update


def make_student_step(method, optimizer: optax.GradientTransformation) -> Callable:
    """The default student step: (state, teacher_variables) -> (state, measurements), to be jitted with the state
    donated. One batch from `method.student_batch`, one update by `make_kd_update`."""
    kd_update = make_kd_update(method, optimizer)

    def student_step(state: dict[str, Any], teacher_variables: dict) -> tuple[dict, dict]:
        rng, batch_key = jax.random.split(state["rng"])
        batch, synth = method.student_batch(state["synth"], batch_key)
        images = method.batch_constraint(batch["images"])
        state, loss, measurements = kd_update(state | {"synth": synth}, images, teacher_variables,
                                              batch | {"images": images})
        state = state | {"rng": rng, "kd_step": state["kd_step"] + 1}
        return method.constrain(state), {"kd/loss": loss, **measurements}

    return student_step
