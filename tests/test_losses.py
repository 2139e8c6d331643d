"""Every loss term against an independent reference: the upstream PyTorch code as the upstream repositories write
it (NCHW, F.kl_div, torch.norm, the DeepInversionHook), run in float64 on the same NumPy inputs, or float64 NumPy
by hand. Values and input gradients are compared for every term that pixels or generators are optimised through.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks import torch_steps
from dfkd_jax import losses, parallel
from dfkd_jax.models import BNInput

RTOL, ATOL = 1e-5, 1e-6


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _leaf(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.asarray(x, np.float64), requires_grad=True)


def _nchw(x_bhwc: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x_bhwc, (0, 3, 1, 2)))


def _bhwc(x_nchw: np.ndarray) -> np.ndarray:
    return np.transpose(x_nchw, (0, 2, 3, 1))


def _close(actual, expected, rtol=RTOL, atol=ATOL, what=""):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=rtol,
                               atol=atol, err_msg=what)


def _compare_with_torch(jax_fn, torch_fn, *inputs, atol=ATOL, grads_of=None):
    """Value and gradient w.r.t. every input (or those in `grads_of`), JAX float32 against PyTorch float64."""
    value, grads = jax.jit(jax.value_and_grad(jax_fn, argnums=tuple(range(len(inputs)))))(
        *(jnp.asarray(x, jnp.float32) for x in inputs))
    leaves = [_leaf(x) for x in inputs]
    expected = torch_fn(*leaves)
    expected.backward()
    _close(value, expected.item(), atol=atol, what="value")
    for i, (grad, leaf) in enumerate(zip(grads, leaves)):
        if grads_of is not None and i not in grads_of:
            continue
        assert np.all(np.isfinite(np.asarray(grad))), f"gradient {i} is not finite"
        _close(grad, leaf.grad.numpy(), atol=atol, what=f"gradient w.r.t. input {i}")
    return value


# ------------------------------------------------------------------------ upstream code, as upstream writes it

# The same functions the benchmarks' PyTorch reference uses (benchmarks/torch_steps.py), copied from upstream.
torch_kldiv, torch_jsdiv = torch_steps.kldiv, torch_steps.jsdiv


def torch_adv_masked_kl(s_out, t_out):  # NAYER / CMI generator step
    mask = (s_out.max(1)[1] == t_out.max(1)[1]).float()
    return -(torch_kldiv(s_out, t_out, reduction="none").sum(1) * mask).mean()


def torch_bn_hook(x, running_mean, running_var, mmt=None, mmt_rate=0.9):
    """DeepInversionHook.hook_fn (Fast/NAYER); 2-D inputs (BatchNorm1d) take the same moments over the batch."""
    if x.dim() == 4:
        nch = x.shape[1]
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
    else:
        mean, var = x.mean(0), x.var(0, unbiased=False)
    if mmt is None:
        r_feature = torch.norm(running_var - var, 2) + torch.norm(running_mean - mean, 2)
    else:
        mean_mmt, var_mmt = mmt
        r_feature = torch.norm(running_var - (1 - mmt_rate) * var - mmt_rate * var_mmt, 2) + \
            torch.norm(running_mean - (1 - mmt_rate) * mean - mmt_rate * mean_mmt, 2)
    return r_feature, (mean, var)


def torch_image_prior_losses(inputs_jit):  # NVIDIA DeepInversion's get_image_prior_losses, verbatim but for names
    diff1 = inputs_jit[:, :, :, :-1] - inputs_jit[:, :, :, 1:]
    diff2 = inputs_jit[:, :, :-1, :] - inputs_jit[:, :, 1:, :]
    diff3 = inputs_jit[:, :, 1:, :-1] - inputs_jit[:, :, :-1, 1:]
    diff4 = inputs_jit[:, :, :-1, :-1] - inputs_jit[:, :, 1:, 1:]
    loss_var_l2 = torch.norm(diff1) + torch.norm(diff2) + torch.norm(diff3) + torch.norm(diff4)
    loss_var_l1 = (diff1.abs() / 255.0).mean() + (diff2.abs() / 255.0).mean() + (
        diff3.abs() / 255.0).mean() + (diff4.abs() / 255.0).mean()
    loss_var_l1 = loss_var_l1 * 255.0
    return loss_var_l1, loss_var_l2  # CMI's criterions.py returns the first alone


def _logits_pair(batch=8, classes=10, scale=3.0, seed=0):
    rng = _rng(seed)
    return (rng.normal(0, scale, (batch, classes)).astype(np.float32),
            rng.normal(0, scale, (batch, classes)).astype(np.float32))


# ---------------------------------------------------------------------------------------------------- KL

@pytest.mark.parametrize("temperature", [1.0, 20.0])
def test_kl_divergence_matches_upstream_kldiv(temperature):
    s, t = _logits_pair()
    _compare_with_torch(lambda s, t: losses.kl_divergence(s, t, temperature),
                        lambda s, t: torch_kldiv(s, t, T=temperature), s, t)


def test_per_sample_kl_is_kldiv_none_summed_without_tau_squared():
    s, t = _logits_pair(seed=1)
    expected = torch_kldiv(_leaf(s), _leaf(t), T=4.0, reduction="none").sum(1) / 16.0
    per_sample = losses.per_sample_kl(s, t, 4.0)
    assert per_sample.shape == (8,)
    _close(per_sample, expected.detach().numpy())


def test_kl_divergence_is_zero_for_identical_logits():
    s, _ = _logits_pair(seed=2)
    assert abs(float(losses.kl_divergence(s, s, 20.0))) < 1e-5
    assert float(losses.kl_divergence(s, s + 1.0)) == pytest.approx(0.0, abs=1e-6)  # softmax ignores shifts


def test_kl_divergence_gradient_is_finite_when_a_teacher_probability_underflows():
    s, t = _logits_pair(batch=4, classes=5, scale=1.0, seed=3)
    t[:, :2] += 1000.0  # the other teacher probabilities are exp(-1000) = 0, in float32 and in float64
    # Upstream's gradient w.r.t. the teacher logits is NaN here (xlogy at 0); the student's is compared.
    value = _compare_with_torch(losses.kl_divergence, lambda s, t: torch_kldiv(s, t), s, t, grads_of=(0,))
    assert np.isfinite(float(value))
    # The gradient w.r.t. the teacher logits, by hand in float64:
    # dKL_i/dt_ij = p_ij (log p_ij − log q_ij − KL_i), then the batch mean.
    grad_t = np.asarray(jax.jit(jax.grad(losses.kl_divergence, argnums=1))(s, t))
    s64, t64 = s.astype(np.float64), t.astype(np.float64)
    log_p = t64 - t64.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    log_q = s64 - s64.max(1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(1, keepdims=True))
    p = np.exp(log_p)
    kl = (p * (log_p - log_q)).sum(1, keepdims=True)
    assert np.all(np.isfinite(grad_t)) and np.any(np.abs(grad_t[:, :2]) > 1e-3)
    _close(grad_t, p * (log_p - log_q - kl) / len(s))


# ------------------------------------------------------------------------------------------ BN statistics

def _bn_layers(seed=0, batch=6):
    """A conv BN input (NHWC) and a BatchNorm1d input, with running statistics near but not at the batch's."""
    rng = _rng(seed)
    conv = rng.normal(0.5, 2.0, (batch, 5, 4, 3)).astype(np.float32)
    dense = rng.normal(-1.0, 1.5, (batch, 7)).astype(np.float32)
    stats = [(rng.normal(0.5, 0.5, 3), rng.uniform(2.0, 6.0, 3)), (rng.normal(-1.0, 0.5, 7), rng.uniform(1.0, 3.0, 7))]
    return [conv, dense], [(m.astype(np.float32), v.astype(np.float32)) for m, v in stats]


