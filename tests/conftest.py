"""Every test runs on 8 fake CPU devices, so each sharding path runs in CI."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from dfkd_jax import xla_cpu  # noqa: E402  before any backend exists: the tests run with the XLA:CPU flags users get

import pathlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared() -> pathlib.Path:
    """../shared beside the checkout. CI has it; a missing folder is an error, not a skip."""
    if not (SHARED / "teachers").is_dir() or not (SHARED / "data").is_dir():
        pytest.fail(f"{SHARED} with teachers/ and data/ is required (it sits beside the checkout in CI)")
    return SHARED


@pytest.fixture(scope="session")
def exact932(shared):
    with np.load(shared / "data" / "cifar10_test_exact932.npz") as data:
        return data["x"], data["y"]


def pytest_report_header(config):
    convolutions = "Eigen" if xla_cpu.eigen_convolutions() else "YNNPACK"
    return (f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices, "
            f"CPU convolutions: {convolutions}")
