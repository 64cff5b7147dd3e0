"""Test set-up: 8 fake CPU devices for every test, absl flags marked parsed, shared fixtures.

XLA_FLAGS must be set before JAX is first imported, so this runs at collection time.
grain 0.2.18's multiprocess workers read an absl flag and fail unless flags are parsed.
"""

import importlib
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


def import_or_skip(name: str):
    """Imports the optional test dependency ``name``, or skips the test without it.

    In CI (the ``CI`` environment variable set) a missing dependency fails the test
    instead: the set-up there installs every test dependency (make setup-test), so a skip
    would only hide a broken set-up and leave the comparison untested.
    """
    try:
        return importlib.import_module(name)
    except ImportError as e:
        msg = f"the test dependency {name!r} is missing ({e}); make setup-test installs it"
        if os.environ.get("CI"):
            pytest.fail(f"{msg}. CI is set, so this test must run rather than skip",
                        pytrace=False)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def require():
    """`import_or_skip` as a fixture: ``torch = require("torch")``."""
    return import_or_skip
