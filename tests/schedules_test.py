"""The scalar schedules of the step (dalle_jax.train.schedules) against their closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.train import schedules


def _at(fn, steps):
    return np.asarray([float(fn(jnp.asarray(s))) for s in steps], np.float64)


def test_cosine_half_and_quarter_closed_forms():
    v0, v1, n, start = 2.0, 0.5, 8, 3
    steps = list(range(0, start + n + 4))
    t = np.clip((np.asarray(steps) - start) / n, 0, 1)
    half = v0 + (v1 - v0) * 0.5 * (1 - np.cos(np.pi * t))
    quarter = v0 + (v1 - v0) * (1 - np.cos(0.5 * np.pi * t))
    np.testing.assert_allclose(_at(schedules.cosine(v0, v1, n, start=start), steps), half,
                               rtol=1e-6)
    np.testing.assert_allclose(
        _at(schedules.cosine(v0, v1, n, start=start, kind="quarter"), steps), quarter, rtol=1e-6)
    # Endpoints and midpoint by hand: held at v0 before start, v1 from start + n on; the
    # half curve is halfway at the midpoint, the quarter one only 1 - cos(pi/4) of the way.
    fn = schedules.cosine(v0, v1, n, start=start)
    assert [float(fn(s)) for s in (0, 3, 7, 11, 100)] == pytest.approx([2.0, 2.0, 1.25, 0.5, 0.5])
    q = schedules.cosine(v0, v1, n, start=start, kind="quarter")
    assert float(q(7)) == pytest.approx(2.0 - 1.5 * (1 - math.sqrt(0.5)), rel=1e-6)
    with pytest.raises(ValueError, match="cosine kind 'full'"):
        schedules.cosine(v0, v1, n, kind="full")


def test_linear_constant_and_zero_length():
    fn = schedules.linear(1.0, 3.0, 4, start=2)
    np.testing.assert_allclose(_at(fn, range(8)), [1, 1, 1, 1.5, 2, 2.5, 3, 3], rtol=1e-6)
    c = schedules.constant(0.25)
    np.testing.assert_array_equal(_at(c, [0, 7, 10**6]), [0.25] * 3)
    assert c(jnp.asarray(3)).dtype == jnp.float32 and c(jnp.asarray(3)).shape == ()
    # A schedule of no steps is at its end value from the start.
    np.testing.assert_array_equal(_at(schedules.linear(1.0, 3.0, 0), [0, 5]), [3.0, 3.0])
    np.testing.assert_array_equal(_at(schedules.cosine(1.0, 3.0, 0), [0, 5]), [3.0, 3.0])


def test_piecewise_halving():
    fn = schedules.piecewise_halving(0.8, 4, (10, 6))  # the steps need not be sorted
    want = [0.0, 0.2, 0.4, 0.6, 0.8, 0.8, 0.4, 0.4, 0.4, 0.4, 0.2, 0.2]
    np.testing.assert_allclose(_at(fn, range(12)), want, rtol=1e-6)
    np.testing.assert_allclose(_at(schedules.piecewise_halving(0.8, 4, ()), [4, 10**6]),
                               [0.8, 0.8], rtol=1e-6)


def test_from_config_kinds():
    warm = schedules.from_config(dict(kind="warmup_cosine", peak=1.0, end_value=0.1, warmup=4,
                                      steps=12))
    # Linear from 0 over 4 steps, then a half cosine from 1.0 at step 4 to 0.1 at step 12.
    t = np.clip((np.arange(4, 14) - 4) / 8, 0, 1)
    want = [0.0, 0.25, 0.5, 0.75] + list(1.0 + (0.1 - 1.0) * 0.5 * (1 - np.cos(np.pi * t)))
    np.testing.assert_allclose(_at(warm, range(14)), want, rtol=1e-6, atol=1e-7)
    assert float(warm(4)) == pytest.approx(1.0) and float(warm(12)) == pytest.approx(0.1)
    # cosine: "warmup" is where the cosine starts (held at start_value before it).
    cos = schedules.from_config(dict(kind="cosine", start_value=1.0, end_value=0.0, steps=4,
                                     warmup=2, shape="half"))
    np.testing.assert_allclose(_at(cos, range(7)), [1, 1, 1, 0.8535534, 0.5, 0.1464466, 0],
                               rtol=1e-5, atol=1e-7)
    lin = schedules.from_config(dict(kind="linear", start_value=0.0, end_value=1.0, steps=4))
    np.testing.assert_allclose(_at(lin, [0, 1, 4, 9]), [0, 0.25, 1, 1], rtol=1e-6)
    assert float(schedules.from_config(dict(kind="constant", value=3))(5)) == 3.0
    halving = schedules.from_config(dict(kind="warmup_halving", peak=2.0, warmup=2,
                                         halve_at="3, 5"))
    np.testing.assert_allclose(_at(halving, range(7)), [0, 1, 2, 1, 1, 0.5, 0.5], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown schedule kind 'step'"):
        schedules.from_config(dict(kind="step"))


def test_schedules_trace_under_jit_with_a_traced_step():
    fn = schedules.from_config(dict(kind="warmup_cosine", peak=1.0, end_value=0.1, warmup=4,
                                    steps=12))
    jitted = jax.jit(fn)
    np.testing.assert_allclose([float(jitted(jnp.asarray(s))) for s in (2, 8, 20)],
                               [float(fn(s)) for s in (2, 8, 20)], rtol=1e-7)