def _jax_bn_loss(ema=None, momentum=0.0, stats=None):
    def loss(conv, dense):
        bn_inputs = [BNInput(x, jnp.asarray(m), jnp.asarray(v)) for x, (m, v) in zip((conv, dense), stats)]
        return losses.bn_statistics_loss(bn_inputs, ema, momentum)[0]
    return loss


def _torch_bn_loss(stats, mmts=None, mmt_rate=0.9):
    def loss(conv_nhwc, dense):
        total = 0.0
        for i, (x, (m, v)) in enumerate(zip((conv_nhwc.permute(0, 3, 1, 2), dense), stats)):
            mmt = None if mmts is None else (torch.tensor(mmts["mean"][i], dtype=torch.float64),
                                             torch.tensor(mmts["var"][i], dtype=torch.float64))
            total = total + torch_bn_hook(x, torch.tensor(m, dtype=torch.float64),
                                          torch.tensor(v, dtype=torch.float64), mmt, mmt_rate)[0]
        return total
    return loss


def test_bn_statistics_loss_matches_the_deepinversion_hook():
    (conv, dense), stats = _bn_layers()
    # The torch side permutes NHWC→NCHW inside, so the input gradients compare in NHWC directly.
    _compare_with_torch(_jax_bn_loss(stats=stats), _torch_bn_loss(stats), conv, dense)

    _, moments = losses.bn_statistics_loss([BNInput(conv, *stats[0]), BNInput(dense, *stats[1])])
    _, (mean, var) = torch_bn_hook(torch.tensor(_nchw(conv), dtype=torch.float64), *map(torch.tensor, stats[0]))
    _close(moments["mean"][0], mean.numpy())
    _close(moments["var"][0], var.numpy())  # biased
    _close(moments["var"][1], dense.astype(np.float64).var(0))


