"""Per-resblock gradient scaling: the model-side boundary, the optax transform's state
machine, and a deep float16 model that one global scale cannot train but per-resblock
scales can."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dalle_jax.models import transformer as tr
from dalle_jax.train import transformer_task, optim

pytestmark = pytest.mark.usefixtures("fast_compile")

# ----------------------------------------------------------------------------- the rule

RULE = optim.GradScalingRule(init=2.0**13, minimum=2.0**7, maximum=2.0**24,
                             growth=2.0**(1 / 1000), backoff=2.0**0.5, window=125)


def _step(rule, scales, finite, count, last):
    s, last = rule.next(jnp.asarray(scales, jnp.float32), jnp.asarray(finite),
                        jnp.asarray(count, jnp.int32), jnp.asarray(last, jnp.int32))
    return np.asarray(s), np.asarray(last)


def test_rule_grows_on_finite_and_shrinks_on_nonfinite():
    s, last = _step(RULE, [[2.0**13, 2.0**13]], [[True, False]], 0, [[-125, -125]])
    np.testing.assert_allclose(s, [[2.0**(13 + 1 / 1000), 2.0**12.5]], rtol=1e-6)
    np.testing.assert_array_equal(last, [[-125, 0]])  # only the shrunk scale records it
    # 1,000 finite updates double a scale.
    s = np.float32(2.0**10)
    for i in range(1000):
        s, _ = _step(RULE, [[s]], [[True]], i, [[-125]])
        s = s[0, 0]
    np.testing.assert_allclose(s, 2.0**11, rtol=1e-3)


def test_rule_shrinks_a_scale_at_most_once_per_window():
    s, last = np.float32(2.0**16), -125
    history = []
    for count in range(300):
        out, lst = _step(RULE, [[s]], [[False]], count, [[last]])
        s, last = out[0, 0], lst[0, 0]
        history.append(s)
    # Non-finite at every update: shrinks at updates 0, 125 and 250 only, never grows.
    shrinks = [i for i in range(1, 300) if history[i] < history[i - 1]]
    assert history[0] < 2.0**16 and shrinks == [125, 250]
    np.testing.assert_allclose(history[-1], 2.0**(16 - 1.5), rtol=1e-6)
    # A window of 0 shrinks every time.
    rule0 = dataclasses.replace(RULE, window=0)
    out, _ = _step(rule0, [[2.0**16]], [[False]], 5, [[5]])
    np.testing.assert_allclose(out, [[2.0**15.5]], rtol=1e-6)


def test_rule_clamps():
    s, _ = _step(RULE, [[2.0**24, 2.0**7]], [[True, False]], 0, [[-125, -125]])
    np.testing.assert_array_equal(s, [[2.0**24, 2.0**7]])


def test_rule_from_config_multiplies_by_replicas():
    c = dict(init_log2=13.0, min_log2=7.0, max_log2=24.0, doubling_updates=1000,
             backoff_log2=0.5, window=125, replicas=0)
    cfg = type("C", (), c)
    rule = optim.GradScalingRule.from_config(cfg, replicas=8)
    assert (rule.init, rule.minimum, rule.maximum) == (8 * 2.0**13, 8 * 2.0**7, 8 * 2.0**24)
    cfg.replicas = 2  # an explicit M wins over the mesh's
    assert optim.GradScalingRule.from_config(cfg, replicas=8).init == 2 * 2.0**13
    with pytest.raises(ValueError, match="minimum <= init"):
        optim.GradScalingRule(init=1.0, minimum=2.0, maximum=4.0)


# ----------------------------------------------------------------------------- the transform

LAYOUT = optim.ResblockLayout(rows=3, names=("attn", "mlp"),
                              block_of=lambda p: {"layers/a": 0, "layers/m": 1}.get(p))


def _params():
    return {"layers": {"a": jnp.ones((3, 2)), "m": jnp.ones((3, 4))}, "emb": jnp.ones((5,))}


def _tx():
    return optim.per_resblock_grad_scaling(optax.adam(0.1), LAYOUT,
                                           dataclasses.replace(RULE, minimum=1.0))


def test_transform_unscales_each_block_and_updates_inner_state():
    params, tx = _params(), _tx()
    state = tx.init(params)
    np.testing.assert_array_equal(state.scales, np.full((3, 2), 2.0**13))
    scales = np.asarray([[2.0, 4.0], [8.0, 16.0], [32.0, 64.0]], np.float32)
    state = state._replace(scales=jnp.asarray(scales))
    true = {"layers": {"a": jnp.full((3, 2), 0.5), "m": jnp.full((3, 4), -0.25)},
            "emb": jnp.full((5,), 2.0)}
    scaled = {"layers": {"a": true["layers"]["a"] * scales[:, :1],
                         "m": true["layers"]["m"] * scales[:, 1:]}, "emb": true["emb"]}
    updates, new = tx.update(scaled, state, params)
    ref_updates, ref_inner = optax.adam(0.1).update(true, optax.adam(0.1).init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), updates, ref_updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new.inner_state,
                 ref_inner)
    np.testing.assert_allclose(new.scales, scales * 2.0**(1 / 1000), rtol=1e-6)
    assert int(new.count) == 1 and int(new.skipped) == 0 and not bool(new.last_skipped)
    np.testing.assert_allclose(optim.unscale(scaled, jnp.asarray(scales), LAYOUT)["layers"]["m"],
                               true["layers"]["m"])


@pytest.mark.parametrize("where", ["block", "outside"])
def test_transform_skips_the_whole_update_on_any_nonfinite_gradient(where):
    params, tx = _params(), _tx()
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = tx.update(grads, state, params)  # one good update: inner state moves
    if where == "block":
        grads["layers"]["m"] = grads["layers"]["m"].at[1, 2].set(jnp.inf)
    else:
        grads["emb"] = grads["emb"].at[0].set(jnp.nan)
    updates, new = tx.update(grads, state, params)
    assert all(not np.asarray(u).any() for u in jax.tree.leaves(updates))
    jax.tree.map(np.testing.assert_array_equal, new.inner_state, state.inner_state)
    assert int(new.skipped) == 1 and bool(new.last_skipped) and int(new.count) == 2
    grown = np.asarray(state.scales) * 2.0**(1 / 1000)
    expected = grown.copy()
    if where == "block":
        # Only the MLP resblock of layer 1 shrinks; every finite resblock still grows.
        expected[1, 1] = np.asarray(state.scales)[1, 1] / 2.0**0.5
    np.testing.assert_allclose(new.scales, expected, rtol=1e-6)
    metrics = optim.scaling_metrics(new, LAYOUT)
    assert metrics["grad_scale/skipped"] == 1.0 and metrics["grad_scale/skipped_total"] == 1.0
    assert {"grad_scale/attn_0", "grad_scale/mlp_2", "grad_scale/log2_min"} <= set(metrics)


def test_transform_refuses_a_block_leaf_without_the_layer_axis():
    tx = _tx()
    params = {"layers": {"a": jnp.ones((2, 2)), "m": jnp.ones((3, 4))}, "emb": jnp.ones((5,))}
    with pytest.raises(ValueError, match="leading axis is not the 3 layers"):
        tx.update(params, tx.init(params), params)


# ----------------------------------------------------------------------------- the boundary


def test_grad_scaled_scales_param_grads_and_filters_activation_grads():
    def branch(p, x):
        return (x.astype(jnp.float16) * p["w"].astype(jnp.float16)).astype(jnp.float32)

    p, x = {"w": jnp.asarray([1.0, 2.0])}, jnp.asarray([3.0, 4.0])

    def loss(p, x, scale, cot):
        return jnp.sum(tr.grad_scaled(branch, p, x, scale) * cot)

    cot = jnp.asarray([0.5, 0.25])
    dp, dx = jax.grad(loss, argnums=(0, 1))(p, x, jnp.float32(8.0), cot)
    np.testing.assert_allclose(dp["w"], 8.0 * cot * x)  # parameter grads keep the scale
    np.testing.assert_allclose(dx, cot * p["w"])  # activation grads are unscaled
    # An overflow inside the 16-bit branch: the activation gradient's inf becomes 0, the
    # parameter gradient keeps it (so the optimizer skips the update and lowers the scale).
    big = jnp.asarray([1.0, 4e4])
    dp, dx = jax.grad(loss, argnums=(0, 1))(p, x, jnp.float32(8.0), big)
    assert np.isinf(dp["w"][1]) and np.isfinite(dp["w"][0])
    np.testing.assert_allclose(dx, [1.0, 0.0])


TINY = tr.TransformerConfig(text_vocab=20, image_vocab=16, text_len=6, grid=3, width=32,
                            depth=3, heads=2, conv_kernel=3)


@pytest.mark.parametrize("scan", [False, True])
def test_transformer_grads_carry_their_resblock_scale(scan):
    config = dataclasses.replace(TINY, scan_layers=scan, remat="full" if scan else "none")
    params = nn.unbox(tr.init_variables(config, jax.random.key(0)))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape, np.float32), params)
    text = rng.integers(0, 20, (2, 6)).astype(np.int32)
    image = rng.integers(0, 16, (2, 9)).astype(np.int32)

    def loss(p, scales):
        lt, li = tr.Transformer(config).apply({"params": p}, text, image, grad_scales=scales)
        return tr.loss_fn(lt, li, text, image)[0]

    plain = jax.jit(jax.grad(loss))(params, None)
    scales = jnp.asarray([[2.0, 4.0], [8.0, 16.0], [32.0, 64.0]])
    scaled = jax.jit(jax.grad(loss))(params, scales)
    layout = transformer_task.resblock_layout(config)
    # In float32 nothing overflows: unscaling recovers the plain gradients exactly (up to
    # rounding), and the leaves outside the resblocks were never scaled.
    back = optim.unscale(scaled, scales, layout)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), back, plain)
    np.testing.assert_allclose(scaled["layers"]["mlp_in_kernel"][2],
                               64.0 * plain["layers"]["mlp_in_kernel"][2], rtol=1e-5)
    with pytest.raises(ValueError, match="grad_scales must have shape"):
        loss(params, jnp.ones((2, 2)))


def test_resblock_layout_covers_every_layer_leaf_once():
    layout = transformer_task.resblock_layout(TINY)
    names = tr.param_specs(TINY)["layers"].keys()
    cols = {n: layout.block_of(f"layers/{n}") for n in names}
    assert set(cols.values()) == {0, 1} and None not in cols.values()
    assert layout.block_of("text_embed") is None and layout.block_of("final_ln_scale") is None
    assert layout.shape == (3, 2)


# ----------------------------------------------------------------------------- a deep fp16 model

# A residual stack of 10 float16 MLP resblocks (pre-norm, fp32 residual stream) whose
# branch outputs are weighted 2^8 ... 2^-28: the resblocks' parameter gradients span ~37
# binades, more than float16's ~40-binade range can hold at any one scale next to the
# elements' own spread.
DEPTH, B, D, H = 10, 8, 16, 64
LOG2_WEIGHT = np.linspace(8, -28, DEPTH)
DEEP = optim.ResblockLayout(rows=DEPTH, names=("mlp",),
                            block_of=lambda p: 0 if p.startswith("layers/") else None)


def _deep_branch(dtype, p, x):
    x = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5)
    h = jax.nn.gelu(x.astype(dtype) @ p["w1"].astype(dtype))
    return (h @ p["w2"].astype(dtype)).astype(jnp.float32)


def _deep_loss(params, x, r, scales, dtype):
    branch = functools.partial(_deep_branch, dtype)
    for l in range(DEPTH):
        p = jax.tree.map(lambda a: a[l], params["layers"])
        y = branch(p, x) if scales is None else tr.grad_scaled(branch, p, x, scales[l, 0])
        x = x + 2.0 ** LOG2_WEIGHT[l] * y
    return jnp.sum(x * r) / B


@pytest.fixture(scope="module")
def deep():
    rng = np.random.default_rng(0)
    params = {"layers": {
        "w1": rng.standard_normal((DEPTH, D, H), np.float32) / np.sqrt(D),
        "w2": rng.standard_normal((DEPTH, H, D), np.float32) / np.sqrt(H)}}
    x, r = rng.standard_normal((2, B, D), np.float32)
    reference = jax.jit(jax.grad(_deep_loss), static_argnums=(3, 4))(params, x, r, None,
                                                                      jnp.float32)
    fp16 = jax.jit(jax.grad(_deep_loss), static_argnums=(4,))
    return params, x, r, reference, fp16


def _block_errors(grads, scales, reference):
    """Per resblock: max |unscaled fp16 grad - fp32 grad| / max |fp32 grad| (inf if the
    resblock's gradients are not finite)."""
    back = optim.unscale(grads, scales, DEEP)
    finite, _ = optim.block_finite(back, DEEP)
    errs = np.zeros(DEPTH)
    for name in ("w1", "w2"):
        g, ref = np.asarray(back["layers"][name]), np.asarray(reference["layers"][name])
        err = (np.abs(g - ref).reshape(DEPTH, -1).max(1)
               / np.abs(ref).reshape(DEPTH, -1).max(1))
        errs = np.maximum(errs, err)
    return np.where(np.asarray(finite[:, 0]), errs, np.inf)


def test_one_global_scale_fails_where_per_resblock_scales_recover_fp32(deep):
    params, x, r, reference, fp16 = deep
    # One scale for every resblock (what a single loss scale does): every choice from 2^0
    # to 2^24 either overflows the early resblocks or flushes the late ones' gradients.
    for log2 in range(0, 25, 2):
        scales = jnp.full((DEPTH, 1), 2.0**log2, jnp.float32)
        errs = _block_errors(fp16(params, x, r, scales, jnp.float16), scales, reference)
        assert errs.max() > 0.05, (log2, errs)
    # One scale per resblock, 2^4 / weight: every resblock's gradients match float32 to
    # within 0.5% of their largest element.
    scales = jnp.asarray(2.0 ** (4 - LOG2_WEIGHT), jnp.float32)[:, None]
    errs = _block_errors(fp16(params, x, r, scales, jnp.float16), scales, reference)
    assert errs.max() < 5e-3, errs
