"""CGDD (Yan et al., arXiv 2112.15358): a class-conditional generator trained alternately with the student, preset
labels used as ground truth, and attention transfer (methods.md §6; no public code, so every choice below is the
project's, each a field of configs/cgdd.py).

Per epoch, `schedule.cycles` iterations of
- `synthesis.g_steps` generator steps (5): fresh z ~ N(0, I) and preset labels y drawn uniformly; the generator is
  DCGAN-small fed z ⊙ E[y] (a K×nz label embedding, `ConditionalDCGANGenerator`); teacher in eval mode, student in
  train mode (its batch statistics move, as DFAD's do):
      L_G = ce·CE(t, y) + bn·BN − adv·mean|t − s|,
  BN = DeepInversion's statistics term on the teacher's BatchNorm inputs, the last DFAD's adversarial L1;
- `schedule.kd_steps` student steps (5) on fresh samples with their labels (no pool):
      L_S = KL_τ(s, t) + ce·CE(s, y) + β/2 · Σ_j AT_j,
  KL at τ = 4 with τ², AT_j the attention-transfer distance at the end of residual stage j (`losses.attention_transfer`,
  Zagoruyko & Komodakis with p = 2; the form of their code by default, β = 1000 as there). Teacher and student pair
  their stages one to one; where a pair's spatial sizes differ, the larger map is average-pooled to the smaller (the
  He ResNets 20/56 and WRN-16 share stage sizes, as do ResNet-34/18; a student with another number of stages than
  its teacher is refused before anything is written).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dfkd_jax import distributed, losses, validate
from dfkd_jax.methods.base import EpochPlan, Method, State, grid_by_class, run_steps
from dfkd_jax.models import Network, NetworkSpec
from dfkd_jax.models.generators import Generator


def stage_sizes(spec: NetworkSpec, image_shape: tuple[int, ...]) -> list[int]:
    """The spatial size at the end of each of the network's stages (shapes only, nothing computed)."""
    network, variables = Network.abstract(spec)
    images = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
    out = jax.eval_shape(lambda v, x: network.apply(v, x)[0], variables, images)
    return [stage.shape[1] for stage in out.stages]


def check_stages_pair(teacher: NetworkSpec, student: NetworkSpec, image_shape: tuple[int, ...]) -> None:
    """Attention transfer pairs stages one to one: refuse a pair whose stage counts differ or whose sizes do not
    divide one another (the larger map is pooled to the smaller)."""
    teacher_sizes, student_sizes = stage_sizes(teacher, image_shape), stage_sizes(student, image_shape)
    if len(teacher_sizes) != len(student_sizes) or any(max(a, b) % min(a, b)
                                                       for a, b in zip(teacher_sizes, student_sizes)):
        raise validate.ConfigError(
            f"attention transfer pairs the student's stages with the teacher's: the teacher {teacher.arch} ends its "
            f"stages at sizes {teacher_sizes}, the student {student.arch} at {student_sizes}; pick a student with "
            f"as many stages (--config.student.arch=...) or switch attention transfer off (--config.cgdd.at_weight=0)")