def test_bn_statistics_loss_momentum_variant_with_a_valid_ema_matches_the_hook():
    (conv, dense), stats = _bn_layers(seed=1)
    rng = _rng(11)
    mmts = {"mean": [rng.normal(0, 1, 3).astype(np.float32), rng.normal(0, 1, 7).astype(np.float32)],
            "var": [rng.uniform(1, 4, 3).astype(np.float32), rng.uniform(1, 4, 7).astype(np.float32)]}
    ema = {"mean": [jnp.asarray(m) for m in mmts["mean"]], "var": [jnp.asarray(v) for v in mmts["var"]],
           "valid": jnp.asarray(True)}
    momentum_value = _compare_with_torch(_jax_bn_loss(ema, 0.9, stats), _torch_bn_loss(stats, mmts, 0.9),
                                         conv, dense)
    plain_value = _jax_bn_loss(stats=stats)(conv, dense)
    assert abs(float(momentum_value) - float(plain_value)) > 1e-2  # the EMA really entered the target


def test_an_invalid_ema_is_ignored_whatever_it_holds():
    (conv, dense), stats = _bn_layers(seed=2)
    ema = {"mean": [jnp.full((3,), 50.0), jnp.full((7,), -50.0)], "var": [jnp.full((3,), 9.0), jnp.full((7,), 9.0)],
           "valid": jnp.asarray(False)}

    @jax.jit  # `valid` is traced here, as in a synthesis step: a Python branch on it would fail to trace
    def loss_and_grads(conv, dense, ema):
        return jax.value_and_grad(_jax_bn_loss(ema, 0.9, stats), argnums=(0, 1))(conv, dense)

    plain = jax.jit(jax.value_and_grad(_jax_bn_loss(stats=stats), argnums=(0, 1)))(conv, dense)
    invalid = loss_and_grads(conv, dense, ema)
    _close(invalid[0], plain[0])
    for got, want in zip(invalid[1], plain[1]):
        _close(got, want)
    valid = loss_and_grads(conv, dense, {**ema, "valid": jnp.asarray(True)})
    assert float(valid[0]) > float(plain[0]) + 10.0


def test_bn_ema_first_update_copies_the_moments_and_later_ones_mix():
    ema = losses.init_bn_ema([3, 7])
    assert not bool(ema["valid"])
    assert [m.shape for m in ema["mean"]] == [(3,), (7,)] and [v.shape for v in ema["var"]] == [(3,), (7,)]
    assert all(not np.any(np.asarray(x)) for x in ema["mean"] + ema["var"])

    rng = _rng(3)
    first = {"mean": [rng.normal(size=3), rng.normal(size=7)], "var": [rng.uniform(size=3), rng.uniform(size=7)]}
    second = {"mean": [rng.normal(size=3), rng.normal(size=7)], "var": [rng.uniform(size=3), rng.uniform(size=7)]}
    as_f32 = lambda moments: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), moments)  # noqa: E731
    update = jax.jit(losses.update_bn_ema, static_argnums=2)

    ema = update(ema, as_f32(first), 0.9)
    assert bool(ema["valid"])
    for key in ("mean", "var"):
        for got, want in zip(ema[key], first[key]):
            _close(got, want)

    ema = update(ema, as_f32(second), 0.9)
    assert bool(ema["valid"])
    for key in ("mean", "var"):
        for got, a, b in zip(ema[key], first[key], second[key]):
            _close(got, 0.9 * a + 0.1 * b)


