"""CAE-DFKD: CEND (the noise sources and the perturbation) and CNCL (SupCon) against references written from their
formulas, and the method against NAYER, of which it is an extension: with both components off it is NAYER."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dfkd_jax import losses, parallel
from dfkd_jax.methods.base import grid_by_class
from dfkd_jax.models.generators import NOISE_SOURCES, CategoryNoise, draw_category_noise
from dfkd_jax.train import train_and_evaluate

from tests.test_engine import read_metrics, tiny_config

# ------------------------------------------------------------------------------------------------------ CEND

# Mean, variance and support of each source as methods.md §4 defines them, worked out by hand: N(0, 1); U(−1, 1)
# has variance 1/3; Laplace(0, 1) has variance 2b² = 2; the ±1 mask (m − 0.5)·2 has variance 1.
SOURCE_MOMENTS = {"gaussian": (0.0, 1.0), "uniform": (0.0, 1 / 3), "laplace": (0.0, 2.0), "bernoulli": (0.0, 1.0)}


def test_each_noise_source_draws_what_methods_md_defines():
    draws = jax.device_get(jax.jit(draw_category_noise, static_argnums=(1, 2, 3, 4))(
        jax.random.key(0), 40000, 16, NOISE_SOURCES, "random"))
    noise, source = draws["noise"], draws["source"]
    counts = np.bincount(source, minlength=4)
    assert np.all(np.abs(counts / len(source) - 0.25) < 0.01), counts  # each sample's source: uniform over 4
    for index, name in enumerate(NOISE_SOURCES):
        values = noise[source == index].ravel()  # ~160,000 values per source
        mean, var = SOURCE_MOMENTS[name]
        assert abs(values.mean() - mean) < 0.02 and abs(values.var() / var - 1) < 0.02, name
    assert set(np.unique(noise[source == 3])) == {-1.0, 1.0}  # the Bernoulli mask is ±1
    uniform = noise[source == 1]
    assert uniform.min() >= -1 and uniform.max() <= 1 and uniform.min() < -0.999
    laplace = noise[source == 2].ravel()
    # Laplace's tails: P(|x| > 3) = e^-3 ≈ 0.050, where a Gaussian of the same variance gives 0.034.
    assert abs(np.mean(np.abs(laplace) > 3) - math.exp(-3)) < 0.005


def test_cycled_sources_and_a_subset_of_sources():
    draws = draw_category_noise(jax.random.key(1), 10, 4, ("laplace", "gaussian"), "cycle")
    assert np.asarray(draws["source"]).tolist() == [0, 1] * 5
    assert draws["noise"].shape == (10, 4)


def test_category_noise_adds_each_sample_s_source_magnitude_times_its_draw():
    rng = np.random.default_rng(0)
    embeddings, noise = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    source = np.array([0, 3, 3, 1, 0, 1], np.int32)
    magnitudes = rng.uniform(size=(4, 5))
    module = CategoryNoise(4, 5, init_magnitude=0.1)
    assert np.all(np.asarray(module.magnitudes[...]) == np.float32(0.1))
    module.magnitudes[...] = jnp.asarray(magnitudes, jnp.float32)
    out = np.asarray(module(jnp.asarray(embeddings, jnp.float32), jnp.asarray(noise, jnp.float32), source))
    np.testing.assert_allclose(out, embeddings + magnitudes[source] * noise, rtol=1e-6, atol=1e-6)  # float64

    def loss(m, learnable):
        layer = CategoryNoise(4, 5, learnable=learnable)
        layer.magnitudes[...] = m
        return jnp.sum(layer(jnp.asarray(embeddings, jnp.float32), jnp.asarray(noise, jnp.float32), source) ** 2)

    grad = np.asarray(jax.grad(loss)(jnp.asarray(magnitudes, jnp.float32), True))
    assert np.all(grad[2] == 0) and np.all(grad[[0, 1, 3]] != 0)  # source 2 drew no sample: no gradient
    assert np.all(np.asarray(jax.grad(loss)(jnp.asarray(magnitudes, jnp.float32), False)) == 0)  # fixed


# ------------------------------------------------------------------------------------------------------ CNCL

def supcon_eq2_float64(z: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Khosla et al. 2020, eq. 2, written out anchor by anchor in float64; anchors without a positive are left
    out of the mean."""
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    terms = []
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(math.exp(z[i] @ z[a] / temperature) for a in range(len(z)) if a != i)
        terms.append(-sum(math.log(math.exp(z[i] @ z[p] / temperature) / denominator) for p in positives)
                     / len(positives))
    return float(np.mean(terms)) if terms else 0.0


