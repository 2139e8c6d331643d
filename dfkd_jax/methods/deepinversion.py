"""DeepInversion (Yin et al., CVPR 2020) as in the CMI codebase: optimise a batch of pixels, keep it in the pool.

Per epoch: one batch of pixels, initialised N(0, 1) in the teacher's normalised space, takes `g_steps` Adam steps
(lr 0.1, betas 0.5/0.99) on BN + CE(random sorted targets) + adv (−JS, τ = 3) + TV + L2, each step seeing the batch
rolled by up to ±4 pixels and possibly flipped (one draw per batch), then clipped to valid pixel values. The
lowest-loss batch goes to the pool with its targets; the student then takes `kd_steps` steps on the pool. The total
variation is CMI's l1 form (`config.synthesis.tv_norm`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dfkd_jax import augment, distributed, losses, pool, validate
from dfkd_jax.methods.base import EpochPlan, Method, State, run_steps


class DeepInversion(Method):
    name = "deepinv"
    batch_sharded = ("pixels", "pixel_opt", "targets", "best_images", "pool")
    CONFIG_RULES = {"synthesis.tv_norm": validate.choice(losses.TV_NORMS),
                    "synthesis.adv_temperature": validate.positive()}

    def __init__(self, config, teacher, student, mesh):
        super().__init__(config, teacher, student, mesh)
        synthesis = config.synthesis
        self.batch = synthesis.batch_size
        self.mean = jnp.asarray(teacher.spec.mean, jnp.float32)
        self.std = jnp.asarray(teacher.spec.std, jnp.float32)
        self.optimizer = optax.adam(synthesis.lr, b1=synthesis.betas[0], b2=synthesis.betas[1])
        self.start_round = jax.jit(self._start_round, donate_argnums=0)
        self.pixel_step = jax.jit(self._pixel_step, donate_argnums=0)
        self.end_round = jax.jit(self._end_round, donate_argnums=0)

    def init(self, key: jax.Array) -> dict:
        del key
        pixels = {"pixels": jnp.zeros((self.batch, *self.image_shape))}
        return {"pixels": pixels, "pixel_opt": self.optimizer.init(pixels),
                "targets": jnp.zeros((self.batch,), jnp.int32), "best_loss": jnp.full((), jnp.inf, jnp.float32),
                "best_images": jnp.zeros((self.batch, *self.image_shape)),
                "pool": pool.create(self.pool_capacity(self.config.schedule.epochs, self.batch), self.image_shape,
                                    self.config.pool.dtype)}

    def plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(cycles=1, kd_steps=self.config.schedule.kd_steps,
                         synthesis_steps=self.config.synthesis.g_steps, synthesis_batch=self.batch)

    def to_images(self, normalised: jax.Array) -> jax.Array:
        return normalised * self.std + self.mean

    def synthesize(self, state: State, teacher_variables: dict, epoch: int, on_step=None) -> tuple[State, dict]:
        state = self.start_round(state)
        state, metrics = run_steps(self.pixel_step, state, teacher_variables, self.config.synthesis.g_steps,
                                   self.batch, on_step)
        state, round_metrics = self.end_round(state)
        return state, metrics | jax.device_get(round_metrics)

    def _start_round(self, state: State) -> State:
        rng, pixels_key, targets_key = jax.random.split(state["rng"], 3)
        pixels = {"pixels": self.batch_constraint(jax.random.normal(pixels_key, (self.batch, *self.image_shape)))}
        targets = jnp.sort(jax.random.randint(targets_key, (self.batch,), 0, self.num_classes, jnp.int32))
        synth = state["synth"] | {"pixels": pixels, "pixel_opt": self.optimizer.init(pixels), "targets": targets,
                                  "best_loss": jnp.full((), jnp.inf, jnp.float32)}
        return self.constrain(state | {"rng": rng, "synth": synth})

    def pixel_loss(self, pixels: dict, targets: jax.Array, jitter: augment.JitterFlip, teacher_variables: dict,
                   student_variables: dict) -> tuple[jax.Array, dict]:
        """BN + CE + adv + TV + L2 of the normalised `pixels` seen through the jitter/flip draw `jitter`."""
        weights = self.config.synthesis
        normalised = pixels["pixels"]
        augmented = self.to_images(augment.jitter_flip(normalised, jitter))
        teacher_out, _ = self.teacher.apply(teacher_variables, augmented, train=False)
        terms = {"synthesis/bn": losses.bn_statistics_loss(teacher_out.bn_inputs)[0],
                 "synthesis/ce": losses.cross_entropy(teacher_out.logits, targets),
                 "synthesis/tv": losses.total_variation(normalised, weights.tv_norm),
                 "synthesis/l2": losses.l2_prior(normalised)}
        loss = (weights.bn_weight * terms["synthesis/bn"] + weights.ce_weight * terms["synthesis/ce"]
                + weights.tv_weight * terms["synthesis/tv"] + weights.l2_weight * terms["synthesis/l2"])
        if weights.adv_weight > 0:
            student_out, _ = self.student.apply(student_variables, augmented, train=False)
            terms["synthesis/adv"] = losses.adversarial_js(student_out.logits, teacher_out.logits,
                                                           weights.adv_temperature)
            loss = loss + weights.adv_weight * terms["synthesis/adv"]
        return loss, terms

    def pixel_update(self, pixels: dict, pixel_opt, targets: jax.Array, jitter: augment.JitterFlip,
                     teacher_variables: dict, student_variables: dict):
        """One Adam step on the pixels with explicit draws, then the clip to valid images: the core of a
        DeepInversion step (the benchmark and the PyTorch parity tests call it directly). Returns (pixels, opt
        state, loss, terms, the images before the step)."""
        (loss, terms), grads = jax.value_and_grad(self.pixel_loss, has_aux=True)(
            pixels, targets, jitter, teacher_variables, student_variables)
        updates, pixel_opt = self.optimizer.update(grads, pixel_opt, pixels)
        # Clip to the normalised images of [0, 1] pixels (upstream `clip_images`).
        new_pixels = {"pixels": jnp.clip(optax.apply_updates(pixels, updates)["pixels"],
                                         -self.mean / self.std, (1 - self.mean) / self.std)}
        return new_pixels, pixel_opt, loss, terms, self.to_images(pixels["pixels"])

    def _pixel_step(self, state: State, teacher_variables: dict) -> tuple[State, dict]:
        rng, jitter_key = jax.random.split(state["rng"])
        synth = state["synth"]
        pixels, pixel_opt, loss, terms, images = self.pixel_update(
            synth["pixels"], synth["pixel_opt"], synth["targets"], augment.jitter_flip_params(jitter_key),
            teacher_variables, state["student"])
        better = loss < synth["best_loss"]
        synth = synth | {"pixels": pixels, "pixel_opt": pixel_opt,
                         "best_loss": jnp.where(better, loss, synth["best_loss"]),
                         "best_images": jnp.where(better, images, synth["best_images"])}
        return self.constrain(state | {"rng": rng, "synth": synth}), {"synthesis/loss": loss, **terms}

    def _end_round(self, state: State) -> tuple[State, dict]:
        synth = state["synth"]
        new_pool = pool.add(synth["pool"], synth["best_images"], synth["targets"])
        return (self.constrain(state | {"synth": synth | {"pool": new_pool}}),
                {"synthesis/best_loss": synth["best_loss"], "pool/size": new_pool["count"]})

    def student_batch(self, synth: dict, key: jax.Array) -> tuple[dict, dict]:
        batch, synth_pool = self.sample_pool(synth["pool"], key)
        return batch, synth | {"pool": synth_pool}

    def preview(self, state: State):
        return distributed.fetch(state["synth"]["best_images"])[:100]
