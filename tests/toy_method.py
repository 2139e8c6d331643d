"""A toy DFKD method that uses every opening the engine gives a new method, written the way a new method is: a
config plus one small module, with no change to `dfkd_jax/train.py` or `dfkd_jax/distill.py`.

    python -m dfkd_jax.main --config=tests/toy_method.py        # registers the method "toy" when loaded

(a) a trainable projection head beside the student (`init_extras`), trained by the student's loss and never
    exported with the student;
(b) the labels the pool keeps, sampled so every label appears at least twice (`pool.sampling = "label_pairs"`);
(c) the teacher's and student's stage outputs (an attention-map term on their last stages);
(d) a class-conditional generator (the zoo's `conditional_dcgan`) making images for the labels it is given;
(e) the student step writing the method's own state: `synth["seen"]` counts student images per label.

Not a DFKD method anyone should use: its loss terms are chosen to touch each opening, not to distil well.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dfkd_jax import losses, methods, pool, presets, validate
from dfkd_jax.methods.base import EpochPlan, Method, run_steps
from dfkd_jax.models.generators import Generator


def attention_map(stage_bhwc: jax.Array) -> jax.Array:
    """(B, H·W): the channel-mean of squared activations, ℓ2-normalised per sample."""
    squared = jnp.mean(jnp.square(stage_bhwc.astype(jnp.float32)), axis=-1).reshape(stage_bhwc.shape[0], -1)
    return squared / (jnp.linalg.norm(squared, axis=-1, keepdims=True) + 1e-12)


class Toy(Method):
    name = "toy"
    batch_sharded = ("pool", "last")
    CONFIG_RULES = {"synthesis.head_dim": validate.integer(1), "synthesis.nz": validate.integer(1)}

    def __init__(self, config, teacher, student, mesh):
        super().__init__(config, teacher, student, mesh)
        synthesis = config.synthesis
        self.batch = synthesis.batch_size
        self.generator, _ = Generator.create("conditional_dcgan", 0, num_classes=self.num_classes, nz=synthesis.nz,
                                             ngf=synthesis.ngf, image_size=self.image_shape[0])
        self.optimizer = optax.adam(synthesis.lr, b1=synthesis.betas[0], b2=synthesis.betas[1])
        self.feature_dim = jax.eval_shape(
            lambda v, x: student.apply(v, x)[0].features, student.init(jax.random.key(0)),
            jax.ShapeDtypeStruct((2, *self.image_shape), jnp.float32)).shape[-1]
        self.generator_step = jax.jit(self._generator_step, donate_argnums=0)
        self.end_round = jax.jit(self._end_round, donate_argnums=0)

    def init(self, key):
        variables = self.generator.init(key)
        capacity = self.pool_capacity(self.config.schedule.epochs, self.batch)
        return {"generator": variables, "generator_opt": self.optimizer.init(variables["params"]),
                "pool": pool.create(capacity, self.image_shape, self.config.pool.dtype),
                "last": {"images": jnp.zeros((self.batch, *self.image_shape)),
                         "labels": jnp.zeros((self.batch,), jnp.int32)},
                "seen": jnp.zeros((self.num_classes,), jnp.int32)}

    def plan(self, epoch):
        return EpochPlan(cycles=1, kd_steps=self.config.schedule.kd_steps,
                         synthesis_steps=self.config.synthesis.g_steps, synthesis_batch=self.batch)

    # ------------------------------------------------------------------------------ (d) conditional generator
    def synthesize(self, state, teacher_variables, epoch, on_step=None):
        state, metrics = run_steps(self.generator_step, state, teacher_variables, self.config.synthesis.g_steps,
                                   self.batch, on_step)
        return self.end_round(state), metrics

    def _generator_step(self, state, teacher_variables):
        rng, z_key, label_key = jax.random.split(state["rng"], 3)
        synth = state["synth"]
        z = self.batch_constraint(jax.random.normal(z_key, (self.batch, self.config.synthesis.nz)))
        labels = self.batch_constraint(jax.random.randint(label_key, (self.batch,), 0, self.num_classes))

        def loss_fn(params):
            images, batch_stats = self.generator.apply(
                {"params": params, "batch_stats": synth["generator"]["batch_stats"]}, z, labels, train=True)
            teacher_out, _ = self.teacher.apply(teacher_variables, images, train=False)
            ce = losses.cross_entropy(teacher_out.logits, labels)
            bn = losses.bn_statistics_loss(teacher_out.bn_inputs)[0]
            return ce + 0.1 * bn, (images, batch_stats, {"synthesis/ce": ce, "synthesis/bn": bn})

        params = synth["generator"]["params"]
        (loss, (images, batch_stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = self.optimizer.update(grads, synth["generator_opt"], params)
        synth = synth | {"generator": {"params": optax.apply_updates(params, updates), "batch_stats": batch_stats},
                         "generator_opt": opt_state,
                         "last": {"images": jax.lax.stop_gradient(images), "labels": labels}}
        return self.constrain(state | {"rng": rng, "synth": synth}), {"synthesis/loss": loss, **terms}

    def _end_round(self, state):
        synth = state["synth"]
        new_pool = pool.add(synth["pool"], synth["last"]["images"], synth["last"]["labels"])
        return self.constrain(state | {"synth": synth | {"pool": new_pool}})

    # ---------------------------------------------------------------------- (a) head, (b) labels, (c) stages
    def student_batch(self, synth, key):
        batch, synth_pool = self.sample_pool(synth["pool"], key)
        return batch, synth | {"pool": synth_pool}

    def init_extras(self, key):
        first, second = jax.random.split(key)
        width = self.config.synthesis.head_dim
        return {"w1": jax.random.normal(first, (self.feature_dim, width)) / jnp.sqrt(self.feature_dim),
                "b1": jnp.zeros((width,)),
                "w2": jax.random.normal(second, (width, self.num_classes)) / jnp.sqrt(width)}

    def student_loss(self, student_out, teacher_out, batch, extras, synth):
        kl = losses.kl_divergence(student_out.logits, teacher_out.logits, self.config.student.temperature)
        hidden = jax.nn.relu(student_out.features @ extras["w1"] + extras["b1"])
        head_ce = losses.cross_entropy(hidden @ extras["w2"], batch["labels"])
        stage_gap = jnp.mean(jnp.sum(jnp.square(attention_map(student_out.stages[-1])
                                                - attention_map(teacher_out.stages[-1])), axis=-1))
        seen = synth["seen"] + jnp.bincount(batch["labels"], length=self.num_classes).astype(jnp.int32)
        loss = kl + head_ce + stage_gap
        return loss, {"kd/kl": kl, "kd/head_ce": head_ce, "kd/stage_gap": stage_gap}, synth | {"seen": seen}

    def preview(self, state):
        return jax.device_get(state["synth"]["last"]["images"])


methods.register(Toy)

DEFAULTS = dict(
    synthesis=dict(batch_size=16, g_steps=2, lr=1e-3, betas=(0.5, 0.999), nz=16, ngf=8, head_dim=24),
    schedule=dict(epochs=3, warmup=0, kd_steps=3, cycles=1),
    student=dict(batch_size=16, lr=0.05, schedule="cosine", temperature=4.0),
    pool=dict(sampling="label_pairs", dtype="float32"),
)
BUDGETS = {"digits": {}}


def get_config(arg=None):
    return presets.base_config("toy", arg, DEFAULTS, BUDGETS)