def supcon_eq2_torch(z: torch.Tensor, labels: list[int], temperature: float) -> torch.Tensor:
    """The same formula in PyTorch autograd (float64), for the gradient."""
    z = torch.nn.functional.normalize(z, dim=1)
    terms = []
    for i in range(len(labels)):
        positives = [p for p in range(len(labels)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        others = torch.stack([z[i] @ z[a] / temperature for a in range(len(labels)) if a != i])
        log_denominator = torch.logsumexp(others, 0)
        terms.append(-torch.stack([z[i] @ z[p] / temperature - log_denominator for p in positives]).mean())
    return torch.stack(terms).mean()


@pytest.mark.parametrize("labels", [
    [0, 0, 1, 1, 2, 2, 3, 3],
    [0, 0, 0, 1, 1, 2, 3, 3, 3, 3],  # label 2 appears once: its anchor has no positive and is left out
])
def test_supervised_contrastive_is_khosla_eq2(labels):
    labels = np.asarray(labels)
    z = np.random.default_rng(len(labels)).normal(size=(len(labels), 6))
    value, grad = jax.value_and_grad(losses.supervised_contrastive)(jnp.asarray(z, jnp.float32),
                                                                     jnp.asarray(labels), 0.1)
    assert float(value) == pytest.approx(supcon_eq2_float64(z, labels, 0.1), rel=1e-5)
    leaf = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    supcon_eq2_torch(leaf, labels.tolist(), 0.1).backward()
    np.testing.assert_allclose(np.asarray(grad), leaf.grad.numpy(), rtol=1e-4, atol=1e-6)
    if 2 in labels.tolist():  # the anchor without a positive still receives gradient as everyone's negative
        assert np.any(np.asarray(grad)[labels == 2] != 0)


def test_supervised_contrastive_without_any_positive_is_zero_and_ignores_scale():
    z = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
    assert float(losses.supervised_contrastive(z, jnp.arange(4), 0.1)) == 0.0
    labels = jnp.asarray([0, 0, 1, 1])
    np.testing.assert_allclose(float(losses.supervised_contrastive(3.0 * z, labels, 0.1)),
                               float(losses.supervised_contrastive(z, labels, 0.1)), rtol=1e-6)  # ℓ2-normalised


def test_supervised_contrastive_on_a_sharded_batch_is_the_unsharded_value():
    z = np.random.default_rng(5).normal(size=(16, 8)).astype(np.float32)
    labels = np.repeat(np.arange(8), 2)
    sharding = parallel.batch_sharded(parallel.make_data_mesh())
    sharded = jax.jit(lambda z, y: losses.supervised_contrastive(jax.device_put(z, sharding),
                                                                 jax.device_put(y, sharding), 0.1))(z, labels)
    np.testing.assert_allclose(float(sharded), supcon_eq2_float64(z.astype(np.float64), labels, 0.1), rtol=1e-5)


# --------------------------------------------------------------------------------------------- the method

def test_cae_with_both_components_off_is_nayer(teacher_dir, tmp_path):
    mesh = parallel.make_data_mesh(jax.devices()[:1])
    nayer_config = tiny_config("nayer", teacher_dir)
    cae_config = tiny_config("cae", teacher_dir)
    cae_config.cend.enabled, cae_config.cncl.weight, cae_config.pool.sampling = False, 0.0, "uniform"
    # One view: this tiny batch of 16 is not a multiple of 2 × 10 classes, so two views would change its targets.
    cae_config.cncl.views = 1
    metrics = {}
    for name, config in (("nayer", nayer_config), ("cae", cae_config)):
        train_and_evaluate(config, str(tmp_path / name), mesh=mesh)
        metrics[name] = read_metrics(tmp_path / name)
    for epoch, (nayer, cae) in enumerate(zip(metrics["nayer"], metrics["cae"], strict=True)):
        for key in ("synthesis/loss", "synthesis/bn", "synthesis/ce", "synthesis/adv", "kd/kl", "kd/loss"):
            if key in nayer:
                assert cae[key] == nayer[key], f"epoch {epoch + 1} {key}"


def test_cae_logs_cncl_and_the_learned_magnitudes_and_keeps_view_groups(teacher_dir, tmp_path):
    from tests.test_engine import restore_raw

    workdir = tmp_path / "cae"
    train_and_evaluate(tiny_config("cae", teacher_dir), str(workdir))
    metrics = read_metrics(workdir)
    assert "kd/cncl" not in metrics[0] and np.isfinite(metrics[-1]["kd/cncl"])  # no student steps in warm-up
    for source in NOISE_SOURCES:
        magnitude = metrics[-1][f"synthesis/cend_magnitude/{source}"]
        assert magnitude > 0 and magnitude != pytest.approx(0.1, abs=1e-7), source  # trained away from 0.1
    state = restore_raw(str(workdir / "checkpoints"))
    pool = state["synth"]["pool"]
    count = int(pool["count"])
    labels, groups = pool["labels"][:count], pool["groups"][:count]
    for round_start in range(0, count, 16):  # each kept batch of 16: views i and i + 8 share target and group
        round_labels, round_groups = labels[round_start:round_start + 16], groups[round_start:round_start + 16]
        assert np.all(round_labels[:8] == round_labels[8:]) and np.all(round_groups[:8] == round_groups[8:])
        assert len(set(round_groups[:8].tolist())) == 8
    assert set(state["extras"]) == {"hidden", "out"}  # the projection head, checkpointed beside the student


def test_the_image_grid_has_one_row_per_class():
    images = np.stack([np.full((2, 2, 3), label / 10, np.float32) for label in [3, 1, 1, 0, 3, 3]])
    arranged = grid_by_class(images, np.array([3, 1, 1, 0, 3, 3]), num_classes=4, per_class=3)
    assert arranged.shape == (12, 2, 2, 3)
    rows = arranged[:, 0, 0, 0].reshape(4, 3)
    np.testing.assert_allclose(rows, [[0.0, 1, 1], [0.1, 0.1, 1], [1, 1, 1], [0.3, 0.3, 0.3]], rtol=1e-6)
