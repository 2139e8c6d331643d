"""MVN soft-targeted transfer-set synthesis (methods.md §7): the feature model against its definition, the soft
targets of the real akamaster resnet56 classifier, a synthesis step against a float64 PyTorch reference written from
the formula, and a tiny run whose transfer set is made first and then only distilled on.

Every reference here is written from the method's definition (Σ = σ²·R + εI with R the cosine similarity of W's
columns; y = softmax((W f + b)/τ); L = τ²·CE(softmax(T(x)/τ), y) − λ_a·mean|f_T(x)|; Adam then clip to [0, 1]),
not from dfkd_jax/methods/mvn.py.
"""

from __future__ import annotations

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks import pairs
from dfkd_jax import methods, validate
from dfkd_jax.methods import mvn
from dfkd_jax.models import Network, NetworkSpec
from dfkd_jax.network_io import load_network
from dfkd_jax.train import train_and_evaluate
from tests.test_engine import load_config, read_metrics, restore_raw
from tests.test_parity import TEACHER, relative_error

BATCH = 8


@pytest.fixture(scope="module")
def teacher(shared):
    """The real akamaster resnet56: (PyTorch network taking normalised NCHW, spec, Flax network, variables)."""
    torch.set_num_threads(2)
    return pairs.load_teacher(str(shared / "teachers" / TEACHER), "resnet56", "imagenet")


@pytest.fixture(scope="module")
def classifier(teacher):
    """W (K, d) and b of the teacher's PyTorch `linear` layer, read from the PyTorch side in float64."""
    raw = teacher[0]
    return raw.linear.weight.detach().double().numpy(), raw.linear.bias.detach().double().numpy()


draw = jax.jit(mvn.draw_soft_targets, static_argnums=(1, 3))


# ============================================================================================ feature model

def test_the_correlation_is_the_cosine_similarity_of_the_classifiers_columns():
    """W is K × d = 2 × 3, so R must be 3 × 3. Columns (1, 0), (0, 2), (1, 2): cosines 0, 1/√5 and 4/(2·√5)."""
    weight = np.array([[1.0, 0.0, 1.0],
                       [0.0, 2.0, 2.0]])
    s5 = math.sqrt(5.0)
    expected = np.array([[1.0, 0.0, 1 / s5],
                         [0.0, 1.0, 2 / s5],
                         [1 / s5, 2 / s5, 1.0]])
    np.testing.assert_allclose(mvn.feature_correlation(weight), expected, rtol=0, atol=1e-12)
    model = mvn.feature_model(weight, np.zeros(2), sigma=2.0, epsilon=1e-3)
    np.testing.assert_allclose(model.covariance, 4.0 * expected + 1e-3 * np.eye(3), rtol=0, atol=1e-12)
    np.testing.assert_allclose(model.cholesky @ model.cholesky.T, model.covariance, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(model.mean, np.zeros(3))


def test_the_classifier_is_found_in_the_teachers_variables(teacher, classifier, teacher_dir):
    _, _, network, variables = teacher
    weight, bias = mvn.classifier_weights(network, variables)
    np.testing.assert_allclose(weight, classifier[0], rtol=1e-6)  # (K, d), PyTorch's own layout
    np.testing.assert_allclose(bias, classifier[1], rtol=1e-6)
    # Another family's head (a wrn names it `fc`): the same logits from the features and W, b.
    wrn, wrn_variables = Network.create(NetworkSpec("wrn_16_1", 10), seed=3)
    images = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3))
    out, _ = wrn.apply(wrn_variables, images)
    weight, bias = mvn.classifier_weights(wrn, wrn_variables)
    np.testing.assert_allclose(np.asarray(out.features, np.float64) @ weight.T + bias, out.logits, atol=1e-5)
    # A network whose variables lack the head its architecture names: one line saying what is missing.
    resnet, resnet_variables, _ = load_network(teacher_dir)
    with pytest.raises(ValueError, match=r"no Dense layer 'fc' with a \(d, 10\) kernel .*top-level entries: bn1, "):
        mvn.classifier_weights(wrn, resnet_variables)
    assert resnet.spec.arch == "resnet20"


