"""Structured attention: equals dense masked attention (values and gradients) for every kind."""

import functools

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax import sharding
from dalle_jax.models import attention, masks

KINDS = ("dense", "row", "column", "conv_raster", "conv_2d")
# (T, G, kernel): small grids, an odd grid, a kernel larger than the grid (dense fallback
# for the conv kinds at G=3) and a long text prefix.
CONFIGS = [(4, 4, 3), (3, 5, 5), (16, 8, 11), (2, 3, 11)]
B, H, K = 2, 2, 8
# These tests check values, not speed, and compile time dominates them: skip LLVM's
# optimisation passes (about 3x faster compiles on CPU, same HLO).
_JIT = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _reference(q, k, v, mask_LL):
    """Plain masked softmax attention, written independently of the model code."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    logits = jnp.where(mask_LL, logits, -jnp.inf)
    return jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(logits, axis=-1), v)


def _with_grads(fn, q, k, v, proj):
    """``fn(q, k, v)`` and the gradients of ``sum(fn(q, k, v) * proj)`` w.r.t. q, k, v."""
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(proj.astype(out.dtype))


# The mask is an argument, so each shape compiles once for all kinds.
@_JIT
def _reference_with_grads(q, k, v, proj, mask_LL):
    return _with_grads(lambda *a: _reference(*a, mask_LL), q, k, v, proj)


@functools.partial(_JIT,
                   static_argnames=("kind", "text_len", "grid", "kernel", "rows_per_block"))
def _structured_with_grads(q, k, v, proj, *, kind, text_len, grid, kernel,
                           rows_per_block=None):
    # band_max_ratio=1: these small grids must exercise the band path, not its fallback.
    fn = functools.partial(attention.attend_structured, kind=kind, text_len=text_len,
                           grid=grid, kernel=kernel, rows_per_block=rows_per_block,
                           band_max_ratio=1.0)
    return _with_grads(fn, q, k, v, proj)


def _inputs(text_len, grid, dtype=jnp.float32, seed=0):
    """Random q, k, v ``(B, L, H, K)`` in ``dtype`` and a float32 output projection."""
    rng = np.random.default_rng(seed)
    q, k, v, proj = rng.standard_normal((4, B, text_len + grid * grid, H, K), np.float32)
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
            jnp.asarray(proj))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("text_len,grid,kernel", CONFIGS)
def test_matches_dense_values_and_grads(kind, text_len, grid, kernel):
    # Under jit: values and gradients of a random projection of the output.
    q, k, v, proj = _inputs(text_len, grid)
    mask_LL = jnp.asarray(masks.mask(text_len, grid, kind, kernel=kernel))
    out, grads = _structured_with_grads(q, k, v, proj, kind=kind, text_len=text_len,
                                        grid=grid, kernel=kernel)
    want_out, want_grads = _reference_with_grads(q, k, v, proj, mask_LL)
    assert out.shape == q.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=1e-5)
    for name, g, w in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"d/d{name}")


@pytest.mark.parametrize("kind", ["row", "conv_raster", "conv_2d"])
def test_rows_per_block_changes_cost_not_result(kind):
    # The default already runs 1-row blocks (row, conv_raster) and 2-row blocks (conv_2d at
    # CONFIGS[1:3]); 3-row blocks over G = 7 add a ragged last block. w = 1, 3 and 2 here.
    text_len, grid, kernel, rows_per_block = 5, 7, 5, 3
    q, k, v, proj = _inputs(text_len, grid, seed=4)
    mask_LL = jnp.asarray(masks.mask(text_len, grid, kind, kernel=kernel))
    out, grads = _structured_with_grads(q, k, v, proj, kind=kind, text_len=text_len,
                                        grid=grid, kernel=kernel,
                                        rows_per_block=rows_per_block)
    want_out, want_grads = _reference_with_grads(q, k, v, proj, mask_LL)
    np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
    cost = attention.attention_cost(kind, text_len, grid, kernel, rows_per_block,
                                    band_max_ratio=1.0)
    assert cost["path"] == "band" and cost["rows_per_block"] == rows_per_block
    n_blocks = -(-grid // rows_per_block)
    window_rows = rows_per_block + cost["window"]
    assert cost["structured"] == (text_len ** 2 + grid ** 2 * text_len
                                  + n_blocks * rows_per_block * grid * window_rows * grid)


def test_dense_attend_matches_reference():
    # The module's dense path (finite mask value) is the same attention as the reference.
    q, k, v, proj = _inputs(4, 4, seed=1)
    mask_LL = jnp.asarray(masks.mask(4, 4, "row"))
    fn = _JIT(attention.dense_attend)
    np.testing.assert_allclose(fn(q, k, v, mask_LL),
                               _reference_with_grads(q, k, v, proj, mask_LL)[0], atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_close_to_float32(kind):
    text_len, grid, kernel = CONFIGS[0]
    q, k, v, proj = _inputs(text_len, grid, dtype=jnp.bfloat16, seed=2)
    out = _JIT(functools.partial(attention.attend_structured, kind=kind, text_len=text_len,
                                 grid=grid, kernel=kernel, band_max_ratio=1.0))(q, k, v)
    assert out.dtype == jnp.bfloat16 and out.shape == q.shape
    mask_LL = jnp.asarray(masks.mask(text_len, grid, kind, kernel=kernel))
    # Float32 math on the same (bfloat16-rounded) inputs.
    want = _reference_with_grads(*(x.astype(jnp.float32) for x in (q, k, v)), proj, mask_LL)[0]
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=2e-2, rtol=2e-2)


def _avals(jaxpr):
    """Abstract values of every equation output, sub-jaxprs included."""
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _avals(sub)


@pytest.mark.parametrize("kind", ["row", "column", "conv_raster", "conv_2d"])
def test_never_builds_the_full_logits(kind):
    text_len, grid, kernel = CONFIGS[2]
    n = text_len + grid * grid
    q, k, v, _ = _inputs(text_len, grid)
    fn = functools.partial(attention.attend_structured, kind=kind, text_len=text_len,
                           grid=grid, kernel=kernel, band_max_ratio=1.0)
    jaxpr = jax.make_jaxpr(jax.grad(lambda *a: fn(*a).sum(), argnums=(0, 1, 2)))(q, k, v)
    for aval in _avals(jaxpr.jaxpr):
        assert list(getattr(aval, "shape", ())).count(n) < 2, aval
        assert getattr(aval, "size", 0) < B * H * n * n, aval


def test_conv_alias_is_conv_raster():
    assert (attention.attention_cost("conv", 3, 5, 3)
            == attention.attention_cost("conv_raster", 3, 5, 3))


def test_rejects_bad_kind_and_shape():
    q, k, v, _ = _inputs(3, 4)
    with pytest.raises(ValueError, match="column_transposed"):
        attention.attend_structured(q, k, v, kind="column_transposed", text_len=3, grid=4)
    with pytest.raises(ValueError, match="shape"):
        attention.attend_structured(q, k, v, kind="row", text_len=4, grid=4)


def test_cost_falls_with_the_mask():
    t, g = 64, 16
    n = t + g * g
    costs = {kind: attention.attention_cost(kind, t, g, 11) for kind in KINDS}
    assert costs["dense"]["structured"] == costs["dense"]["dense"] == n * n
    assert costs["row"]["path"] == "band" and costs["row"]["window"] == 1
    assert costs["row"]["structured"] == t * t + g * g * (t + 2 * g)
    assert costs["column"]["path"] == "column"
    assert costs["column"]["structured"] == t * t + g * g * (t + g)
    # conv_raster wraps one row further back than the kernel's half-height.
    assert costs["conv_2d"]["window"] == 5 and costs["conv_raster"]["window"] == 6
    for kind in ("row", "column", "conv_raster", "conv_2d"):
        c = costs[kind]
        assert c["allowed"] <= c["structured"] < c["dense"], kind
    assert costs["row"]["ratio"] < 0.3 and costs["column"]["ratio"] < 0.3
    # No saving when the band covers the whole image: dense fallback.
    assert attention.attention_cost("conv_2d", 2, 3, 11)["path"] == "dense"


def test_band_that_saves_too_little_runs_dense():
    # The paper's 11x11 conv on an 8x8 grid would still compute 72% of the dense logits.
    banded = attention.attention_cost("conv_raster", 32, 8, 11, band_max_ratio=1.0)
    assert banded["path"] == "band" and banded["ratio"] > attention.BAND_MAX_RATIO
    auto = attention.attention_cost("conv_raster", 32, 8, 11)
    assert auto["path"] == "dense" and auto["ratio"] == 1.0
    # Rows and columns at that size, and the conv kinds at 16x16, stay structured.
    assert attention.attention_cost("row", 32, 8, 11)["path"] == "band"
    assert attention.attention_cost("conv_raster", 64, 16, 11)["path"] == "band"
    # Either way the result is the dense masked attention.
    q, k, v, proj = _inputs(32, 8, seed=5)
    out = _JIT(functools.partial(attention.attend_structured, kind="conv_raster",
                                 text_len=32, grid=8))(q, k, v)
    want = _reference_with_grads(q, k, v, proj,
                                 jnp.asarray(masks.mask(32, 8, "conv_raster", kernel=11)))[0]
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


def test_output_keeps_logical_constraint():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    rules = sharding.get_rules("fsdp")
    q, k, v, _ = _inputs(3, 4)
    fn = jax.jit(functools.partial(attention.attend_structured, kind="row", text_len=3,
                                   grid=4))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        assert "sharding_constraint" in fn.lower(q, k, v).as_text()
