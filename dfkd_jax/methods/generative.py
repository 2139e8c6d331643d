"""One persistent generator trained alternately with the student, no pool: DAFL (Chen et al., ICCV 2019) and DFAD
(Fang et al., 2019), as CMI's `GenerativeSynthesizer` runs them.

Per epoch: `cycles` × (`g_steps` generator steps, then `kd_steps` student steps on fresh generator samples). The
generator (DCGAN-small, z ~ N(0, I)) minimises
    oh·CE(t, argmax t) + act·(−mean|f_T|) + balance·Σ p̄ log p̄ + adv·adversarial + bn·BN
with DAFL's weights (1, 0.1, 5, 0, 0; log base 10 in the entropy, as DAFL's code) or DFAD's (0, 0, 0, 1 with
−L1, 0). The student is in train mode during the
generator step, as in DFAD (its batch statistics move). Fixes one upstream defect: CMI builds these baselines with the
teacher passed as the student, which makes DFAD's adversarial term zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dfkd_jax import distributed, losses, validate
from dfkd_jax.methods.base import EpochPlan, Method, State, run_steps
from dfkd_jax.models.generators import Generator
from dfkd_jax.models.layers import batch_moments

ADVERSARIAL = {"l1": losses.adversarial_l1, "masked_kl": losses.adversarial_masked_kl}
STUDENT_LOSSES = ("kl", "l1")


class GenerativeAdversarial(Method):
    name = "generative"
    CONFIG_RULES = {"synthesis.adversarial": validate.choice(tuple(ADVERSARIAL)),
                    "student.loss": validate.choice(STUDENT_LOSSES), "synthesis.nz": validate.integer(1),
                    "synthesis.ngf": validate.integer(1)}

    def __init__(self, config, teacher, student, mesh):
        super().__init__(config, teacher, student, mesh)
        synthesis = config.synthesis
        if synthesis.adversarial not in ADVERSARIAL:
            raise ValueError(f"config.synthesis.adversarial must be one of {sorted(ADVERSARIAL)}, "
                             f"got {synthesis.adversarial!r}")
        if config.student.loss not in STUDENT_LOSSES:
            raise ValueError(f"config.student.loss must be one of {STUDENT_LOSSES}, got {config.student.loss!r}")
        self.batch = synthesis.batch_size
        self.generator, _ = Generator.create("dcgan", 0, nz=synthesis.nz, ngf=synthesis.ngf,
                                             image_size=self.image_shape[0], channels=self.image_shape[2])
        self.optimizer = optax.adam(synthesis.lr, b1=synthesis.betas[0], b2=synthesis.betas[1])
        self.generator_step = jax.jit(self._generator_step, donate_argnums=0)
        self.mean = jnp.asarray(teacher.spec.mean, jnp.float32)
        self.std = jnp.asarray(teacher.spec.std, jnp.float32)
        self._preview_images = jax.jit(lambda variables, z: self.generate(variables, z)[0])

    def init(self, key: jax.Array) -> dict:
        variables = self.generator.init(key)
        return {"generator": variables, "generator_opt": self.optimizer.init(variables["params"])}

    def plan(self, epoch: int) -> EpochPlan:
        schedule, synthesis = self.config.schedule, self.config.synthesis
        return EpochPlan(cycles=schedule.cycles, kd_steps=schedule.kd_steps, synthesis_steps=synthesis.g_steps,
                         synthesis_batch=self.batch)

    def synthesize(self, state: State, teacher_variables: dict, epoch: int, on_step=None) -> tuple[State, dict]:
        return run_steps(self.generator_step, state, teacher_variables, self.config.synthesis.g_steps, self.batch,
                         on_step)

    def _noise(self, key: jax.Array, batch: int) -> jax.Array:
        return self.batch_constraint(jax.random.normal(key, (batch, self.config.synthesis.nz)))

    def generate(self, variables: dict, z: jax.Array) -> tuple[jax.Array, dict]:
        """Images (in [0, 1] space, before the teacher's normalisation) and the generator's new batch statistics.

        With `synthesis.standardise_output` (DAFL) each channel of the batch is standardised as DAFL's generator
        does with its last layer, BatchNorm2d(affine=False) in train mode, and the teacher sees those standardised
        images as its normalised input: without it the fresh generator's near-identical samples all land in one
        class and DAFL's class-balance term has no gradient to escape with (measured: chance accuracy)."""
        images, batch_stats = self.generator.apply(variables, z, train=True)
        images = self.batch_constraint(images)
        if self.config.synthesis.standardise_output:
            mean, var = batch_moments(images)
            images = (images - mean) * jax.lax.rsqrt(var + 1e-5) * self.std + self.mean
        return images, batch_stats

    def _generator_step(self, state: State, teacher_variables: dict) -> tuple[State, dict]:
        weights = self.config.synthesis
        rng, noise_key = jax.random.split(state["rng"])
        synth = state["synth"]
        z = self._noise(noise_key, self.batch)

        def loss_fn(params):
            images, batch_stats = self.generate({"params": params, "batch_stats": synth["generator"]["batch_stats"]}, z)
            teacher_out, _ = self.teacher.apply(teacher_variables, images, train=False)
            terms, loss = {}, 0.0
            if weights.ce_weight:
                terms["synthesis/ce"] = losses.cross_entropy(
                    teacher_out.logits, jax.lax.stop_gradient(jnp.argmax(teacher_out.logits, -1)))
                loss += weights.ce_weight * terms["synthesis/ce"]
            if weights.activation_weight:
                terms["synthesis/activation"] = losses.dafl_activation(teacher_out.features)
                loss += weights.activation_weight * terms["synthesis/activation"]
            if weights.balance_weight:
                terms["synthesis/balance"] = losses.information_entropy(teacher_out.logits,
                                                                        weights.balance_log_base or None)
                loss += weights.balance_weight * terms["synthesis/balance"]
            if weights.bn_weight:
                terms["synthesis/bn"] = losses.bn_statistics_loss(teacher_out.bn_inputs)[0]
                loss += weights.bn_weight * terms["synthesis/bn"]
            student_batch_stats = state["student"]["batch_stats"]
            if weights.adv_weight:
                student_out, student_batch_stats = self.student.apply(state["student"], images, train=True)
                terms["synthesis/adv"] = ADVERSARIAL[weights.adversarial](student_out.logits, teacher_out.logits)
                loss += weights.adv_weight * terms["synthesis/adv"]
            return loss, (batch_stats, student_batch_stats, terms)

        params = synth["generator"]["params"]
        (loss, (batch_stats, student_batch_stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = self.optimizer.update(grads, synth["generator_opt"], params)
        synth = synth | {"generator": {"params": optax.apply_updates(params, updates), "batch_stats": batch_stats},
                         "generator_opt": opt_state}
        student = state["student"] | {"batch_stats": student_batch_stats}
        return (self.constrain(state | {"rng": rng, "synth": synth, "student": student}),
                {"synthesis/loss": loss, **terms})

    def student_batch(self, synth: dict, key: jax.Array) -> tuple[dict, dict]:
        images, _ = self.generate(synth["generator"], self._noise(key, self.config.student.batch_size))
        return {"images": jax.lax.stop_gradient(images)}, synth

    def student_loss(self, student_out, teacher_out, batch, extras, synth):
        if self.config.student.loss == "l1":  # DFAD: the student closes the gap the generator widens
            loss = losses.l1_distance(student_out.logits, teacher_out.logits)
            return loss, {"kd/l1": loss}, synth
        return super().student_loss(student_out, teacher_out, batch, extras, synth)

    def preview(self, state: State):
        z = jax.random.normal(jax.random.PRNGKey(0), (64, self.config.synthesis.nz))
        return distributed.fetch(self._preview_images(state["synth"]["generator"], z))
