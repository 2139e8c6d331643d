"""The loss terms of every DFKD method, as small pure functions that run inside `jax.jit` on batches sharded over
the device mesh. Each computes in float32 and follows the upstream PyTorch code it names (CMI/Fast/NAYER `kldiv`,
DeepInversion's BN hook and image priors, DAFL, DFAD, CPSC-DFKD); a method is a config that composes them. Logits are (B, K),
images NHWC; every function returns a scalar unless its docstring says otherwise.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from dfkd_jax.models import BNInput
from dfkd_jax.models.layers import batch_moments

BNEma = dict[str, Any]  # {"mean": [(C,) per layer], "var": [(C,) per layer], "valid": () bool}


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _l2_norm(x: jax.Array) -> jax.Array:
    """‖x‖₂ over all elements, with gradient 0 at x = 0 as PyTorch's `torch.norm` has (jnp.linalg.norm's is NaN,
    which a constant image would hit in the total-variation prior)."""
    squared = jnp.sum(jnp.square(x))
    is_zero = squared == 0
    return jnp.where(is_zero, 0.0, jnp.sqrt(jnp.where(is_zero, 1.0, squared)))


# ------------------------------------------------------------------------------------------ distillation (KL)

def per_sample_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """(B,): Σ_k p_k (log p_k − log q_k), p = softmax(t/τ), q = softmax(s/τ); no τ². Upstream `kldiv(...,
    reduction='none').sum(1)`."""
    log_q = jax.nn.log_softmax(_f32(student_logits) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(_f32(teacher_logits) / temperature, axis=-1)
    p = jnp.exp(log_p)
    # 0·log 0 = 0 as in F.kl_div's xlogy; the inner where keeps the gradient finite where p underflows to 0
    # (xlogy's own gradient is NaN there, and teacher logits carry gradient to the generator).
    return jnp.sum(p * jnp.where(p > 0, log_p - log_q, 0.0), axis=-1)


def kl_divergence(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """τ² · mean_i KL(softmax(t_i/τ) ‖ softmax(s_i/τ)): CMI/Fast/NAYER `kldiv`, i.e.
    `F.kl_div(F.log_softmax(s/τ), F.softmax(t/τ), reduction='batchmean') * τ²`."""
    return temperature ** 2 * jnp.mean(per_sample_kl(student_logits, teacher_logits, temperature))


# ----------------------------------------------------------------------------------- BN statistics (DeepInversion)

def bn_statistics_loss(bn_inputs: Sequence[BNInput], ema: BNEma | None = None,
                       momentum: float = 0.0) -> tuple[jax.Array, dict[str, list[jax.Array]]]:
    """Σ_layers ‖running_var − σ²‖₂ + ‖running_mean − μ‖₂ against this batch's (μ, biased σ²), or against
    (1−m)·batch + m·EMA once `ema["valid"]` (Fast/NAYER): upstream `DeepInversionHook`. Returns (loss, moments)."""
    loss = jnp.zeros((), jnp.float32)
    moments = {"mean": [], "var": []}
    for layer, bn in enumerate(bn_inputs):
        # Over every axis but channels: under a sharded batch the compiler reduces across devices, so these are the
        # statistics of the global batch.
        mean, var = batch_moments(bn.inputs)
        moments["mean"].append(mean)
        moments["var"].append(var)
        target_mean, target_var = mean, var
        if ema is not None:  # `valid` is traced: select, don't branch
            target_mean = jnp.where(ema["valid"], (1 - momentum) * mean + momentum * ema["mean"][layer], mean)
            target_var = jnp.where(ema["valid"], (1 - momentum) * var + momentum * ema["var"][layer], var)
        loss = loss + (_l2_norm(_f32(bn.running_var) - target_var) + _l2_norm(_f32(bn.running_mean) - target_mean))
    return loss, moments


def init_bn_ema(channel_counts: Sequence[int]) -> BNEma:
    """A zero EMA of BN-input moments, one (C,) entry per layer, marked not yet valid (no round has finished)."""
    return {"mean": [jnp.zeros((c,), jnp.float32) for c in channel_counts],
            "var": [jnp.zeros((c,), jnp.float32) for c in channel_counts],
            "valid": jnp.zeros((), jnp.bool_)}


def update_bn_ema(ema: BNEma, moments: dict[str, list[jax.Array]], momentum: float) -> BNEma:
    """After a synthesis round: the moments themselves the first time, m·EMA + (1−m)·moments after (upstream
    `DeepInversionHook.update_mmt`, which reads `.data`, hence the stop_gradient)."""
    moments = jax.lax.stop_gradient(moments)

    def mix(old, new):
        return jnp.where(ema["valid"], momentum * old + (1 - momentum) * _f32(new), _f32(new))

    return {"mean": [mix(old, new) for old, new in zip(ema["mean"], moments["mean"], strict=True)],
            "var": [mix(old, new) for old, new in zip(ema["var"], moments["var"], strict=True)],
            "valid": jnp.ones((), jnp.bool_)}


# ------------------------------------------------------------------------------------- classification, adversarial

def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """mean_i −Σ_k y_ik log softmax(logits_i)_k; `targets` are int labels (B,) or probabilities (B, K) (NAYER's
    one-hot/soft targets), as `F.cross_entropy` accepts both."""
    log_probs = jax.nn.log_softmax(_f32(logits), axis=-1)
    if targets.ndim == logits.ndim - 1:  # labels: a static shape test, not a traced branch
        return -jnp.mean(jnp.take_along_axis(log_probs, targets[:, None].astype(jnp.int32), axis=-1))
    return -jnp.mean(jnp.sum(_f32(targets) * log_probs, axis=-1))


def adversarial_masked_kl(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """−mean_i KL(softmax(t_i) ‖ softmax(s_i)) · 1(argmax s_i = argmax t_i): CMI/NAYER's `loss_adv`; only samples
    the student still classifies like the teacher push the generator (the mask, from argmax, carries no gradient)."""
    mask = (jnp.argmax(student_logits, axis=-1) == jnp.argmax(teacher_logits, axis=-1)).astype(jnp.float32)
    return -jnp.mean(per_sample_kl(student_logits, teacher_logits) * mask)


def l1_distance(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """mean |t − s| over all elements: DFAD's student loss (`nn.L1Loss()(s, t)`)."""
    return jnp.mean(jnp.abs(_f32(teacher_logits) - _f32(student_logits)))