def test_bn_statistics_loss_on_a_sharded_batch_uses_global_batch_statistics():
    assert jax.device_count() == 8
    rng = _rng(4)
    batch = 16
    # A different offset per row: each device's 2 rows alone have statistics far from the global batch's.
    conv = (rng.normal(size=(batch, 4, 4, 3)) + np.arange(batch)[:, None, None, None]).astype(np.float32)
    dense = (rng.normal(size=(batch, 5)) - 0.5 * np.arange(batch)[:, None]).astype(np.float32)
    stats = [(rng.normal(size=3).astype(np.float32), rng.uniform(1, 3, 3).astype(np.float32)),
             (rng.normal(size=5).astype(np.float32), rng.uniform(1, 3, 5).astype(np.float32))]
    ema = {"mean": [jnp.asarray(rng.normal(size=3), jnp.float32), jnp.asarray(rng.normal(size=5), jnp.float32)],
           "var": [jnp.ones(3), jnp.ones(5)], "valid": jnp.asarray(True)}
    loss_fn = _jax_bn_loss(ema, 0.9, stats)
    mesh = parallel.make_data_mesh()
    sharding = parallel.batch_sharded(mesh)

    @jax.jit
    def sharded(conv, dense):
        conv, dense = jax.device_put(conv, sharding), jax.device_put(dense, sharding)
        bn_inputs = [BNInput(conv, *stats[0]), BNInput(dense, *stats[1])]
        _, moments = losses.bn_statistics_loss(bn_inputs, ema, 0.9)
        return jax.value_and_grad(loss_fn, argnums=(0, 1))(conv, dense), moments

    single = jax.devices()[0]
    (value, grads), moments = sharded(conv, dense)
    expected_value, expected_grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(
        jax.device_put(conv, single), jax.device_put(dense, single))
    assert len(grads[0].sharding.device_set) == 8  # it really ran sharded
    _close(value, expected_value)
    for got, want in zip(grads, expected_grads):
        _close(got, want, atol=1e-6)
    _close(moments["mean"][0], conv.astype(np.float64).mean((0, 1, 2)))
    _close(moments["var"][1], dense.astype(np.float64).var(0))

    per_device = np.mean([float(jax.jit(loss_fn)(conv[i:i + 2], dense[i:i + 2])) for i in range(0, batch, 2)])
    assert abs(per_device - float(value)) > 1.0  # per-device statistics would have given a different loss


# ------------------------------------------------------------------------------ cross-entropy and adversarial

def test_cross_entropy_matches_torch_for_labels_and_soft_targets():
    logits, _ = _logits_pair(seed=5)
    labels = _rng(5).integers(0, 10, 8)
    expected = F.cross_entropy(torch.tensor(logits, dtype=torch.float64), torch.tensor(labels))
    _close(losses.cross_entropy(logits, jnp.asarray(labels)), expected.item())
    _close(losses.cross_entropy(logits, jax.nn.one_hot(labels, 10)), expected.item())  # one-hot = labels

    soft = _rng(6).dirichlet(np.ones(10), 8).astype(np.float32)
    _compare_with_torch(losses.cross_entropy, lambda x, y: F.cross_entropy(x, y), logits, soft)


def _half_agreeing_logits():
    """8 samples; the student's argmax equals the teacher's on the even ones only."""
    s, t = _logits_pair(seed=7)
    teacher_class = t.argmax(1)
    for i in range(8):
        wanted = teacher_class[i] if i % 2 == 0 else (teacher_class[i] + 1) % 10
        s[i, wanted] = s[i].max() + 1.0
    assert np.array_equal(s.argmax(1) == t.argmax(1), np.arange(8) % 2 == 0)
    return s, t


