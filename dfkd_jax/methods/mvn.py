"""MVN soft-targeted transfer-set synthesis (Zi Wang, AAAI 2021; methods.md §7): a transfer set made from the
teacher's classifier alone, then distilled on.

The teacher's last hidden features (the classifier's input) are modelled as a multivariate normal N(μ, Σ) whose
covariance comes from the classifier's weights W (K × d): R_ij = cosine similarity of columns i and j of W (how the
classifier uses feature dimensions i and j together), Σ = σ²·R + εI. Features f = μ + L·z, z ~ N(0, I_d), L the
Cholesky factor of Σ (R, Σ and L computed once, in float64, on the host), give soft targets
y = softmax((W f + b)/τ). A batch of pixels, uniform in [0, 1], then takes `g_steps` Adam steps on

    L(x) = τ²·CE(softmax(T(x)/τ), y) + λ_a·(−mean |f_T(x)|)

(f_T the teacher's penultimate features), each step followed by a clip to [0, 1]. The final images go to the pool with
label argmax y, and the soft targets beside them (`synth["soft_targets"]`, same slots). Schedule: the first
`schedule.synthesis_epochs` epochs only synthesise (`synthesis.transfer_set` images, rounded up to whole batches,
spread over those epochs); the remaining epochs only distil, KL_τ(S(x), T(x)) on crop + flip draws from the pool.

The pixels live in image space ([0, 1], the networks normalise inside), so the uniform initialisation and the clip
are the literal [0, 1] box and the pool stores the optimised variable itself.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dfkd_jax import distributed, losses, parallel, pool, validate
from dfkd_jax.methods.base import EpochPlan, Method, State, grid_by_class, run_steps
from dfkd_jax.models import Network, zoo

MEANS = ("zero",)


# ================================================================================ the feature model (host, float64)

def classifier_weights(teacher: Network, teacher_variables: dict) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's classifier as (W (K, d), b (K,)) in float64: the Dense layer the zoo names for its architecture
    (`linear`, `fc` or `classifier`; Flax's kernel is (d, K), so W = kernel.T). Checks d against the width of the
    features `Network.apply` returns."""
    head = zoo.get(teacher.spec.arch).head
    classes = teacher.spec.num_classes
    params = nnx.to_pure_dict(teacher_variables["params"])
    layer = params.get(head)
    kernel = layer.get("kernel") if isinstance(layer, dict) else None
    if kernel is None or np.ndim(kernel) != 2 or np.shape(kernel)[1] != classes:
        raise ValueError(f"MVN needs the teacher's classifier: the {teacher.spec.arch} teacher's params have no Dense "
                         f"layer {head!r} with a (d, {classes}) kernel (top-level entries: "
                         f"{', '.join(sorted(map(str, params)))})")
    kernel = np.asarray(jax.device_get(kernel), np.float64)
    bias = layer.get("bias")
    bias = np.zeros(classes) if bias is None else np.asarray(jax.device_get(bias), np.float64)
    image_shape = (32, 32, 3)  # the features are globally pooled: their width does not depend on the size
    features = jax.eval_shape(lambda v, x: teacher.apply(v, x)[0].features, teacher_variables,
                              jax.ShapeDtypeStruct((2, *image_shape), jnp.float32))
    if features.shape[-1] != kernel.shape[0]:
        raise ValueError(f"the {teacher.spec.arch} teacher's classifier {head!r} takes {kernel.shape[0]} features but "
                         f"its forward pass returns {features.shape[-1]}")
    return kernel.T, bias


def feature_correlation(weight_kd: np.ndarray) -> np.ndarray:
    """R (d, d): R_ij = cos(W[:, i], W[:, j]), the cosine similarity of columns i and j of W (K, d). A column of
    zeros (a feature the classifier ignores) is uncorrelated with the others; R's diagonal is 1."""
    weight = np.asarray(weight_kd, np.float64)
    norms = np.linalg.norm(weight, axis=0, keepdims=True)
    columns = weight / np.where(norms > 0, norms, 1.0)
    correlation = columns.T @ columns
    np.fill_diagonal(correlation, 1.0)
    return correlation


