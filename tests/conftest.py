"""Test set-up: 8 fake CPU devices for every test, implicit rank promotion an error, absl
flags marked parsed, shared fixtures and the helpers that run jobs as subprocesses.

XLA_FLAGS must be set before JAX is first imported, so this runs at collection time.
grain 0.2.18's multiprocess workers read an absl flag and fail unless flags are parsed.
"""

import importlib
import os
import socket
import subprocess
import sys
import time

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Implicit rank promotion ((B, L, D) + (L, D)) is an error in every test and in the jobs the
# tests start as subprocesses (they inherit the environment): broadcasting that lines up
# the wrong axes cannot hide behind it, and library code broadcasts explicitly.
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
jax.config.update("jax_numpy_rank_promotion", os.environ["JAX_NUMPY_RANK_PROMOTION"])

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# ----------------------------------------------------------------------------- command-line runs
# Tests that run the jobs as separate processes (`python -m dalle_jax.main`), as a cluster
# or a preempted machine would; imported with ``from conftest import launch, run, ...``.


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a JAX coordinator)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args, workdir, *, processes=1, devices=8, heartbeat_s=None, env=None,
           extra_args=None):
    """Starts ``processes`` copies of ``python -m dalle_jax.main ARGS`` with ``devices``
    fake CPU devices each; returns the Popen objects (output in workdir/log.<i>.txt).
    ``extra_args``: process index -> more flags for that process only."""
    base = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    base.update(env or {})
    os.makedirs(workdir, exist_ok=True)
    port = free_port()
    procs = []
    for i in range(processes):
        cmd = [sys.executable, "-u", "-m", "dalle_jax.main", *args, f"--workdir={workdir}"]
        if processes > 1:
            cmd += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                    f"--process_id={i}"]
        if heartbeat_s:
            cmd.append(f"--heartbeat_timeout_s={heartbeat_s}")
        cmd += (extra_args or {}).get(i, [])
        log = open(os.path.join(workdir, f"log.{i}.txt"), "a")
        procs.append(subprocess.Popen(cmd, env=base, stdout=log, stderr=subprocess.STDOUT,
                                      cwd=ROOT))
        procs[-1].log_path = log.name
    return procs


def wait(procs, timeout=300):
    """Return codes and outputs of ``procs``, waiting at most ``timeout`` seconds in all."""
    deadline = time.time() + timeout
    out = []
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        with open(p.log_path) as f:
            out.append((p.returncode, f.read()))
    return out


def run(args, workdir, **kw):
    """`launch` then `wait`, asserting that every process exited with 0."""
    results = wait(launch(args, workdir, **kw))
    for rc, text in results:
        assert rc == 0, text[-4000:]
    return results


def losses(workdir):
    """``{step: train/loss}`` of a run's metrics.jsonl (the last row of each step)."""
    from dalle_jax import metrics as metrics_lib

    rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return {s: r["train/loss"] for s, r in sorted(rows.items()) if "train/loss" in r}


def train_rows(workdir) -> int:
    """Lines of metrics.jsonl that log a training window (a resumed run adds, never repeats)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return sum('"train/loss"' in line for line in f)


def wait_for_training(workdir, procs, min_rows=3, timeout=240):
    """Blocks until process 0 has logged ``min_rows`` training windows."""
    deadline = time.time() + timeout
    path = os.path.join(workdir, "metrics.jsonl")
    while time.time() < deadline:
        if os.path.exists(path) and train_rows(workdir) >= min_rows:
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    raise AssertionError("training did not start: " + "".join(
        open(p.log_path).read()[-2000:] for p in procs))
