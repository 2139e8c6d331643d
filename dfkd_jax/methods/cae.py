"""CAE-DFKD (Category-Aware Embedding DFKD, arXiv 2504.21478, DAC 2025): NAYER at the embedding level.

Two changes to NAYER (methods/nayer.py), each switchable for the ablations:
- CEND, category embedding noise diffusion (config.cend): the generator is fed each target's label embedding
  perturbed by one of N noise sources, e_{n,c} = e_c + M_n ⊙ q_n, with a learnable magnitude vector M_n per source
  trained with the generator (models/generators.py `CaeGenerator`, `draw_category_noise`).
- CNCL, category noise contrastive learning (config.cncl): the student's penultimate embedding, through a 2-layer
  MLP projection head trained with the student (a trainable extra, never exported), is pulled together for images
  of the same category (made from different noise draws of its embedding) and apart for other categories: SupCon
  with the labels the pool kept (losses.supervised_contrastive). The student loss is KL_τ + λ·CNCL.
The generator loss is NAYER's (BN + CE + adversarial). No code of the paper exists; every choice it leaves open is
a config field, listed in configs/cae.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dfkd_jax import losses, validate
from dfkd_jax.methods.base import State, class_balanced_targets
from dfkd_jax.methods.nayer import Nayer
from dfkd_jax.models.generators import NOISE_SOURCES, Generator, draw_category_noise
from dfkd_jax.models.layers import INITS, symmetric_uniform


class Cae(Nayer):
    name = "cae"
    CONFIG_RULES = Nayer.CONFIG_RULES | {
        "cend.enabled": validate.boolean(), "cend.sources": validate.distinct_subset_of(NOISE_SOURCES),
        "cend.init_magnitude": validate.non_negative(), "cend.learnable": validate.boolean(),
        "cend.assign": validate.choice(("random", "cycle")), "cend.redraw": validate.choice(("step", "round")),
        "cncl.weight": validate.non_negative(), "cncl.temperature": validate.positive(),
        "cncl.projection_dim": validate.integer(1), "cncl.hidden_dim": validate.integer(0),
        "cncl.views": validate.integer(1),
    }

    @classmethod
    def check_config(cls, config) -> None:
        if config.synthesis.batch_size % config.cncl.views:
            raise validate.ConfigError(
                f"config.synthesis.batch_size = {config.synthesis.batch_size} is out of range: it must be a multiple "
                f"of config.cncl.views ({config.cncl.views}) (--config.synthesis.batch_size=...)")

    def __init__(self, config, teacher, student, mesh):
        self.check_config(config)
        self.cend, self.cncl = config.cend, config.cncl
        super().__init__(config, teacher, student, mesh)
        self.feature_dim = jax.eval_shape(
            lambda v, x: student.apply(v, x)[0].features, student.init(jax.random.key(0)),
            jax.ShapeDtypeStruct((2, *self.image_shape), jnp.float32)).shape[-1]

    # ------------------------------------------------------------------------------------------ CEND
    def make_generator(self) -> Generator:
        if not self.cend.enabled:
            return super().make_generator()
        synthesis = self.config.synthesis
        return Generator.create(
            "cae", 0, embedding_size=self.embeddings.shape[1], batch_size=self.batch, chunk=self.num_classes,
            num_sources=len(self.cend.sources), init_magnitude=self.cend.init_magnitude,
            learnable=self.cend.learnable, noisy_size=synthesis.noisy_size, ngf=synthesis.ngf,
            image_size=self.image_shape[0], channels=self.image_shape[2])[0]

    def init(self, key: jax.Array) -> dict:
        synth = super().init(key)
        # The round's noise key: with cend.redraw = "round" every step of a round sees the same noise draw.
        synth["round"]["noise_key"] = jax.random.PRNGKey(0)
        return synth

    def _start_round(self, state: State) -> State:
        state = super()._start_round(state)
        if not (self.cend.enabled and self.cend.redraw == "round"):
            return state
        rng, noise_key = jax.random.split(state["rng"])
        synth = state["synth"]
        synth = synth | {"round": synth["round"] | {"noise_key": noise_key}}
        return self.constrain(state | {"rng": rng, "synth": synth})

    def step_noise_key(self, round_state: dict, augment_key: jax.Array) -> jax.Array:
        if self.cend.redraw == "round":
            return round_state["noise_key"]
        return super().step_noise_key(round_state, augment_key)

    def generator_inputs(self, targets: jax.Array, noise_key: jax.Array | None):
        embeddings = super().generator_inputs(targets, noise_key)
        if not self.cend.enabled:
            return embeddings
        draws = draw_category_noise(noise_key, targets.shape[0], embeddings.shape[1], tuple(self.cend.sources),
                                    self.cend.assign)
        return {"embeddings": embeddings, "noise": self.batch_constraint(draws["noise"]),
                "source": self.batch_constraint(draws["source"])}

    def synthesize(self, state: State, teacher_variables: dict, epoch: int, on_step=None) -> tuple[State, dict]:
        state, metrics = super().synthesize(state, teacher_variables, epoch, on_step)
        if self.cend.enabled:  # the learned magnitudes M_n, mean |M_n| over dimensions, one per source
            magnitudes = np.asarray(jax.device_get(state["synth"]["generator"]["params"]["cend"]["magnitudes"][...]))
            metrics |= {f"synthesis/cend_magnitude/{source}": float(np.mean(np.abs(m)))
                        for source, m in zip(self.cend.sources, magnitudes, strict=True)}
        return state, metrics

    # ------------------------------------------------------------------------- views of each category
    def round_targets(self, key: jax.Array) -> jax.Array:
        """Class-balanced targets for B / views samples, repeated `views` times: rows i, i + B/views, ... are views
        of one target made from different noise draws (NAYER's own targets when B/views is a multiple of K)."""
        views = self.cncl.views
        return jnp.tile(class_balanced_targets(key, self.batch // views, self.num_classes), views)

    def pool_groups(self, synth: dict) -> jax.Array:
        """The views of one target share a group id, unique in the pool until its slots are reused."""
        views = self.cncl.views
        return synth["pool"]["next"] + jnp.tile(jnp.arange(self.batch // views, dtype=jnp.int32), views)

    # ------------------------------------------------------------------------------------------ CNCL
    def init_extras(self, key: jax.Array) -> dict:
        """The projection head, f → Linear(D, H) → ReLU → Linear(H, P), PyTorch's default Linear initialisation;
        none when CNCL is off."""
        if self.cncl.weight == 0:
            return {}
        hidden = self.cncl.hidden_dim or self.feature_dim
        first_key, first_bias, second_key, second_bias = jax.random.split(key, 4)
        init = INITS["torch_default"].linear_kernel
        return {"hidden": {"kernel": init(first_key, (self.feature_dim, hidden)),
                           "bias": symmetric_uniform(self.feature_dim ** -0.5)(first_bias, (hidden,))},
                "out": {"kernel": init(second_key, (hidden, self.cncl.projection_dim)),
                        "bias": symmetric_uniform(hidden ** -0.5)(second_bias, (self.cncl.projection_dim,))}}

    def project(self, extras: dict, features_bd: jax.Array) -> jax.Array:
        hidden = jax.nn.relu(features_bd @ extras["hidden"]["kernel"] + extras["hidden"]["bias"])
        return hidden @ extras["out"]["kernel"] + extras["out"]["bias"]

    def student_loss(self, student_out, teacher_out, batch, extras, synth):
        kl = losses.kl_divergence(student_out.logits, teacher_out.logits, self.config.student.temperature)
        if self.cncl.weight == 0:
            return kl, {"kd/kl": kl}, synth
        cncl = losses.supervised_contrastive(self.project(extras, student_out.features), batch["labels"],
                                             self.cncl.temperature)
        return kl + self.cncl.weight * cncl, {"kd/kl": kl, "kd/cncl": cncl}, synth
