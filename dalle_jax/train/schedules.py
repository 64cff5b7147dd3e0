"""Scalar schedules of the step: learning rates, KL weight, relaxation temperature.

The paper anneals every dVAE quantity with "a cosine schedule" between two endpoints
(App. A.2) without giving the formula. ``half`` (the usual ½(1+cos) curve) is the
default; ``quarter`` (1−cos(πt/2), slow start, fast finish) is the other common reading.
Past its last step a schedule holds its end value.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

Schedule = Callable[[jnp.ndarray], jnp.ndarray]
COSINE_KINDS = ("half", "quarter")


def _frac(step, start: int, steps: int):
    if steps <= 0:
        return jnp.ones_like(jnp.asarray(step, jnp.float32))
    return jnp.clip((jnp.asarray(step, jnp.float32) - start) / steps, 0.0, 1.0)


def cosine(v0: float, v1: float, steps: int, *, start: int = 0, kind: str = "half") -> Schedule:
    """Goes from ``v0`` at ``start`` to ``v1`` at ``start + steps`` along a cosine, then holds."""
    if kind not in COSINE_KINDS:
        raise ValueError(f"cosine kind {kind!r} is not one of {COSINE_KINDS}")

    def fn(step):
        t = _frac(step, start, steps)
        if kind == "half":
            w = 0.5 * (1.0 - jnp.cos(jnp.pi * t))
        else:
            w = 1.0 - jnp.cos(0.5 * jnp.pi * t)
        return v0 + (v1 - v0) * w

    return fn


def linear(v0: float, v1: float, steps: int, *, start: int = 0) -> Schedule:
    def fn(step):
        return v0 + (v1 - v0) * _frac(step, start, steps)

    return fn


def constant(v: float) -> Schedule:
    def fn(step):
        return jnp.full((), v, jnp.float32) + 0.0 * jnp.asarray(step, jnp.float32)

    return fn


def piecewise_halving(peak: float, warmup: int, halve_at: tuple[int, ...]) -> Schedule:
    """Linear warm-up to ``peak``, then halved at each step in ``halve_at`` (paper §B.2)."""
    bounds = jnp.asarray(sorted(halve_at) or [2**62], jnp.float32)

    def fn(step):
        s = jnp.asarray(step, jnp.float32)
        n = jnp.sum(s >= bounds) if halve_at else 0
        return linear(0.0, peak, warmup)(s) * jnp.power(0.5, n)

    return fn


def from_config(c) -> Schedule:
    """Builds a schedule from a config dict with ``kind`` and its fields.

    kinds: ``constant`` (value), ``cosine`` (start_value, end_value, steps, warmup, shape),
    ``linear`` (start_value, end_value, steps), ``warmup_cosine`` (peak, end_value,
    warmup, steps: linear warm-up from 0 then a half cosine to end_value),
    ``warmup_halving`` (peak, warmup, halve_at: comma-separated steps).
    """
    kind = c["kind"]
    if kind == "constant":
        return constant(float(c["value"]))
    if kind == "cosine":
        return cosine(float(c["start_value"]), float(c["end_value"]), int(c["steps"]),
                      start=int(c.get("warmup", 0)), kind=c.get("shape", "half"))
    if kind == "linear":
        return linear(float(c["start_value"]), float(c["end_value"]), int(c["steps"]))
    if kind == "warmup_cosine":
        warm = linear(0.0, float(c["peak"]), int(c["warmup"]))
        decay = cosine(float(c["peak"]), float(c["end_value"]), int(c["steps"]) - int(c["warmup"]),
                       start=int(c["warmup"]), kind=c.get("shape", "half"))
        w = int(c["warmup"])
        return lambda step: jnp.where(jnp.asarray(step) < w, warm(step), decay(step))
    if kind == "warmup_halving":
        at = tuple(int(s) for s in str(c.get("halve_at", "")).split(",") if s.strip())
        return piecewise_halving(float(c["peak"]), int(c["warmup"]), at)
    raise ValueError(f"unknown schedule kind {kind!r}; use constant, cosine, linear, "
                     "warmup_cosine or warmup_halving")
