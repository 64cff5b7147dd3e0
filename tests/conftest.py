"""Test set-up: 8 fake CPU devices for every test, absl flags marked parsed, shared fixtures.

XLA_FLAGS must be set before JAX is first imported, so this runs at collection time.
grain 0.2.18's multiprocess workers read an absl flag and fail unless flags are parsed.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite the checked-in golden files (tests/golden/) instead of "
                          "comparing against them")


@pytest.fixture
def update_golden(request):
    return request.config.getoption("--update-golden")


@pytest.fixture(scope="module")
def fast_compile():
    """Compiles with most XLA optimisations off (about half the CPU compile time) for the
    tests of a module; results are compared only under the same setting."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)