def test_the_sampled_features_have_the_covariance_sigma(classifier):
    """Empirical second moments S = (1/n) Σ f fᵀ of n draws (μ = 0 is known, so no mean is subtracted) against Σ.
    For Gaussian f, Var(f_i f_j) = Σ_ii Σ_jj + Σ_ij², so S_ij has standard error √((Σ_ii Σ_jj + Σ_ij²)/n). With
    n = 10⁵ that is 0.018 on the diagonal (Σ_ii ≈ 4). Each of the d(d+1)/2 = 2080 entries, standardised by its
    own error, is about N(0, 1): |z| > 5.5 has probability 4e-8 per entry, 8e-5 for any of them, so the bound
    fails only for a wrong Σ. It is sensitive: σ = 2.1 instead of 2 moves the diagonal by 0.41, 23 standard errors."""
    weight, bias = classifier
    model = mvn.feature_model(weight, bias, sigma=2.0, epsilon=1e-3)
    n = 100_000
    features, _ = draw(jax.random.key(7), n, model.device_arrays(), 20.0)
    features = np.asarray(features, np.float64)
    second_moments = features.T @ features / n
    upper = np.triu_indices(weight.shape[1])

    def largest_z(sigma: float) -> float:
        covariance = sigma ** 2 * cosine_of_columns(weight) + 1e-3 * np.eye(weight.shape[1])
        variance = np.outer(np.diag(covariance), np.diag(covariance)) + covariance ** 2
        return float(np.max(np.abs((second_moments - covariance) / np.sqrt(variance / n))[upper]))

    assert largest_z(2.0) < 5.5
    assert largest_z(2.1) > 5.5
    # and the mean is 0: each coordinate within 5.5 standard errors √(Σ_ii/n)
    assert np.max(np.abs(features.mean(axis=0)) / np.sqrt(np.diag(model.covariance) / n)) < 5.5


def cosine_of_columns(weight_kd: np.ndarray) -> np.ndarray:
    return np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in weight_kd.T] for a in weight_kd.T])


def test_soft_target_labels_of_the_real_classifier_cover_every_class(classifier, capsys):
    """10⁴ draws with the akamaster resnet56 classifier: the targets are softmax((W f + b)/τ) of the drawn features,
    and their argmax labels (the pool's labels) cover every class. Measured: 739 to 1318 per class (max/min 1.78),
    mean largest probability 0.314 at τ = 20. A transfer set needs every class; 2% of draws (a fifth of the uniform
    share) is the bound asserted."""
    weight, bias = classifier
    model = mvn.feature_model(weight, bias, sigma=2.0, epsilon=1e-3)
    features, targets = draw(jax.random.key(11), 10_000, model.device_arrays(), 20.0)
    logits = np.asarray(features, np.float64) @ weight.T + bias
    expected = np.exp(logits / 20.0 - np.max(logits / 20.0, axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(targets, expected, rtol=1e-4, atol=1e-7)
    counts = np.bincount(np.argmax(np.asarray(targets), axis=1), minlength=10)
    with capsys.disabled():
        print(f"\nMVN soft-target labels over 10^4 draws (akamaster resnet56): {counts.tolist()}, "
              f"max/min {counts.max() / counts.min():.2f}, mean largest probability "
              f"{float(np.max(targets, axis=1).mean()):.3f}")
    assert counts.sum() == 10_000 and counts.min() >= 200


# =============================================================================================== step parity

def test_a_synthesis_step_matches_a_float64_reference(teacher, classifier):
    """Loss, its two terms, the gradient w.r.t. the pixels and the pixels after one Adam step + clip, against
    PyTorch in float64 on the same weights, images and targets (measured: terms 3e-8, gradient 4e-7, pixels 6e-7
    relative; Adam's first step is about ±lr·sign(g), and no gradient entry is close enough to 0 to flip)."""
    teacher_raw, spec, network, variables = teacher
    config = pairs.method_config("mvn", synthesis=dict(batch_size=BATCH))
    method = pairs.build_method(config, network, network)
    weight, bias = classifier
    _, targets = draw(jax.random.key(3), BATCH, mvn.feature_model(weight, bias, 2.0, 1e-3).device_arrays(), 20.0)
    targets = np.asarray(targets)
    images = np.random.default_rng(4).random((BATCH, 32, 32, 3)).astype(np.float32)

    tau, activation_weight = config.mvn.temperature, config.mvn.activation_weight
    raw64 = copy.deepcopy(teacher_raw).double()
    model = pairs.with_normalisation(raw64, spec).double()
    features = []  # the classifier's input: the penultimate features
    raw64.linear.register_forward_pre_hook(lambda module, inputs: features.append(inputs[0]))
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float64)).requires_grad_(True)
    logits = model(x)
    y = torch.from_numpy(targets.astype(np.float64))
    ce = -(y * torch.log_softmax(logits / tau, dim=1)).sum(dim=1).mean()
    activation = -features[0].abs().mean()
    loss = tau ** 2 * ce + activation_weight * activation
    (gradient,) = torch.autograd.grad(loss, [x])
    adam = torch.optim.Adam([x], lr=config.synthesis.lr, betas=tuple(config.synthesis.betas))
    x.grad = gradient
    adam.step()
    with torch.no_grad():
        x.clamp_(0.0, 1.0)

    pixels = {"pixels": jnp.asarray(images)}
    grads = jax.jit(jax.grad(lambda p: method.pixel_loss(p, jnp.asarray(targets), variables)[0]))(pixels)
    new_pixels, _, jax_loss, terms = jax.jit(method.pixel_update)(pixels, method.optimizer.init(pixels),
                                                                  jnp.asarray(targets), variables)
    assert float(jax_loss) == pytest.approx(loss.item(), rel=1e-4)
    assert float(terms["synthesis/ce"]) == pytest.approx(ce.item(), rel=1e-4)
    assert float(terms["synthesis/activation"]) == pytest.approx(activation.item(), rel=1e-4)
    expected_gradient = gradient.numpy().transpose(0, 2, 3, 1)
    assert relative_error(grads["pixels"], expected_gradient) <= 1e-3
    expected_pixels = x.detach().numpy().transpose(0, 2, 3, 1)
    assert np.all((np.asarray(new_pixels["pixels"]) >= 0) & (np.asarray(new_pixels["pixels"]) <= 1))
    assert relative_error(new_pixels["pixels"], expected_pixels) <= 1e-3