def test_adversarial_masked_kl_matches_upstream():
    s, t = _half_agreeing_logits()
    value = _compare_with_torch(losses.adversarial_masked_kl, torch_adv_masked_kl, s, t)
    assert float(value) < 0


def test_adversarial_masked_kl_ignores_samples_where_the_argmaxes_differ():
    s, t = _half_agreeing_logits()
    value, (grad_s, grad_t) = jax.jit(jax.value_and_grad(losses.adversarial_masked_kl, argnums=(0, 1)))(s, t)
    per_sample = np.asarray(losses.per_sample_kl(s, t))
    assert np.all(per_sample[1::2] > 1e-3)  # they would contribute if unmasked
    _close(value, -per_sample[0::2].sum() / 8)
    assert not np.any(np.asarray(grad_s)[1::2]) and not np.any(np.asarray(grad_t)[1::2])
    assert np.any(np.asarray(grad_s)[0::2])
    moved = s.copy()
    moved[1::2] *= 3.0  # changes the disagreeing samples' KL, not their argmax
    _close(losses.adversarial_masked_kl(moved, t), value)


def test_adversarial_l1_and_l1_distance_match_dfad():
    s, t = _logits_pair(seed=8)
    _compare_with_torch(losses.adversarial_l1, lambda s, t: -torch.nn.L1Loss()(s, t), s, t)
    _compare_with_torch(losses.l1_distance, lambda s, t: torch.nn.L1Loss()(s, t), s, t)


@pytest.mark.parametrize("temperature, jax_fn, torch_fn", [
    (1.0, losses.js_divergence, torch_jsdiv),
    (3.0, losses.adversarial_js, lambda s, t: -torch_jsdiv(s, t, T=3)),  # its default T, minus upstream's jsdiv
], ids=["js_divergence", "adversarial_js"])
def test_js_divergence_matches_upstream_jsdiv(temperature, jax_fn, torch_fn):
    s, t = _logits_pair(scale=2.0 * temperature, seed=9)
    # Probabilities on both sides of the 0.01 clamp, so the clamped gradient is compared too.
    probs = jax.nn.softmax(jnp.asarray(s) / temperature)
    assert np.any(probs < 0.01) and np.any((probs > 0.01) & (probs < 0.99))
    _compare_with_torch(jax_fn, torch_fn, s, t)


# ------------------------------------------------------------------------------------------------- DAFL

def test_dafl_activation_matches_upstream():
    features = _rng(12).normal(size=(8, 16)).astype(np.float32)
    _compare_with_torch(losses.dafl_activation, lambda f: -f.abs().mean(), features)


@pytest.mark.parametrize("log_base, torch_log", [(None, torch.log), (10.0, torch.log10)])
def test_information_entropy_matches_upstream(log_base, torch_log):
    logits, _ = _logits_pair(seed=13)

    def upstream(outputs_T):
        softmax_o_T = F.softmax(outputs_T, dim=1).mean(dim=0)
        return (softmax_o_T * torch_log(softmax_o_T)).sum()

    value = _compare_with_torch(lambda x: losses.information_entropy(x, log_base), upstream, logits)
    assert float(value) > -np.log(10) / np.log(log_base or np.e) - 1e-6  # ≥ −log K, the balanced minimum


def test_information_entropy_is_minus_log_k_for_balanced_predictions():
    one_per_class = 50.0 * np.eye(10, dtype=np.float32)
    value, grad = jax.jit(jax.value_and_grad(losses.information_entropy))(jnp.asarray(one_per_class))
    _close(value, -np.log(10.0))
    assert np.all(np.isfinite(np.asarray(grad)))


# ------------------------------------------------------------------------------------------ image priors

