"""Every test runs on 8 fake CPU devices, so each sharding path runs in CI."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole session, its xdist workers and the subprocesses they start: the tiny
# runs compile the same programs again and again (a 3-epoch toy run: 37 s with a cold cache, 12 s with a warm one).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache",
                                   "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

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
def teacher_dir(tmp_path_factory) -> str:
    """A randomly initialised resnet20 for 16×16 digits, as a converted network directory: enough to exercise every
    step of the tiny runs (their accuracy is not tested)."""
    from dfkd_jax.data.digits import DIGITS_MEAN, DIGITS_STD
    from dfkd_jax.models import Network, NetworkSpec
    from dfkd_jax.network_io import save_network

    spec = NetworkSpec("resnet20", 10, {"shortcut": "A"}, mean=DIGITS_MEAN, std=DIGITS_STD)
    # kaiming_fan_out: the scheme the zoo used for every family when tests/test_golden.py's numbers were pinned.
    _, variables = Network.create(spec, seed=1, init="kaiming_fan_out")
    return save_network(tmp_path_factory.mktemp("teacher") / "resnet20", spec, variables)


@pytest.fixture(scope="session")
def exact932(shared):
    with np.load(shared / "data" / "cifar10_test_exact932.npz") as data:
        return data["x"], data["y"]


def pytest_report_header(config):
    convolutions = "Eigen" if xla_cpu.eigen_convolutions() else "YNNPACK"
    return (f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices, "
            f"CPU convolutions: {convolutions}")