# ================================================================================================ config

def test_config_rules_and_relations():
    config = load_config("mvn", "cifar10")
    rules = methods.config_rules("mvn")
    validate.check(config, 1, rules)
    methods.get("mvn").check_config(config)
    for field, value, requirement in [("mvn.sigma", 0.0, "a number > 0"), ("mvn.epsilon", -1e-3, "a number > 0"),
                                      ("mvn.mean", "bn", "one of 'zero'"), ("mvn.temperature", 0.0, "a number > 0"),
                                      ("mvn.activation_weight", -0.1, "a number >= 0"),
                                      ("mvn.ce_temperature_squared", None, "True or False"),
                                      ("synthesis.transfer_set", 0, "an integer >= 1"),
                                      ("schedule.synthesis_epochs", 0, "an integer >= 1")]:
        changed = load_config("mvn", "cifar10")
        section, name = field.split(".")
        changed[section][name] = value
        with pytest.raises(validate.ConfigError, match=f"config.{field} = .* it must be {requirement}"):
            validate.check(changed, 1, rules)
    for synthesis_epochs, transfer_set, message in [(220, 40_000, r"must be < config.schedule.epochs \(220\)"),
                                                    (20, 4_000, r"must be <= the 16 synthesis batches")]:
        changed = load_config("mvn", "cifar10")
        changed.schedule.synthesis_epochs, changed.synthesis.transfer_set = synthesis_epochs, transfer_set
        with pytest.raises(validate.ConfigError, match=message):
            methods.get("mvn").check_config(changed)
    for preset in ("digits", "cifar10", "cifar10,budget=cpu20", "cifar100"):
        validate.check(load_config("mvn", preset), 1, rules)
        methods.get("mvn").check_config(load_config("mvn", preset))


# ============================================================================================== a tiny run

def test_the_transfer_set_is_made_first_then_only_distilled_on(teacher_dir, tmp_path):
    """3 batches of 16 over 2 synthesis epochs (2, then 1), then 2 epochs of 3 student steps that synthesise
    nothing; the cosine rate spans the 2 distillation epochs only."""
    config = load_config("mvn")
    config.teacher.source, config.teacher.dir = "converted", teacher_dir
    config.student.arch, config.student.options, config.student.batch_size = "wrn_16_1", {}, 16
    config.synthesis.update(batch_size=16, g_steps=2, transfer_set=48)
    config.schedule.update(epochs=4, synthesis_epochs=2, kd_steps=3)
    config.progress, config.eval.every_epochs, config.checkpoint.keep = False, 1, 4
    workdir = str(tmp_path / "run")
    summary = train_and_evaluate(config, workdir)

    first, made, final = (restore_raw(f"{workdir}/checkpoints", epoch) for epoch in (1, 2, 4))
    assert int(first["synth"]["pool"]["count"]) == 32
    made_pool, soft_targets = made["synth"]["pool"], made["synth"]["soft_targets"]
    assert int(made_pool["count"]) == 48 and soft_targets.shape == (48, 10)
    np.testing.assert_allclose(soft_targets.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(made_pool["labels"], np.argmax(soft_targets, axis=1))
    assert np.all((made_pool["images"] >= 0) & (made_pool["images"] <= 1))
    # The newest batch's pixels and targets are the pool's last 16 entries.
    np.testing.assert_array_equal(made_pool["images"][32:], made["synth"]["pixels"]["pixels"])
    np.testing.assert_array_equal(soft_targets[32:], made["synth"]["targets"])
    # Distillation epochs leave the transfer set as it was made.
    for key in ("images", "labels", "count"):
        np.testing.assert_array_equal(final["synth"]["pool"][key], made_pool[key])
    np.testing.assert_array_equal(final["synth"]["soft_targets"], soft_targets)

    metrics = read_metrics(workdir)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics[:2]:
        assert {"synthesis/loss", "synthesis/ce", "synthesis/activation", "synthesis/target_kl", "pool/size"} <= set(m)
        assert not any(k.startswith("kd/") for k in m)
    for m in metrics[2:]:
        assert not any(k.startswith(("synthesis/", "pool/")) for k in m) and np.isfinite(m["kd/kl"])
    assert metrics[2]["kd/lr"] == pytest.approx(0.1) and metrics[3]["kd/lr"] == pytest.approx(0.05)
    assert summary["synthesis_steps"] == 3 * 2 and summary["student_steps"] == 2 * 3
    assert summary["synthetic_images_kept"] == 48