class Cgdd(Method):
    name = "cgdd"
    CONFIG_RULES = {
        "synthesis.nz": validate.integer(1), "synthesis.ngf": validate.integer(1),
        "cgdd.ce_weight": validate.non_negative(), "cgdd.bn_weight": validate.non_negative(),
        "cgdd.adv_weight": validate.non_negative(), "cgdd.student_ce_weight": validate.non_negative(),
        "cgdd.at_weight": validate.non_negative(), "cgdd.at_form": validate.choice(losses.AT_FORMS),
    }
    preview_columns = 10

    def __init__(self, config, teacher, student, mesh):
        super().__init__(config, teacher, student, mesh)
        synthesis, self.weights = config.synthesis, config.cgdd
        self.batch = synthesis.batch_size
        self.generator, _ = Generator.create(
            "conditional_dcgan", 0, num_classes=self.num_classes, nz=synthesis.nz, ngf=synthesis.ngf,
            image_size=self.image_shape[0], channels=self.image_shape[2])
        self.optimizer = optax.adam(synthesis.lr, b1=synthesis.betas[0], b2=synthesis.betas[1])
        if self.weights.at_weight:
            check_stages_pair(teacher.spec, student.spec, self.image_shape)
        self.generator_step = jax.jit(self._generator_step, donate_argnums=0)
        self._preview_images = jax.jit(self._preview)

    @classmethod
    def check_config(cls, config) -> None:
        """Before anything is written: the teacher's and the student's stages must pair for attention transfer
        (checked again on the loaded teacher, whose architecture a converted directory only tells then)."""
        if config.cgdd.at_weight and config.teacher.source != "converted":
            teacher = NetworkSpec(config.teacher.arch, 10, dict(config.teacher.options))
            student = NetworkSpec(config.student.arch, 10, dict(config.student.options))
            check_stages_pair(teacher, student, tuple(config.data.image_shape))

    # ------------------------------------------------------------------------------------------ state and plan
    def init(self, key: jax.Array) -> dict:
        variables = self.generator.init(key)
        return {"generator": variables, "generator_opt": self.optimizer.init(variables["params"])}

    def plan(self, epoch: int) -> EpochPlan:
        schedule = self.config.schedule
        return EpochPlan(cycles=schedule.cycles, kd_steps=schedule.kd_steps,
                         synthesis_steps=self.config.synthesis.g_steps, synthesis_batch=self.batch)

    # ------------------------------------------------------------------------------------------- generation
    def generate(self, variables: dict, z: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
        """Images in [0, 1] (the generator's sigmoid output) and the generator's new batch statistics."""
        images, batch_stats = self.generator.apply(variables, z, labels, train=True)
        return self.batch_constraint(images), batch_stats

    # ------------------------------------------------------------------------------------------ losses
    def generator_loss_terms(self, student_out, teacher_out, labels) -> tuple[jax.Array, dict]:
        w = self.weights
        terms = {"synthesis/ce": losses.cross_entropy(teacher_out.logits, labels),
                 "synthesis/bn": losses.bn_statistics_loss(teacher_out.bn_inputs)[0],
                 "synthesis/adv": losses.adversarial_l1(student_out.logits, teacher_out.logits)}
        loss = (w.ce_weight * terms["synthesis/ce"] + w.bn_weight * terms["synthesis/bn"]
                + w.adv_weight * terms["synthesis/adv"])
        # How often the teacher sees the preset label (a measurement, no gradient): what L_G's CE is for.
        terms["synthesis/label_match"] = jnp.mean(jnp.argmax(teacher_out.logits, -1) == labels)
        return loss, terms

    def student_loss(self, student_out, teacher_out, batch, extras, synth):
        w = self.weights
        terms = {"kd/kl": losses.kl_divergence(student_out.logits, teacher_out.logits,
                                               self.config.student.temperature),
                 "kd/ce": losses.cross_entropy(student_out.logits, batch["labels"])}
        loss = terms["kd/kl"] + w.student_ce_weight * terms["kd/ce"]
        if w.at_weight:
            terms["kd/at"] = losses.attention_transfer(student_out.stages, teacher_out.stages, w.at_form)
            loss = loss + w.at_weight / 2 * terms["kd/at"]  # β/2, as the AT paper's eq. 2 and its code
        return loss, terms, synth

    # ----------------------------------------------------------------------------------- the generator step
    def generator_update(self, generator_variables: dict, generator_opt, student_variables: dict,
                         teacher_variables: dict, z: jax.Array, labels: jax.Array):
        """The pure core of one generator step on given draws: the generator's variables and optimizer state, the
        student's batch statistics, L_G and its terms."""

        def loss_fn(params):
            images, generator_stats = self.generate({"params": params,
                                                     "batch_stats": generator_variables["batch_stats"]}, z, labels)
            teacher_out, _ = self.teacher.apply(teacher_variables, images, train=False)
            student_out, student_stats = self.student.apply(student_variables, images, train=True)
            loss, terms = self.generator_loss_terms(student_out, teacher_out, labels)
            return loss, (generator_stats, student_stats, terms)

        params = generator_variables["params"]
        (loss, (generator_stats, student_stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, generator_opt = self.optimizer.update(grads, generator_opt, params)
        return ({"params": optax.apply_updates(params, updates), "batch_stats": generator_stats}, generator_opt,
                student_stats, loss, terms)

    def _generator_step(self, state: State, teacher_variables: dict) -> tuple[State, dict]:
        rng, draw_key = jax.random.split(state["rng"])
        z, labels = self.draw_noise_and_labels(draw_key, self.batch)
        synth = state["synth"]
        generator, generator_opt, student_stats, loss, terms = self.generator_update(
            synth["generator"], synth["generator_opt"], state["student"], teacher_variables, z, labels)
        state = state | {"rng": rng, "synth": synth | {"generator": generator, "generator_opt": generator_opt},
                         "student": state["student"] | {"batch_stats": student_stats}}
        return self.constrain(state), {"synthesis/loss": loss, **terms}

    def synthesize(self, state: State, teacher_variables: dict, epoch: int, on_step=None) -> tuple[State, dict]:
        return run_steps(self.generator_step, state, teacher_variables, self.config.synthesis.g_steps, self.batch,
                         on_step)

    # ----------------------------------------------------------------------------------- the student's batch
    def student_batch(self, synth: dict, key: jax.Array) -> tuple[dict, dict]:
        """Fresh samples with the labels they were generated for (the generator in train mode; its running
        statistics are left as the generator steps moved them, as for DAFL/DFAD)."""
        z, labels = self.draw_noise_and_labels(key, self.config.student.batch_size)
        images, _ = self.generate(synth["generator"], z, labels)
        return {"images": jax.lax.stop_gradient(images), "labels": labels}, synth

    # ------------------------------------------------------------------------------------------ preview
    def _preview(self, variables: dict) -> tuple[jax.Array, jax.Array]:
        classes = min(self.num_classes, 20)
        labels = jnp.repeat(jnp.arange(classes, dtype=jnp.int32), 10)
        z = jax.random.normal(jax.random.PRNGKey(0), (labels.shape[0], self.config.synthesis.nz))
        images, _ = self.generator.apply(variables, z, labels, train=True)  # as the student sees them
        return images, labels

    def preview(self, state: State):
        images, labels = distributed.fetch(self._preview_images(state["synth"]["generator"]))
        return grid_by_class(images, labels, self.num_classes)
