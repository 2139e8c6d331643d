"""CGDD: attention transfer against references written from Zagoruyko & Komodakis (their paper's eq. 2 and their
code's `at_loss`) in PyTorch float64, the student loss against KL_τ + CE + β/2·AT written the same way, the
conditional generator's use of the labels, and a teacher/student pair whose stages cannot pair refused before
anything is written. One run on 1 and 8 devices and a killed-and-resumed run are in tests/test_engine.py."""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dfkd_jax import losses, parallel, validate
from dfkd_jax.methods.cgdd import Cgdd
from dfkd_jax.models import Network, NetworkSpec, Output
from dfkd_jax.train import train_and_evaluate
from tests.conftest import REPO


def load_config(arg: str = ""):
    spec = importlib.util.spec_from_file_location("configs_cgdd", REPO / "configs" / "cgdd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# ------------------------------------------------------------------- references, from the paper and the AT code

def torch_attention(stage_nchw: torch.Tensor) -> torch.Tensor:
    """Q = Σ_c |A_c|² / C flattened, divided by its ℓ2 norm: the paper's F(A) with p = 2 (mean, as their code)."""
    q = stage_nchw.pow(2).mean(1).reshape(stage_nchw.shape[0], -1)
    return q / q.norm(dim=1, keepdim=True)


def torch_at(student_stages, teacher_stages, form: str) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for s, t in zip(student_stages, teacher_stages):
        size = min(s.shape[2], t.shape[2])
        s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
        difference = torch_attention(s) - torch_attention(t)
        if form == "paper":  # ‖Q_S/‖Q_S‖ − Q_T/‖Q_T‖‖₂ per sample, averaged over the batch
            total = total + difference.norm(dim=1).mean()
        else:  # at_loss: (at(x) − at(y)).pow(2).mean()
            total = total + difference.pow(2).mean()
    return total


def random_stages(rng: np.random.Generator, sizes, channels, batch: int = 4) -> list[np.ndarray]:
    # post-ReLU-like activations with some structure, so the maps are far from uniform
    return [np.maximum(rng.standard_normal((batch, size, size, c)) + rng.standard_normal((1, size, size, 1)), 0)
            for size, c in zip(sizes, channels)]


def to_torch(stages) -> list[torch.Tensor]:
    return [torch.from_numpy(np.transpose(s, (0, 3, 1, 2))).double() for s in stages]


@pytest.mark.parametrize("form", ["code", "paper"])
def test_attention_transfer_matches_the_formula_in_float64(form):
    rng = np.random.default_rng(0)
    # a He-ResNet-like student (16/32/64 channels at 32/16/8) against a wider teacher with the same stage sizes
    student = random_stages(rng, (32, 16, 8), (16, 32, 64))
    teacher = random_stages(rng, (32, 16, 8), (64, 128, 256))
    ours = losses.attention_transfer([jnp.asarray(s, jnp.float32) for s in student],
                                     [jnp.asarray(t, jnp.float32) for t in teacher], form)
    reference = torch_at(to_torch(student), to_torch(teacher), form).item()
    assert float(ours) == pytest.approx(reference, rel=1e-5)
    assert reference > 1e-4  # the maps differ: the check is not between two zeros


def test_attention_transfer_pools_the_larger_map_where_stage_sizes_differ():
    rng = np.random.default_rng(1)
    student = random_stages(rng, (16, 8, 4), (16, 32, 64))
    teacher = random_stages(rng, (32, 16, 8), (16, 32, 64))
    for form in ("code", "paper"):
        ours = losses.attention_transfer([jnp.asarray(s) for s in student], [jnp.asarray(t) for t in teacher], form)
        assert float(ours) == pytest.approx(torch_at(to_torch(student), to_torch(teacher), form).item(), rel=1e-5)


def test_attention_transfer_is_zero_for_proportional_activations_and_its_gradient_is_finite():
    rng = np.random.default_rng(2)
    teacher = [jnp.asarray(t) for t in random_stages(rng, (8, 4), (8, 16))]
    # A stage scaled by a constant has the same normalised map (and a channel count of its own does not matter).
    student = [3.0 * jnp.concatenate([t, t], axis=-1) for t in teacher]
    for form in ("code", "paper"):
        assert float(losses.attention_transfer(student, teacher, form)) == pytest.approx(0.0, abs=1e-6)
        gradient = jax.grad(lambda s: losses.attention_transfer(s, teacher, form))(student)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in gradient)
    with pytest.raises(ValueError, match="the student has 1, the teacher 2"):
        losses.attention_transfer(student[:1], teacher)


# ------------------------------------------------------------------------------------------- the method's losses

@pytest.fixture(scope="module")
def method():
    config = load_config()
    teacher, _ = Network.create(NetworkSpec("resnet20", 10, {"shortcut": "A"}))
    student, _ = Network.create(NetworkSpec("wrn_16_1", 10))
    return Cgdd(config, teacher, student, parallel.make_data_mesh(jax.devices()[:1]))


