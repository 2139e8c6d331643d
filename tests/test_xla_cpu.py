"""Convolutions out of YNNPACK: switched at import, a user's choice kept, float32-accurate."""

import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from dfkd_jax import xla_cpu
from dfkd_jax.models import conv


def test_the_flag_is_added_once_and_a_users_choice_is_kept():
    assert xla_cpu.with_ynn_dots("") == "--xla_cpu_experimental_ynn_fusion_type=dot"
    assert xla_cpu.with_ynn_dots("--xla_force_host_platform_device_count=8") == (
        "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=dot")
    users = "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise"
    assert xla_cpu.with_ynn_dots(users) == users
    assert xla_cpu.ynn_fusion_types(users) == ("dot", "eltwise")


@pytest.mark.parametrize("flags, eigen", [("", False), ("--xla_cpu_experimental_ynn_fusion_type=dot", True),
                                          ("--xla_cpu_experimental_ynn_fusion_type=individual_convolution", False),
                                          ("--xla_cpu_experimental_ynn_fusion_type=+dot", False),
                                          ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution", True)])
def test_convolutions_are_on_eigen_only_when_the_list_leaves_them_out(monkeypatch, flags, eigen):
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert xla_cpu.eigen_convolutions() == eigen
    assert xla_cpu.ynn_fusion_types("--xla_cpu_experimental_ynn_fusion_type=") == ()  # none: Eigen too
    assert xla_cpu.ynn_fusion_types("--xla_force_host_platform_device_count=8") is None


def test_this_process_compiles_convolutions_outside_ynnpack_and_uses_xlas_weight_gradient():
    assert xla_cpu.eigen_convolutions()
    x, w = np.ones((8, 16, 16, 32), np.float32), np.ones((3, 3, 32, 32), np.float32)  # XLA's default: YNNPACK
    loss = lambda x, w: (conv.conv2d(x, w, 1, ((1, 1), (1, 1))) ** 2).sum()  # noqa: E731
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
    assert "__ynn_fusion" not in hlo and hlo.count("convolution(") == 3  # forward, input and weight gradients
    assert conv.weight_grad_mode() == "xla"


@pytest.mark.parametrize("stride", [1, 2])
def test_convolution_and_both_gradients_match_float64_pytorch(stride):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16, 16, 16)).astype(np.float32)
    w = (0.1 * rng.standard_normal((3, 3, 16, 32))).astype(np.float32)
    pad = ((1, 1), (1, 1))
    y, vjp = jax.vjp(lambda x, w: conv.conv2d(x, w, stride, pad), x, w)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw = jax.jit(vjp)(dy)

    xt = torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(w.transpose(3, 2, 0, 1), dtype=torch.float64, requires_grad=True)
    yt = torch.nn.functional.conv2d(xt, wt, stride=stride, padding=1)
    yt.backward(torch.tensor(dy.transpose(0, 3, 1, 2), dtype=torch.float64))

    def relative(actual, expected):
        return np.linalg.norm(np.asarray(actual, np.float64) - expected) / np.linalg.norm(expected)
    assert relative(y, yt.detach().numpy().transpose(0, 2, 3, 1)) < 1e-6
    assert relative(dx, xt.grad.numpy().transpose(0, 2, 3, 1)) < 1e-6
    assert relative(dw, wt.grad.numpy().transpose(2, 3, 1, 0)) < 1e-6


def test_importing_after_jax_started_leaves_the_flags_and_says_so():
    script = ("import os, warnings, jax; jax.devices()\n"
              "with warnings.catch_warnings(record=True) as caught:\n"
              "    warnings.simplefilter('always')\n    import dfkd_jax\n"
              "print('warned:', *(str(w.message) for w in caught))\n"
              "from dfkd_jax.models import conv\n"
              "print('flags:', os.environ.get('XLA_FLAGS', ''), 'mode:', conv.weight_grad_mode())")
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert "warned: JAX's backends were created before dfkd_jax was imported" in out
    assert "ynn" not in out.split("flags:")[1] and "mode: gemm" in out
