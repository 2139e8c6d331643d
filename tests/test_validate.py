"""Config validation: every field with a range refuses an out-of-range value with one line naming the field, the value
and the range, before anything is written; presets and the entry point's errors are one line too."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dfkd_jax import methods, presets, validate
from dfkd_jax.validate import ConfigError

from tests.conftest import REPO
from tests.test_engine import load_config

# (method, field, bad value, the range the message must state). Each row is one field; the last rows are relations.
CASES = [
    ("nayer", "seed", -1, "an integer >= 0"),
    ("nayer", "student.lr", -1.0, "a number > 0"),
    ("nayer", "student.lr", 0.0, "a number > 0"),
    ("nayer", "student.lr", float("nan"), "a number > 0"),
    ("nayer", "student.momentum", 1.0, "a number in [0, 1)"),
    ("nayer", "student.weight_decay", -1e-4, "a number >= 0"),
    ("nayer", "student.temperature", 0.0, "a number > 0"),
    ("nayer", "student.batch_size", 0, "an integer >= 1"),
    ("nayer", "student.eta_min", -0.1, "a number >= 0"),
    ("nayer", "student.schedule", "linear", "one of 'cosine', 'warmup_cosine', 'cpsc_upstream', 'multistep', "
                                            "'constant'"),
    ("nayer", "student.warmup_epochs", -2, "an integer >= 0"),
    ("nayer", "student.init", "xavier", "one of 'upstream', 'kaiming_fan_in', 'kaiming_fan_out', 'torch_default', "
                                        "'wrn', 'vgg'"),
    ("deepinv", "student.milestones", (0.75, 0.6), "increasing fractions of training in (0, 1]"),
    ("deepinv", "student.milestones", (0.6, 1.5), "increasing fractions of training in (0, 1]"),
    ("nayer", "synthesis.batch_size", -16, "an integer >= 1"),
    ("nayer", "synthesis.lr", -4e-3, "a number > 0"),
    ("nayer", "synthesis.betas", (0.5, 1.0), "two values, each a number in [0, 1)"),
    ("nayer", "synthesis.g_steps", 0, "an integer >= 1"),
    ("nayer", "synthesis.bn_momentum", 1.5, "a number in [0, 1)"),
    ("nayer", "synthesis.bn_weight", -10.0, "a number >= 0"),
    ("nayer", "synthesis.ce_weight", -0.5, "a number >= 0"),
    ("nayer", "synthesis.adv_weight", float("inf"), "a number >= 0"),
    ("nayer", "synthesis.g_loops", 0, "an integer >= 1"),
    ("nayer", "synthesis.warmup_g_loops", 0, "an integer >= 1"),
    ("nayer", "synthesis.g_life", 0, "an integer >= 1"),
    ("nayer", "synthesis.noisy_size", 0, "an integer >= 1"),
    ("nayer", "synthesis.ngf", 0, "an integer >= 1"),
    ("nayer", "synthesis.embedding_dim", 0, "an integer >= 1"),
    ("deepinv", "synthesis.tv_norm", "l3", "one of 'l1', 'l2'"),
    ("deepinv", "synthesis.tv_weight", -1e-3, "a number >= 0"),
    ("deepinv", "synthesis.adv_temperature", 0.0, "a number > 0"),
    ("dafl", "synthesis.adversarial", "l2", "one of 'l1', 'masked_kl'"),
    ("dafl", "synthesis.balance_weight", -5.0, "a number >= 0"),
    ("dafl", "synthesis.nz", 0, "an integer >= 1"),
    ("dfad", "student.loss", "mse", "one of 'kl', 'l1'"),
    ("cae", "cend.sources", ("gaussian", "gaussian"), "a non-empty list of distinct values from 'gaussian', "
                                                      "'uniform', 'laplace', 'bernoulli'"),
    ("cae", "cend.sources", ("poisson",), "a non-empty list of distinct values from 'gaussian', 'uniform', "
                                          "'laplace', 'bernoulli'"),
    ("cae", "cend.init_magnitude", -0.1, "a number >= 0"),
    ("cae", "cend.assign", "all", "one of 'random', 'cycle'"),
    ("cae", "cend.redraw", "epoch", "one of 'step', 'round'"),
    ("cae", "cncl.weight", -1.0, "a number >= 0"),
    ("cae", "cncl.temperature", 0.0, "a number > 0"),
    ("cae", "cncl.projection_dim", 0, "an integer >= 1"),
    ("cae", "cncl.views", 0, "an integer >= 1"),
    ("cpsc", "synthesis.cbn_epsilon", 0.0, "a number > 0"),
    ("cpsc", "synthesis.lr_milestones", (150, 50), "strictly increasing integers >= 1"),
    ("cpsc", "synthesis.lr_milestones", (0.5,), "strictly increasing integers >= 1"),
    ("cpsc", "cpsc.ikd_weight", -5.0, "a number >= 0"),
    ("cpsc", "cpsc.bn_weight", -1.0, "a number >= 0"),
    ("cpsc", "cpsc.supcon_weight", float("nan"), "a number >= 0"),
    ("cpsc", "cpsc.ce_weight", -0.7, "a number >= 0"),
    ("cpsc", "cpsc.supcon_temperature", 0.0, "a number > 0"),
    ("cpsc", "cpsc.ikd_form", "square", "one of 'log', 'plain'"),
    ("cpsc", "cpsc.ce_on_probabilities", None, "True or False"),
    ("cgdd", "cgdd.ce_weight", -1.0, "a number >= 0"),
    ("cgdd", "cgdd.bn_weight", float("inf"), "a number >= 0"),
    ("cgdd", "cgdd.adv_weight", -1.0, "a number >= 0"),
    ("cgdd", "cgdd.student_ce_weight", -1.0, "a number >= 0"),
    ("cgdd", "cgdd.at_weight", -1000.0, "a number >= 0"),
    ("cgdd", "cgdd.at_form", "l3", "one of 'code', 'paper'"),
    ("mvn", "mvn.sigma", 0.0, "a number > 0"),
    ("mvn", "mvn.epsilon", -1e-3, "a number > 0"),
    ("mvn", "mvn.temperature", 0.0, "a number > 0"),
    ("mvn", "mvn.activation_weight", -0.1, "a number >= 0"),
    ("mvn", "mvn.mean", "bn", "one of 'zero'"),
    ("mvn", "synthesis.transfer_set", 0, "an integer >= 1"),
    ("mvn", "schedule.synthesis_epochs", 0, "an integer >= 1"),
    ("nayer", "schedule.epochs", 0, "an integer >= 1"),
    ("nayer", "schedule.warmup", -1, "an integer >= 0"),
    ("nayer", "schedule.kd_steps", -1, "an integer >= 0"),
    ("dafl", "schedule.cycles", 0, "an integer >= 1"),
    ("nayer", "data.image_shape", (30, 30, 3), "(height, width, 3) with height and width positive multiples of 4"),
    ("nayer", "data.image_shape", (32, 32, 1), "(height, width, 3) with height and width positive multiples of 4"),
    ("nayer", "pool.capacity", -1, "an integer >= 0"),
    ("nayer", "pool.dtype", "float16", "one of 'uint8', 'float32'"),
    ("nayer", "pool.sampling", "balanced", "one of 'uniform', 'shuffled', 'label_pairs'"),
    ("nayer", "eval.every_epochs", 0, "an integer >= 1"),
    ("nayer", "eval.batch_size", 0, "an integer >= 1"),
    ("nayer", "checkpoint.every_epochs", 0, "an integer >= 1"),
    ("nayer", "checkpoint.keep", 0, "an integer >= 1"),
    # Relations between fields.
    ("nayer", "student.eta_min", 0.5, "<= config.student.lr (0.1)"),
    ("nayer", "schedule.warmup", 7, "<= config.schedule.epochs (6)"),
]


@pytest.mark.parametrize("method, field, value, requirement", CASES,
                         ids=[f"{m}:{f}={v!r}" for m, f, v, _ in CASES])
def test_an_out_of_range_value_is_refused_naming_the_field_the_value_and_the_range(method, field, value,
                                                                                   requirement):
    config = load_config(method)
    validate.check(config, 1, methods.config_rules(method))  # the shipped config passes
    section, name = field.rsplit(".", 1) if "." in field else (None, field)
    (config[section] if section else config)[name] = value
    with pytest.raises(ConfigError) as raised:
        validate.check(config, 1, methods.config_rules(method))
    message = str(raised.value)
    assert message == f"config.{field} = {value!r} is out of range: it must be {requirement} (--config.{field}=...)"
    assert "\n" not in message


def test_cae_views_must_divide_the_synthesis_batch():
    config = load_config("cae")
    config.synthesis.batch_size, config.cncl.views = 100, 3
    with pytest.raises(ConfigError, match=r"config.synthesis.batch_size = 100 is out of range: it must be a "
                                          r"multiple of config.cncl.views \(3\)"):
        methods.get("cae").check_config(config)


def test_batches_must_split_over_the_devices():
    config = load_config("nayer")
    config.synthesis.batch_size = 100
    validate.check(config, 4)
    with pytest.raises(ConfigError, match=r"config.synthesis.batch_size = 100 is out of range: it must be a "
                                          r"multiple of the 8 devices of the mesh"):
        validate.check(config, 8)


def test_every_shipped_config_and_preset_passes():
    for method in ("cae", "nayer", "deepinv", "dafl", "dfad", "cpsc", "cgdd", "mvn"):
        for preset in ("digits", "cifar10", "cifar10,budget=cpu20", "cifar100", "cifar10,eval=shared"):
            config = load_config(method, preset)
            validate.check(config, 1, methods.config_rules(method))
            methods.get(method).check_config(config)
    for preset in ("variant=clean", "cifar10,budget=cpu20,variant=clean", "cifar100,variant=faithful"):
        validate.check(load_config("cpsc", preset), 1, methods.config_rules("cpsc"))


def test_unknown_method_and_presets_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"config.method = 'cmi' is not a method: it must be one of cae, cgdd, cpsc, dafl, deepinv"):
        methods.get("cmi")
    for preset, message in [("bogus", "unknown preset 'bogus'; datasets: digits, cifar10, cifar100"),
                            ("cifar10,teacher=nobody", "unknown teacher 'nobody'"),
                            ("cifar10,colour=red", "unknown preset key 'colour'"),
                            ("cifar10,eval=somewhere", "unknown eval='somewhere'; choose one of tfds, shared"),
                            ("cifar10,teacher=chenyaofo_cifar100_resnet56", "has 100 classes but dataset 'cifar10'")]:
        with pytest.raises(ConfigError, match=message):
            presets.parse_preset(preset, {"paper": {}})


def test_presets_for_users_of_the_cmi_zoo_and_for_cifar100(tmp_path):
    config = load_config("nayer", "cifar10,teacher=cifar10_resnet34,student=resnet18")
    assert config.teacher.torch_file == "checkpoints/pretrained/cifar10_resnet34.pth"
    assert (config.teacher.arch, config.teacher.normalisation) == ("resnet34", "cifar10")
    assert config.student.arch == "resnet18" and config.student.options.to_dict() == {}
    (tmp_path / "cifar100_wrn40_2.pth").write_bytes(b"")  # the upstream scripts' spelling of the name
    config = load_config("nayer", f"cifar100,teacher=cifar100_wrn_40_2,teacher_root={tmp_path}")
    assert config.teacher.torch_file == str(tmp_path / "cifar100_wrn40_2.pth")
    assert config.data.label_embedding_file.endswith("cifar100_clip_vitb32_text.npy")
    # CIFAR evaluates on the tfds test split unless the shared lossless images are asked for.
    assert load_config("nayer", "cifar100").eval.data == "cifar100"
    assert load_config("nayer", "cifar100,eval=shared").eval.data.endswith("cifar100_test_exact916.npz")
    assert load_config("nayer", "cifar10,eval=shared").eval.data.endswith("cifar10_test_exact932.npz")
    default = load_config("nayer", "cifar100")
    assert default.teacher.torch_file.endswith("chenyaofo/cifar100_resnet56.pth")
    assert tuple(default.teacher.mean) == (0.5070, 0.4865, 0.4409)


# ------------------------------------------------------------------------------------------------ main

def run_main(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dfkd_jax.main", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("args, message", [
    (["--config=configs/cae_missing.py"], "error: no config file configs/cae_missing.py (run from the repository "
                                          "root; configs: configs/cae.py, configs/cgdd.py, configs/cpsc.py,"),
    (["--config=configs/nayer.py:bogus"], "error: unknown preset 'bogus'; datasets: digits, cifar10, cifar100"),
    (["--config=configs/nayer.py", "--config.student.lrr=3"],
     "error: the config has no field 'lrr' (did you mean 'lr'?)"),
    (["--config=configs/nayer.py", "--config.student.lr=-1"],
     "error: config.student.lr = -1.0 is out of range: it must be a number > 0 (--config.student.lr=...)"),
    (["--config=configs/nayer.py:cifar10"], "error: tensorflow-datasets 'cifar10' is not prepared in"),
])
def test_the_entry_point_says_what_is_wrong_in_one_line_and_writes_nothing(args, message, tmp_path):
    workdir = tmp_path / "run"
    env_args = [*args, f"--workdir={workdir}"]
    if "cifar10" in args[0]:
        env_args.append(f"--config.eval.data_dir={tmp_path / 'tfds'}")
    completed = run_main(*env_args)
    assert completed.returncode != 0
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith(message), lines[0]
    assert not workdir.exists()


def test_a_cmi_zoo_teacher_is_found_and_converted_from_its_preset(tmp_path):
    """A CMI / Fast / NAYER user's file: TEACHER_ROOT/cifar10_wrn_16_1.pth holding {'state_dict': ...} with the
    zoo's key layout (docs/cmi_zoo_layouts.json)."""
    import jax
    import numpy as np
    import torch

    from benchmarks import torch_models
    from dfkd_jax import parallel, teachers

    torch.manual_seed(0)
    model = torch_models.randomise_batchnorm(torch_models.ZOO["wrn_16_1"](10), torch.Generator().manual_seed(1))
    torch.save({"state_dict": model.state_dict(), "best_acc1": 0.9}, tmp_path / "cifar10_wrn16_1.pth")
    config = load_config("nayer", f"cifar10,teacher=cifar10_wrn_16_1,teacher_root={tmp_path},eval=shared")
    workdir = tmp_path / "run"
    teachers.check_available(config, str(workdir))
    network, variables = teachers.prepare(config, str(workdir), parallel.make_data_mesh())
    assert network.spec.arch == "wrn_16_1" and network.spec.mean == presets_cifar10_mean()
    images = np.random.default_rng(0).uniform(size=(8, 32, 32, 3)).astype(np.float32)
    mean, std = np.float32(network.spec.mean), np.float32(network.spec.std)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2))).numpy()
    logits = jax.jit(lambda v, x: network.apply(v, x)[0].logits)(variables, images)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)

    missing = load_config("nayer", f"cifar10,teacher=cifar10_resnet34,teacher_root={tmp_path},eval=shared")
    with pytest.raises(FileNotFoundError, match=r"no teacher checkpoint at .*cifar10_resnet34.pth "
                                                r"\(config.teacher.torch_file\): put the file there, pass "
                                                r"teacher_root=DIR in the preset"):
        teachers.check_available(missing, str(tmp_path / "other"))


def presets_cifar10_mean():
    from dfkd_jax.models import CIFAR10_MEAN
    return tuple(float(v) for v in CIFAR10_MEAN)
