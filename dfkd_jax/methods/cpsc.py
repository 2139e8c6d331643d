"""CPSC-DFKD (Shao, Zhang, Wang, Pattern Recognition 2023): conditional pseudo-supervised contrast, as the authors'
`CPSC_DFKD.py` runs it (methods.md §5).

A class-conditional generator G(z, y) (`CPSCGenerator`: every BatchNorm class-conditional, tanh then a 3-channel
conditional BN at the output, which is the networks' *normalised* input) plays against the student. Per epoch,
`schedule.cycles` iterations (50 upstream) of
- `synthesis.g_steps` generator steps (6): fresh z ~ N(0, I) and uniform labels y; teacher in eval mode, student
  and generator in train mode (both move their running statistics);
      L_G = −KD(s, t) + α·IKD_G + β·BN + γ·SupCon([f_s; f_t], [y; y]) + η·CE_G,
  KD = KL at τ = 1 without τ², IKD_G = −log MSE(s, sg(t)), BN = DeepInversion's statistics term on the teacher's
  BatchNorm inputs, SupCon over the ℓ2-normalised penultimate features of student and teacher as two views of each
  sample (τ = 0.07), CE_G = CE(softmax(t), y);
- `schedule.kd_steps` student steps (5) on fresh samples (no pool):
      L_S = KD(s, t) + α·IKD_S + η·CE_S,  IKD_S = log ‖t − s‖₂,  CE_S = CE(softmax(s), y).
Where the student's feature width differs from the teacher's, an MLP adapter Linear(f_s, f_s) → ReLU →
Linear(f_s, f_t) maps the student's normalised feature before SupCon (upstream `WRNAdapter`); it is a trainable
extra, but nothing ever trains it upstream (its only loss is L_G, whose optimizer holds G alone), so here too it
keeps its initial weights.

The code's quirks are the default (`variant=faithful` in configs/cpsc.py) and each is a field:
- `synthesis.reset_adam_every_step`: upstream creates a new Adam([G, z]) for every generator step, so every update
  is Adam's first, lr·g/(|g| + ε), a sign step; z's own update is discarded (z is drawn again), so it is not
  computed here. False keeps one Adam state across steps (z is never optimised either way).
- `synthesis.lr_schedule_applies`: upstream's MultiStepLR on the generator (×0.1 at epochs 50 and 150) steps an
  optimizer the next G step replaces, so the generator always runs at `synthesis.lr`; True applies it.
- `cpsc.ce_on_probabilities`: both CE terms take the softmax *probabilities* as logits (a second softmax); False:
  CE on the logits.
- `student.schedule = "cpsc_upstream"`: the two student schedulers stepped together (distill.cpsc_upstream_rate);
  "warmup_cosine" is the intended linear warm-up then cosine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dfkd_jax import distributed, losses, validate
from dfkd_jax.methods.base import EpochPlan, Method, State, grid_by_class, run_steps
from dfkd_jax.models.generators import Generator
from dfkd_jax.models.layers import INITS, symmetric_uniform

IKD_FORMS = ("log", "plain")


def generator_learning_rate(synthesis, epoch: jax.Array) -> jax.Array:
    """The generator's rate during 0-based `epoch`: upstream's MultiStepLR(lr_milestones, 0.1), stepped at the start
    of each epoch (so epoch e = epoch + 1 runs at lr·0.1^#{m ≤ e}), when it applies; `synthesis.lr` otherwise."""
    if not synthesis.lr_schedule_applies:
        return jnp.asarray(synthesis.lr, jnp.float32)
    passed = jnp.sum(epoch + 1 >= jnp.asarray(synthesis.lr_milestones, jnp.int32))
    return jnp.asarray(synthesis.lr * 0.1 ** passed, jnp.float32)


class Cpsc(Method):
    name = "cpsc"
    CONFIG_RULES = {
        "synthesis.nz": validate.integer(1), "synthesis.ngf": validate.integer(1),
        "synthesis.cbn_epsilon": validate.positive(), "synthesis.reset_adam_every_step": validate.boolean(),
        "synthesis.lr_schedule_applies": validate.boolean(),
        "synthesis.lr_milestones": validate.increasing_integers(1),
        "cpsc.ikd_weight": validate.non_negative(), "cpsc.bn_weight": validate.non_negative(),
        "cpsc.supcon_weight": validate.non_negative(), "cpsc.ce_weight": validate.non_negative(),
        "cpsc.supcon_temperature": validate.positive(), "cpsc.ikd_form": validate.choice(IKD_FORMS),
        "cpsc.ce_on_probabilities": validate.boolean(),
    }
    preview_columns = 10

    def __init__(self, config, teacher, student, mesh):
        super().__init__(config, teacher, student, mesh)
        synthesis, self.weights = config.synthesis, config.cpsc
        self.batch = synthesis.batch_size
        self.generator, _ = Generator.create(
            "cpsc", 0, num_classes=self.num_classes, nz=synthesis.nz, ngf=synthesis.ngf,
            image_size=self.image_shape[0], channels=self.image_shape[2], epsilon=synthesis.cbn_epsilon)
        # Adam without its learning rate: the rate (constant, or the generator's schedule) multiplies it in the step.
        self.adam = optax.scale_by_adam(b1=synthesis.betas[0], b2=synthesis.betas[1])
        self.mean = jnp.asarray(teacher.spec.mean, jnp.float32)
        self.std = jnp.asarray(teacher.spec.std, jnp.float32)
        self.teacher_width, self.student_width = (self.feature_width(network) for network in (teacher, student))
        self.generator_step = jax.jit(self._generator_step, donate_argnums=0)
        self._preview_images = jax.jit(self._preview)

    def feature_width(self, network) -> int:
        """The width of the network's penultimate feature (shapes only, nothing computed)."""
        images = jax.ShapeDtypeStruct((2, *self.image_shape), jnp.float32)
        return jax.eval_shape(lambda x: network.apply(network.init(jax.random.key(0)), x)[0].features,
                              images).shape[-1]

    # ------------------------------------------------------------------------------------------ state and plan
    def init(self, key: jax.Array) -> dict:
        variables = self.generator.init(key)
        return {"generator": variables, "generator_opt": self.adam.init(variables["params"])}

    def plan(self, epoch: int) -> EpochPlan:
        schedule = self.config.schedule
        return EpochPlan(cycles=schedule.cycles, kd_steps=schedule.kd_steps,
                         synthesis_steps=self.config.synthesis.g_steps, synthesis_batch=self.batch)

    def init_extras(self, key: jax.Array) -> dict:
        """The adapter from the student's feature width to the teacher's (PyTorch's default Linear
        initialisation), or none when the widths agree."""
        if self.student_width == self.teacher_width:
            return {}
        d_in, d_out = self.student_width, self.teacher_width
        kernel_1, bias_1, kernel_2, bias_2 = jax.random.split(key, 4)
        init = INITS["torch_default"].linear_kernel
        bias = symmetric_uniform(d_in ** -0.5)
        return {"hidden": {"kernel": init(kernel_1, (d_in, d_in)), "bias": bias(bias_1, (d_in,))},
                "out": {"kernel": init(kernel_2, (d_in, d_out)), "bias": bias(bias_2, (d_out,))}}

    def extras_optimizer(self, student_optimizer):
        return optax.set_to_zero()  # upstream never trains the adapter (see the module docstring)

    # ------------------------------------------------------------------------------------------- generation
    def generate(self, variables: dict, z: jax.Array, labels: jax.Array, train: bool = True):
        """Images for the networks, in [0, 1] space, and the generator's new batch statistics. The generator's output
        is the networks' normalised input; they normalise what they are given, so it is handed over as
        output·std + mean (the same input up to float rounding)."""
        normalised, batch_stats = self.generator.apply(variables, z, labels, train=train)
        return self.batch_constraint(normalised * self.std + self.mean), batch_stats

    # ------------------------------------------------------------------------------------------ losses
    def _cross_entropy(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        if self.weights.ce_on_probabilities:
            return losses.cross_entropy_on_probabilities(logits, labels)
        return losses.cross_entropy(logits, labels)

    def contrast_features(self, student_out, teacher_out, extras: dict) -> jax.Array:
        """[f_s; f_t] (2B, D_t): upstream's `F.normalize` of each penultimate feature, the student's through the
        adapter when there is one (its output is not normalised again)."""
        def normalise(features):
            return features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-12)

        student_features = normalise(student_out.features.astype(jnp.float32))
        if extras:
            hidden = jax.nn.relu(student_features @ extras["hidden"]["kernel"] + extras["hidden"]["bias"])
            student_features = hidden @ extras["out"]["kernel"] + extras["out"]["bias"]
        return jnp.concatenate([student_features, normalise(teacher_out.features.astype(jnp.float32))])

    def generator_loss_terms(self, student_out, teacher_out, labels, extras) -> tuple[jax.Array, dict]:
        """L_G and its terms (the loss as upstream adds them up)."""
        w = self.weights
        terms = {"synthesis/kd": losses.kl_divergence(student_out.logits, teacher_out.logits),
                 "synthesis/ikd": losses.cpsc_ikd_generator(student_out.logits, teacher_out.logits, w.ikd_form),
                 "synthesis/bn": losses.bn_statistics_loss(teacher_out.bn_inputs)[0],
                 "synthesis/supcon": losses.supervised_contrastive(
                     self.contrast_features(student_out, teacher_out, extras), jnp.concatenate([labels, labels]),
                     w.supcon_temperature, normalise=False),
                 "synthesis/ce": self._cross_entropy(teacher_out.logits, labels)}
        loss = (-terms["synthesis/kd"] + w.ikd_weight * terms["synthesis/ikd"] + w.bn_weight * terms["synthesis/bn"]
                + w.supcon_weight * terms["synthesis/supcon"] + w.ce_weight * terms["synthesis/ce"])
        return loss, terms

    def student_loss(self, student_out, teacher_out, batch, extras, synth):
        w = self.weights
        terms = {"kd/kd": losses.kl_divergence(student_out.logits, teacher_out.logits),
                 "kd/ikd": losses.cpsc_ikd_student(student_out.logits, teacher_out.logits, w.ikd_form),
                 "kd/ce": self._cross_entropy(student_out.logits, batch["labels"])}
        loss = terms["kd/kd"] + w.ikd_weight * terms["kd/ikd"] + w.ce_weight * terms["kd/ce"]
        return loss, terms, synth

    # ----------------------------------------------------------------------------------- the generator step
    def generator_update(self, generator_variables: dict, generator_opt, student_variables: dict, extras: dict,
                         teacher_variables: dict, z: jax.Array, labels: jax.Array, learning_rate: jax.Array):
        """The pure core of one generator step on given draws (the parity tests call it): returns the generator's
        variables and optimizer state, the student's batch statistics, L_G, its terms and the gradient."""

        def loss_fn(params):
            images, generator_stats = self.generate({"params": params,
                                                     "batch_stats": generator_variables["batch_stats"]}, z, labels)
            teacher_out, _ = self.teacher.apply(teacher_variables, images, train=False)
            student_out, student_stats = self.student.apply(student_variables, images, train=True)
            loss, terms = self.generator_loss_terms(student_out, teacher_out, labels, extras)
            return loss, (generator_stats, student_stats, terms)

        params = generator_variables["params"]
        (loss, (generator_stats, student_stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        if self.config.synthesis.reset_adam_every_step:  # a new Adam per step, as upstream
            generator_opt = self.adam.init(params)
        updates, generator_opt = self.adam.update(grads, generator_opt, params)
        params = optax.apply_updates(params, jax.tree_util.tree_map(lambda u: -learning_rate * u, updates))
        return ({"params": params, "batch_stats": generator_stats}, generator_opt, student_stats, loss, terms,
                grads)

    def _generator_step(self, state: State, teacher_variables: dict) -> tuple[State, dict]:
        rng, draw_key = jax.random.split(state["rng"])
        z, labels = self.draw_noise_and_labels(draw_key, self.batch)
        synth = state["synth"]
        learning_rate = generator_learning_rate(self.config.synthesis, state["epoch"])
        generator, generator_opt, student_stats, loss, terms, _ = self.generator_update(
            synth["generator"], synth["generator_opt"], state["student"], state["extras"], teacher_variables, z,
            labels, learning_rate)
        state = state | {"rng": rng, "synth": synth | {"generator": generator, "generator_opt": generator_opt},
                         "student": state["student"] | {"batch_stats": student_stats}}
        return self.constrain(state), {"synthesis/loss": loss, "synthesis/lr": learning_rate, **terms}

    def synthesize(self, state: State, teacher_variables: dict, epoch: int, on_step=None) -> tuple[State, dict]:
        return run_steps(self.generator_step, state, teacher_variables, self.config.synthesis.g_steps, self.batch,
                         on_step)

    # ----------------------------------------------------------------------------------- the student's batch
    def student_batch(self, synth: dict, key: jax.Array) -> tuple[dict, dict]:
        """Fresh samples of the generator in train mode (its running statistics move, as upstream's do), with the
        labels they were made for."""
        z, labels = self.draw_noise_and_labels(key, self.config.student.batch_size)
        images, generator_stats = self.generate(synth["generator"], z, labels)
        synth = synth | {"generator": synth["generator"] | {"batch_stats": generator_stats}}
        return {"images": jax.lax.stop_gradient(images), "labels": labels}, synth

    # ------------------------------------------------------------------------------------------ preview
    def _preview(self, variables: dict) -> tuple[jax.Array, jax.Array]:
        classes = min(self.num_classes, 20)
        labels = jnp.repeat(jnp.arange(classes, dtype=jnp.int32), 10)
        z = jax.random.normal(jax.random.PRNGKey(0), (labels.shape[0], self.config.synthesis.nz))
        # eval mode, as upstream draws its image grids: the generator's running statistics
        images, _ = self.generator.apply(variables, z, labels, train=False)
        return jnp.clip(images * self.std + self.mean, 0, 1), labels

    def preview(self, state: State):
        images, labels = distributed.fetch(self._preview_images(state["synth"]["generator"]))
        return grid_by_class(images, labels, self.num_classes)