def test_total_variation_of_a_two_by_two_image_worked_out_by_hand():
    # x = [[0, 1], [2, 4]]: |Δ| along the width 1, 2; along the height 2, 3; anti-diagonal x[1,0] − x[0,1] = 1;
    # diagonal x[0,0] − x[1,1] = −4. l1 = Σ means = 1.5 + 2.5 + 1 + 4 = 9; l2 = √5 + √13 + 1 + 4.
    image = jnp.asarray([[0.0, 1.0], [2.0, 4.0]]).reshape(1, 2, 2, 1)
    assert float(losses.total_variation(image, "l1")) == pytest.approx(9.0, rel=1e-6)
    assert float(losses.total_variation(image)) == pytest.approx(9.0, rel=1e-6)  # l1 is the default (CMI's)
    assert float(losses.total_variation(image, "l2")) == pytest.approx(5 + 5 ** 0.5 + 13 ** 0.5, rel=1e-6)
    with pytest.raises(ValueError, match="norm must be one of"):
        losses.total_variation(image, "l3")


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_total_variation_matches_deepinversion_on_nchw(norm):
    images = _rng(14).uniform(size=(3, 6, 5, 3)).astype(np.float32)  # H ≠ W catches swapped axes
    value, grad = jax.jit(jax.value_and_grad(functools.partial(losses.total_variation, norm=norm)))(
        jnp.asarray(images))
    leaf = _leaf(_nchw(images))
    expected = torch_image_prior_losses(leaf)[0 if norm == "l1" else 1]
    expected.backward()
    _close(value, expected.item())
    _close(grad, _bhwc(leaf.grad.numpy()))


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_total_variation_of_a_constant_image_is_zero_with_zero_gradient(norm):
    value, grad = jax.jit(jax.value_and_grad(functools.partial(losses.total_variation, norm=norm)))(
        jnp.full((2, 4, 4, 3), 0.5))
    leaf = _leaf(np.full((2, 3, 4, 4), 0.5))
    torch_image_prior_losses(leaf)[0 if norm == "l1" else 1].backward()
    assert float(value) == 0.0
    assert np.all(np.isfinite(np.asarray(grad)))  # jnp.linalg.norm would give NaN here
    _close(grad, _bhwc(leaf.grad.numpy()))


def test_l2_prior_is_the_frobenius_norm_of_the_batch():
    images = _rng(15).normal(size=(3, 4, 5, 3)).astype(np.float32)
    value, grad = jax.jit(jax.value_and_grad(losses.l2_prior))(jnp.asarray(images))
    leaf = _leaf(_nchw(images))
    expected = torch.norm(leaf, 2)
    expected.backward()
    _close(value, expected.item())
    _close(grad, _bhwc(leaf.grad.numpy()))
    _close(value, np.sqrt(np.sum(images.astype(np.float64) ** 2)))


# ------------------------------------------------------------------------------------- inside jit, sharded

SCALAR_TERMS = {
    "kl_divergence": lambda s, t, x: losses.kl_divergence(s, t, 20.0),
    "cross_entropy": lambda s, t, x: losses.cross_entropy(s, jax.nn.softmax(t)),
    "adversarial_masked_kl": lambda s, t, x: losses.adversarial_masked_kl(s, t),
    "adversarial_l1": lambda s, t, x: losses.adversarial_l1(s, t),
    "adversarial_js": lambda s, t, x: losses.adversarial_js(s, t),
    "dafl_activation": lambda s, t, x: losses.dafl_activation(s),
    "information_entropy": lambda s, t, x: losses.information_entropy(t),
    "total_variation": lambda s, t, x: losses.total_variation(x),
    "total_variation_l2": lambda s, t, x: losses.total_variation(x, "l2"),
    "l2_prior": lambda s, t, x: losses.l2_prior(x),
}


def test_every_term_jits_on_a_sharded_batch_to_the_unsharded_value():
    s, t = _logits_pair(batch=16, seed=16)
    images = _rng(17).uniform(size=(16, 4, 4, 3)).astype(np.float32)
    sharding = parallel.batch_sharded(parallel.make_data_mesh())

    @jax.jit  # one program for all terms: one compilation
    def all_terms_sharded(s, t, images):
        s, t, images = (jax.device_put(a, sharding) for a in (s, t, images))
        return {name: term(s, t, images) for name, term in SCALAR_TERMS.items()}

    for name, value in all_terms_sharded(s, t, images).items():
        assert value.shape == (), name
        _close(value, SCALAR_TERMS[name](s, t, images), what=name)