@dataclasses.dataclass(frozen=True)
class FeatureModel:
    """N(mean, covariance) over the classifier's input, with the classifier itself; float64 host arrays."""

    weight: np.ndarray  # (K, d)
    bias: np.ndarray  # (K,)
    mean: np.ndarray  # (d,)
    covariance: np.ndarray  # (d, d) = σ²·R + εI
    cholesky: np.ndarray  # (d, d) lower triangular, L·Lᵀ = covariance

    def device_arrays(self) -> dict:
        """The float32 arrays the jitted sampler takes."""
        return {name: jnp.asarray(getattr(self, name), jnp.float32) for name in ("weight", "bias", "mean",
                                                                                 "cholesky")}


def feature_model(weight_kd: np.ndarray, bias_k: np.ndarray, sigma: float, epsilon: float,
                  mean: str = "zero") -> FeatureModel:
    """Σ = σ²·R + εI from the classifier's weights and its Cholesky factor, in float64. μ = 0 (`mean="zero"`)."""
    if mean not in MEANS:
        raise ValueError(f"mvn.mean must be one of {MEANS}, got {mean!r}")
    weight = np.asarray(weight_kd, np.float64)
    dim = weight.shape[1]
    covariance = sigma ** 2 * feature_correlation(weight) + epsilon * np.eye(dim)
    return FeatureModel(weight, np.asarray(bias_k, np.float64), np.zeros(dim), covariance,
                        np.linalg.cholesky(covariance))


def draw_soft_targets(key: jax.Array, count: int, sampler: dict, temperature: float) -> tuple[jax.Array, jax.Array]:
    """(features (count, d), soft targets (count, K)): f = μ + L·z with z ~ N(0, I_d) drawn jointly for all classes,
    y = softmax((W f + b)/τ). `sampler` is `FeatureModel.device_arrays()`."""
    dim = sampler["cholesky"].shape[0]
    z = jax.random.normal(key, (count, dim), jnp.float32)
    features = sampler["mean"] + z @ sampler["cholesky"].T
    logits = features @ sampler["weight"].T + sampler["bias"]
    return features, jax.nn.softmax(logits / temperature, axis=-1)


# ============================================================================================== the method