def adversarial_l1(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """−mean |t − s|: DFAD's generator loss (`-torch.nn.L1Loss()(s, t)`)."""
    return -l1_distance(student_logits, teacher_logits)


def js_divergence(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Upstream `jsdiv`: P = softmax(s/T), Q = softmax(t/T), M = (P+Q)/2, each clamped to [0.01, 0.99], then
    ½·KL_batchmean(M‖P) + ½·KL_batchmean(M‖Q), KL_batchmean(M‖P) = Σ M (log M − log P) / B."""
    p = jax.nn.softmax(_f32(student_logits) / temperature, axis=-1)
    q = jax.nn.softmax(_f32(teacher_logits) / temperature, axis=-1)
    m = 0.5 * (p + q)
    p, q, m = (jnp.clip(x, 0.01, 0.99) for x in (p, q, m))  # the clamp keeps every log finite

    def kl_batchmean(target, prediction):
        return jnp.sum(target * (jnp.log(target) - jnp.log(prediction))) / target.shape[0]

    return 0.5 * kl_batchmean(m, p) + 0.5 * kl_batchmean(m, q)


def adversarial_js(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 3.0) -> jax.Array:
    """−JS(s, t) at T = 3: DeepInversion's adversarial (competition) term as CMI's code writes it."""
    return -js_divergence(student_logits, teacher_logits, temperature)


# -------------------------------------------------------------------------------------------- contrastive

def supervised_contrastive(embeddings_bd: jax.Array, labels_b: jax.Array, temperature: float = 0.1, *,
                           normalise: bool = True) -> jax.Array:
    """SupCon (Khosla et al. 2020, eq. 2, L^sup_out) over ℓ2-normalised embeddings z with labels y:

        L = mean over anchors i with P(i) ≠ ∅ of  −1/|P(i)| Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ) ),

    P(i) = {p ≠ i : y_p = y_i}. An anchor whose label appears only once has no positive and is left out of the mean
    (eq. 2's 1/|P(i)| is undefined there; the SupCon code's newer revision counts it as 0 in the mean instead), and
    a batch without any positive pair gives 0. No τ/τ_base factor (the SupCon code's `base_temperature`).
    normalise=False takes the embeddings as they are (CPSC-DFKD's adapted student features are not re-normalised).

    The SupCon code's multi-view form, features (B, V, D) with labels (B,), is this function over the V·B rows
    `concatenate(unbind(features, 1))` with the labels tiled V times (its contrast_mode "all")."""
    z = _f32(embeddings_bd)
    if normalise:
        z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    batch = z.shape[0]
    logits = z @ z.T / temperature
    not_self = ~jnp.eye(batch, dtype=bool)
    # log Σ_{a≠i} exp(logits_ia), stable, with the diagonal masked out.
    log_denominator = jax.nn.logsumexp(jnp.where(not_self, logits, -jnp.inf), axis=1)
    positives = (labels_b[:, None] == labels_b[None, :]) & not_self
    count = positives.sum(axis=1)
    log_prob = logits - log_denominator[:, None]
    per_anchor = -jnp.sum(jnp.where(positives, log_prob, 0.0), axis=1) / jnp.maximum(count, 1)
    has_positive = count > 0
    return jnp.sum(jnp.where(has_positive, per_anchor, 0.0)) / jnp.maximum(has_positive.sum(), 1)


# --------------------------------------------------------------------------------------------------- CPSC-DFKD

def cross_entropy_on_probabilities(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """CE(softmax(logits), y) with the probabilities taken as logits: CPSC-DFKD's `F.cross_entropy(F.softmax(t), y)`,
    a softmax applied twice (its code does this in both the generator and the student step). It lies in
    [log(e + K − 1) − 1, log(e + K − 1)], so it can never push a prediction far."""
    return cross_entropy(jax.nn.softmax(_f32(logits), axis=-1), labels)


def cpsc_ikd_generator(student_logits: jax.Array, teacher_logits: jax.Array, form: str = "log") -> jax.Array:
    """CPSC-DFKD's inverse-KD term in the generator step, pushing the student's logits away from the (detached)
    teacher's: −log MSE(s, t) (form "log", its CIFAR-10 code) or −MSE(s, t) (form "plain", its other datasets),
    MSE = F.mse_loss, the mean over all B·K elements."""
    mse = jnp.mean(jnp.square(_f32(student_logits) - jax.lax.stop_gradient(_f32(teacher_logits))))
    return -jnp.log(mse) if form == "log" else -mse


def cpsc_ikd_student(student_logits: jax.Array, teacher_logits: jax.Array, form: str = "log") -> jax.Array:
    """CPSC-DFKD's IKD term in the student step, pulling the student's logits to the teacher's:
    log ‖t − s‖₂ (form "log", its CIFAR-10 code: `torch.log(torch.norm(t - s, 2))`, the 2-norm of the whole B×K
    matrix) or MSE(s, t) (form "plain")."""
    difference = jax.lax.stop_gradient(_f32(teacher_logits)) - _f32(student_logits)
    return jnp.log(_l2_norm(difference)) if form == "log" else jnp.mean(jnp.square(difference))


# ------------------------------------------------------------------------------- attention transfer (CGDD)

def attention_map(stage_bhwc: jax.Array) -> jax.Array:
    """(B, H·W): q = vec(mean_c A_c²) scaled to unit ℓ2 norm per sample, the spatial attention map of Zagoruyko &
    Komodakis (p = 2); `F.normalize(x.pow(2).mean(1).view(B, -1))` in their code (norm floored at 1e-12)."""
    squared = jnp.mean(jnp.square(_f32(stage_bhwc)), axis=-1).reshape(stage_bhwc.shape[0], -1)
    return squared / jnp.maximum(jnp.linalg.norm(squared, axis=-1, keepdims=True), 1e-12)


def _pool_to(stage_bhwc: jax.Array, size: int) -> jax.Array:
    """Average-pool (B, H, W, C) down to (B, size, size, C) (H a multiple of size): `F.adaptive_avg_pool2d`."""
    b, h, w, c = stage_bhwc.shape
    return stage_bhwc.reshape(b, size, h // size, size, w // size, c).mean(axis=(2, 4))


AT_FORMS = ("code", "paper")


def attention_transfer(student_stages: Sequence[jax.Array], teacher_stages: Sequence[jax.Array],
                       form: str = "code") -> jax.Array:
    """Σ_j d(q_S^j, q_T^j) over paired stage outputs, q = `attention_map`. form "code": d = mean over the batch and
    the H·W positions of (q_S − q_T)², what `at_loss` in szagoruyko/attention-transfer computes (and what its
    β = 1000 weighs); "paper": d = mean over the batch of ‖q_S − q_T‖₂, eq. 2 of the paper. Where a pair's spatial
    sizes differ, the larger map is average-pooled to the smaller (RepDistiller's `Attention`)."""
    if len(student_stages) != len(teacher_stages):
        raise ValueError(f"attention transfer pairs stages one to one: the student has {len(student_stages)}, the "
                         f"teacher {len(teacher_stages)}")
    total = jnp.zeros((), jnp.float32)
    for student, teacher in zip(student_stages, teacher_stages):
        size = min(student.shape[1], teacher.shape[1])
        difference = attention_map(_pool_to(student, size)) - attention_map(_pool_to(teacher, size))
        if form == "paper":
            squared = jnp.sum(jnp.square(difference), axis=-1)
            # ‖·‖₂ with gradient 0 at 0 (where identical maps would give sqrt's infinite slope times 0 = NaN)
            total += jnp.mean(jnp.where(squared > 0, jnp.sqrt(jnp.where(squared > 0, squared, 1.0)), 0.0))
        else:
            total += jnp.mean(jnp.square(difference))
    return total


# ---------------------------------------------------------------------------------------------------- DAFL

def dafl_activation(features: jax.Array) -> jax.Array:
    """−mean |f| on the teacher's penultimate features: DAFL's activation loss."""
    return -jnp.mean(jnp.abs(_f32(features)))


def information_entropy(logits: jax.Array, log_base: float | None = None) -> jax.Array:
    """Σ_k p̄_k log p̄_k, p̄ = mean_i softmax(logits_i): DAFL's information-entropy loss, the negative entropy of the
    batch-mean prediction (minimising it balances classes). Natural log by default; DAFL's own code uses log10
    (`log_base=10`), which only rescales the term by 1/ln 10."""
    mean_probs = jnp.mean(jax.nn.softmax(_f32(logits), axis=-1), axis=0)
    positive = mean_probs > 0  # 0·log 0 = 0, with a finite gradient
    terms = jnp.where(positive, mean_probs * jnp.log(jnp.where(positive, mean_probs, 1.0)), 0.0)
    entropy_term = jnp.sum(terms)
    return entropy_term if log_base is None else entropy_term / jnp.log(log_base)


# ------------------------------------------------------------------------------------- image priors (DeepInversion)

TV_NORMS = ("l1", "l2")


def total_variation(images_bhwc: jax.Array, norm: str = "l1") -> jax.Array:
    """Total variation over the horizontal, vertical and two diagonal neighbour differences Δ (DeepInversion's
    `get_image_prior_losses`, its NCHW indices moved to NHWC):
      l1: Σ_Δ mean |Δ| — the form CMI's `criterions.py` returns, what its DeepInversion runs (weight 0.001);
      l2: Σ_Δ ‖Δ‖_F — NVIDIA's DeepInversion `loss_var_l2`, about 1000× larger on a noise batch."""
    if norm not in TV_NORMS:
        raise ValueError(f"total variation norm must be one of {TV_NORMS}, got {norm!r}")
    x = _f32(images_bhwc)
    along_width = x[:, :, :-1] - x[:, :, 1:]
    along_height = x[:, :-1, :] - x[:, 1:, :]
    anti_diagonal = x[:, 1:, :-1] - x[:, :-1, 1:]
    diagonal = x[:, :-1, :-1] - x[:, 1:, 1:]
    differences = (along_width, along_height, anti_diagonal, diagonal)
    if norm == "l1":
        # |Δ| with PyTorch's gradient sign(0) = 0 (jnp.abs has 1 there): clipped pixels make exact ties.
        return sum(jnp.mean(jnp.where(d == 0, 0.0, jnp.abs(d))) for d in differences)
    return sum(_l2_norm(d) for d in differences)


def l2_prior(images_bhwc: jax.Array) -> jax.Array:
    """Frobenius norm of the whole batch: DeepInversion's `torch.norm(inputs, 2)`."""
    return _l2_norm(_f32(images_bhwc))


# ---------------------------------------------------------------------------------------------------- MVN

def soft_target_kl(logits: jax.Array, target_probs: jax.Array, temperature: float = 1.0) -> jax.Array:
    """mean_i KL(y_i ‖ softmax(logits_i/τ)) = mean_i Σ_k y_ik (log y_ik − log softmax(logits_i/τ)_k), no τ²: how far
    a network's softened prediction is from given soft targets y (MVN's transfer set). 0·log 0 = 0."""
    y = _f32(target_probs)
    log_q = jax.nn.log_softmax(_f32(logits) / temperature, axis=-1)
    positive = y > 0
    log_y = jnp.log(jnp.where(positive, y, 1.0))
    return jnp.mean(jnp.sum(jnp.where(positive, y * (log_y - log_q), 0.0), axis=-1))