def test_the_student_loss_is_kl_at_tau_4_plus_ce_on_the_preset_labels_plus_half_beta_times_at(method):
    rng = np.random.default_rng(3)
    batch, classes = 8, 10
    s_logits, t_logits = (rng.standard_normal((batch, classes)) * 3 for _ in range(2))
    labels = rng.integers(0, classes, batch)
    s_stages, t_stages = random_stages(rng, (16, 8, 4), (16, 32, 64), batch), random_stages(rng, (16, 8, 4),
                                                                                            (16, 32, 64), batch)

    def output(logits, stages):
        return Output(jnp.asarray(logits, jnp.float32), jnp.zeros((batch, 4)), (),
                      tuple(jnp.asarray(s, jnp.float32) for s in stages))

    loss, terms, _ = method.student_loss(output(s_logits, s_stages), output(t_logits, t_stages),
                                         {"labels": jnp.asarray(labels, jnp.int32)}, {}, {})
    tau = 4.0
    s, t = torch.from_numpy(s_logits), torch.from_numpy(t_logits)
    kl = F.kl_div(F.log_softmax(s / tau, 1), F.softmax(t / tau, 1), reduction="batchmean") * tau ** 2
    ce = F.cross_entropy(s, torch.from_numpy(labels))
    at = torch_at(to_torch(s_stages), to_torch(t_stages), "code")
    reference = kl + 1.0 * ce + 1000.0 / 2 * at
    assert float(terms["kd/kl"]) == pytest.approx(kl.item(), rel=1e-5)
    assert float(terms["kd/ce"]) == pytest.approx(ce.item(), rel=1e-5)
    assert float(loss) == pytest.approx(reference.item(), rel=1e-5)


def test_the_generator_loss_is_ce_to_the_preset_label_plus_bn_minus_the_l1_gap(method):
    rng = np.random.default_rng(4)
    s_logits, t_logits = (rng.standard_normal((6, 10)) for _ in range(2))
    labels = rng.integers(0, 10, 6)
    out = lambda logits: Output(jnp.asarray(logits, jnp.float32), jnp.zeros((6, 4)), (), ())  # noqa: E731
    loss, terms = method.generator_loss_terms(out(s_logits), out(t_logits), jnp.asarray(labels, jnp.int32))
    ce = F.cross_entropy(torch.from_numpy(t_logits), torch.from_numpy(labels)).item()
    l1 = np.mean(np.abs(t_logits - s_logits))
    assert float(terms["synthesis/ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(terms["synthesis/adv"]) == pytest.approx(-l1, rel=1e-5)
    assert float(loss) == pytest.approx(ce + 0.0 - l1, rel=1e-5)  # no BatchNorm inputs given: BN = 0
    assert float(terms["synthesis/label_match"]) == pytest.approx(np.mean(t_logits.argmax(1) == labels))


def test_the_generator_draws_differ_by_label_alone(method):
    variables = method.init(jax.random.PRNGKey(0))["generator"]
    z = jnp.tile(jax.random.normal(jax.random.PRNGKey(1), (1, method.config.synthesis.nz)), (4, 1))
    images, _ = method.generate(variables, z, jnp.asarray([0, 0, 1, 2], jnp.int32))
    images = np.asarray(images)
    assert images.shape == (4, *method.image_shape) and images.min() >= 0 and images.max() <= 1
    np.testing.assert_array_equal(images[0], images[1])  # same z, same label
    assert np.abs(images[0] - images[2]).mean() > 1e-3 and np.abs(images[2] - images[3]).mean() > 1e-3


# ------------------------------------------------------------------------------------------------- refusal

def test_a_student_whose_stages_cannot_pair_with_the_teacher_s_is_refused_before_anything_is_written(tmp_path):
    config = load_config("cifar10,student=resnet18")  # four stages against resnet56's three
    with pytest.raises(validate.ConfigError, match=r"teacher resnet56 ends its stages at sizes \[32, 16, 8\], the "
                                                   r"student resnet18 at \[32, 16, 8, 4\]; .*cgdd.at_weight=0"):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
    config.cgdd.at_weight = 0.0
    Cgdd.check_config(config)  # without attention transfer the pair is fine


def test_every_decided_value_is_a_config_field_with_its_default():
    config = load_config()
    assert dict(config.cgdd) == dict(ce_weight=1.0, bn_weight=1.0, adv_weight=1.0, student_ce_weight=1.0,
                                     at_weight=1000.0, at_form="code")
    assert (config.student.temperature, config.synthesis.g_steps, config.schedule.kd_steps) == (4.0, 5, 5)
    with pytest.raises(validate.ConfigError, match="cgdd.at_form"):
        config.cgdd.at_form = "l3"
        validate.check(config, 1, Cgdd.CONFIG_RULES)