class Mvn(Method):
    name = "mvn"
    batch_sharded = ("pixels", "pixel_opt", "targets", "pool", "soft_targets")
    CONFIG_RULES = {"synthesis.transfer_set": validate.integer(1), "schedule.synthesis_epochs": validate.integer(1),
                    "mvn.sigma": validate.positive(), "mvn.epsilon": validate.positive(),
                    "mvn.mean": validate.choice(MEANS), "mvn.temperature": validate.positive(),
                    "mvn.activation_weight": validate.non_negative(),
                    "mvn.ce_temperature_squared": validate.boolean()}
    preview_columns = 10

    def __init__(self, config, teacher, student, mesh):
        super().__init__(config, teacher, student, mesh)
        synthesis = config.synthesis
        self.batch = synthesis.batch_size
        self.batches = transfer_batches(config)
        self.optimizer = optax.adam(synthesis.lr, b1=synthesis.betas[0], b2=synthesis.betas[1])
        self._sampler = None  # the feature model's device arrays, from the (frozen) teacher at the first synthesis
        self.start_round = jax.jit(self._start_round, donate_argnums=0)
        self.pixel_step = jax.jit(self._pixel_step, donate_argnums=0)
        self.end_round = jax.jit(self._end_round, donate_argnums=0)

    @classmethod
    def check_config(cls, config) -> None:
        schedule = config.schedule
        if schedule.synthesis_epochs >= schedule.epochs:
            raise validate.ConfigError(
                f"config.schedule.synthesis_epochs = {schedule.synthesis_epochs} is out of range: it must be < "
                f"config.schedule.epochs ({schedule.epochs}), so that the student distils after the transfer set is "
                "made (--config.schedule.synthesis_epochs=...)")
        batches = transfer_batches(config)
        if schedule.synthesis_epochs > batches:
            raise validate.ConfigError(
                f"config.schedule.synthesis_epochs = {schedule.synthesis_epochs} is out of range: it must be <= the "
                f"{batches} synthesis batches of the transfer set (config.synthesis.transfer_set = "
                f"{config.synthesis.transfer_set} in batches of {config.synthesis.batch_size}) "
                "(--config.schedule.synthesis_epochs=...)")
        if schedule.kd_steps < 1:
            raise validate.ConfigError(
                f"config.schedule.kd_steps = {schedule.kd_steps} is out of range: it must be >= 1, the student's "
                "steps per distillation epoch (--config.schedule.kd_steps=...)")

    # ---------------------------------------------------------------------------------------------- state
    def init(self, key: jax.Array) -> dict:
        del key
        capacity = self.pool_capacity(self.batches, self.batch)
        pixels = {"pixels": jnp.zeros((self.batch, *self.image_shape))}
        return {"pixels": pixels, "pixel_opt": self.optimizer.init(pixels),
                "targets": jnp.zeros((self.batch, self.num_classes), jnp.float32),
                "pool": pool.create(capacity, self.image_shape, self.config.pool.dtype),
                "soft_targets": jnp.zeros((capacity, self.num_classes), jnp.float32)}

    def plan(self, epoch: int) -> EpochPlan:
        synthesis_epochs = self.config.schedule.synthesis_epochs
        if epoch < synthesis_epochs:
            # The transfer set's batches spread over the synthesis epochs, the first ones taking one more.
            cycles = self.batches // synthesis_epochs + int(epoch < self.batches % synthesis_epochs)
            return EpochPlan(cycles=cycles, kd_steps=0, synthesis_steps=self.config.synthesis.g_steps,
                             synthesis_batch=self.batch)
        return EpochPlan(cycles=1, kd_steps=self.config.schedule.kd_steps, synthesis_steps=0,
                         synthesis_batch=self.batch)

    # ------------------------------------------------------------------------------------------ synthesis
    def sampler(self, teacher_variables: dict) -> dict:
        """The feature model's float32 arrays on the mesh, computed once (float64, host) from the teacher."""
        if self._sampler is None:
            weight, bias = classifier_weights(self.teacher, teacher_variables)
            mvn = self.config.mvn
            model = feature_model(weight, bias, mvn.sigma, mvn.epsilon, mvn.mean)
            self._sampler = jax.device_put(model.device_arrays(), parallel.replicated(self.mesh))
        return self._sampler

    def synthesize(self, state: State, teacher_variables: dict, epoch: int, on_step=None) -> tuple[State, dict]:
        if self.plan(epoch).synthesis_steps == 0:  # a distillation epoch: the transfer set is made
            return state, {}
        state = self.start_round(state, self.sampler(teacher_variables))
        state, metrics = run_steps(self.pixel_step, state, teacher_variables, self.config.synthesis.g_steps,
                                   self.batch, on_step)
        state, round_metrics = self.end_round(state, teacher_variables)
        return state, metrics | jax.device_get(round_metrics)

    def _start_round(self, state: State, sampler: dict) -> State:
        """Fresh soft targets and pixels uniform in [0, 1], with a fresh Adam state."""
        rng, pixels_key, targets_key = jax.random.split(state["rng"], 3)
        _, targets = draw_soft_targets(targets_key, self.batch, sampler, self.config.mvn.temperature)
        pixels = {"pixels": self.batch_constraint(jax.random.uniform(pixels_key, (self.batch, *self.image_shape)))}
        synth = state["synth"] | {"pixels": pixels, "pixel_opt": self.optimizer.init(pixels),
                                  "targets": self.batch_constraint(targets)}
        return self.constrain(state | {"rng": rng, "synth": synth})

    def pixel_loss(self, pixels: dict, targets_bk: jax.Array, teacher_variables: dict) -> tuple[jax.Array, dict]:
        """τ²·CE(softmax(T(x)/τ), y) + λ_a·(−mean |f_T(x)|) of the images `pixels["pixels"]` (in [0, 1])."""
        mvn = self.config.mvn
        teacher_out, _ = self.teacher.apply(teacher_variables, pixels["pixels"], train=False)
        terms = {"synthesis/ce": losses.cross_entropy(teacher_out.logits / mvn.temperature, targets_bk),
                 "synthesis/activation": losses.dafl_activation(teacher_out.features)}
        ce_scale = mvn.temperature ** 2 if mvn.ce_temperature_squared else 1.0
        loss = ce_scale * terms["synthesis/ce"] + mvn.activation_weight * terms["synthesis/activation"]
        return loss, terms

    def pixel_update(self, pixels: dict, pixel_opt, targets_bk: jax.Array, teacher_variables: dict):
        """One Adam step on the pixels, then the clip to [0, 1]: the core of a synthesis step (the PyTorch parity
        test calls it directly). Returns (pixels, optimizer state, loss, terms)."""
        (loss, terms), grads = jax.value_and_grad(self.pixel_loss, has_aux=True)(pixels, targets_bk,
                                                                                teacher_variables)
        updates, pixel_opt = self.optimizer.update(grads, pixel_opt, pixels)
        new_pixels = {"pixels": jnp.clip(optax.apply_updates(pixels, updates)["pixels"], 0.0, 1.0)}
        return new_pixels, pixel_opt, loss, terms

    def _pixel_step(self, state: State, teacher_variables: dict) -> tuple[State, dict]:
        synth = state["synth"]
        pixels, pixel_opt, loss, terms = self.pixel_update(synth["pixels"], synth["pixel_opt"], synth["targets"],
                                                           teacher_variables)
        synth = synth | {"pixels": pixels, "pixel_opt": pixel_opt}
        return self.constrain(state | {"synth": synth}), {"synthesis/loss": loss, **terms}

    def _end_round(self, state: State, teacher_variables: dict) -> tuple[State, dict]:
        """The final images into the pool with label argmax y, their soft targets into the same slots; how well
        the teacher's softmax at τ matches the targets."""
        synth = state["synth"]
        images, targets = synth["pixels"]["pixels"], synth["targets"]
        teacher_out, _ = self.teacher.apply(teacher_variables, images, train=False)
        capacity = synth["soft_targets"].shape[0]
        slots = (synth["pool"]["next"] + jnp.arange(self.batch)) % capacity  # where `pool.add` writes the batch
        labels = jnp.argmax(targets, axis=-1).astype(jnp.int32)
        new_pool = pool.add(synth["pool"], images, labels)
        synth = synth | {"pool": new_pool, "soft_targets": synth["soft_targets"].at[slots].set(targets)}
        metrics = {"synthesis/target_kl": losses.soft_target_kl(teacher_out.logits, targets,
                                                                self.config.mvn.temperature),
                   "synthesis/target_agreement": jnp.mean(jnp.argmax(teacher_out.logits, axis=-1) == labels),
                   "pool/size": new_pool["count"]}
        return self.constrain(state | {"synth": synth}), metrics

    # ------------------------------------------------------------------------------------------- student
    def student_batch(self, synth: dict, key: jax.Array) -> tuple[dict, dict]:
        batch, synth_pool = self.sample_pool(synth["pool"], key)
        return batch, synth | {"pool": synth_pool}

    def preview(self, state: State):
        """The newest kept batch, one row per label (argmax of its soft target)."""
        synth = distributed.fetch({"images": state["synth"]["pixels"]["pixels"], "targets": state["synth"]["targets"]})
        return grid_by_class(synth["images"], np.argmax(synth["targets"], axis=-1), self.num_classes)


def transfer_batches(config) -> int:
    """Synthesis batches that make the transfer set: ceil(transfer_set / batch) (the last one whole)."""
    return math.ceil(config.synthesis.transfer_set / config.synthesis.batch_size)
