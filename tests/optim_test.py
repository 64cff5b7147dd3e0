"""The optimizer pieces: which leaves decay, Adam's clipped running variance, `build`."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from dalle_jax import configlib, sharding
from dalle_jax.models import transformer as tr
from dalle_jax.tokenizers import dvae
from dalle_jax.train import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _decayed(param_axes):
    mask = optim.decay_mask(param_axes)(param_axes)
    is_leaf = lambda x: isinstance(x, bool)  # noqa: E731
    flat = jax.tree_util.tree_flatten_with_path(mask, is_leaf=is_leaf)[0]
    return {sharding.path_str(p) for p, v in flat if v}, {sharding.path_str(p) for p, _ in flat}


def test_paper_transformer_decays_exactly_its_weight_matrices():
    abstract = tr.abstract_variables(tr.TransformerConfig.paper_12b(scan_layers=True))
    decayed, every = _decayed(sharding.logical_specs(abstract["params"]))
    assert decayed == {"layers/qkv_kernel", "layers/out_kernel", "layers/mlp_in_kernel",
                       "layers/mlp_out_kernel"}
    # Everything else is a gain, a bias, an embedding or a head (unembedding).
    assert every - decayed == {
        "layers/ln1_scale", "layers/ln1_bias", "layers/ln2_scale", "layers/ln2_bias",
        "layers/qkv_bias", "layers/out_bias", "layers/mlp_in_bias", "layers/mlp_out_bias",
        "text_embed", "text_pos", "image_embed", "row_embed", "col_embed",
        "final_ln_scale", "final_ln_bias", "text_head", "image_head"}


def test_paper_dvae_decays_every_conv_kernel_and_no_bias():
    specs = dvae.param_logical_specs(dvae.DVAEConfig())
    decayed, every = _decayed(specs)
    assert decayed == {p for p in every if p.endswith("/kernel")}
    assert every - decayed == {p for p in every if p.endswith("/bias")}


@pytest.mark.parametrize("logical,want", [
    (("layers", "embed", None, "attn"), True),
    (("layers", "embed"), False),  # a stacked gain: 2-D but one weight axis
    (("embed", "vocab"), False),  # an unembedding
    (("conv_window", "conv_window", "codebook", "conv_out"), True),
    (("conv_out",), False),
])
def test_decays_reads_what_a_leaf_is(logical, want):
    assert optim.decays(logical) is want


def test_decay_mask_of_a_small_tree():
    """The mask for a hand-written tree: matrices and conv kernels decay, everything else
    not, looked up by path so a boxed tree and a plain one get the same mask."""
    axes = {
        "dense": {"kernel": P("embed", "mlp"), "bias": P("mlp")},
        "stacked": {"w": P("layers", "embed", "mlp"), "gain": P("layers", "embed")},
        "conv": {"kernel": P("conv_window", "conv_window", "conv_in", "conv_out")},
        "embed": P("vocab", "embed"),
        "pos": P("length", "embed"),
        "head": P("embed", "vocab"),
    }
    want = {"dense": {"kernel": True, "bias": False},
            "stacked": {"w": True, "gain": False},
            "conv": {"kernel": True}, "embed": False, "pos": False, "head": False}
    shapes = {"dense": {"kernel": (4, 8), "bias": (8,)},
              "stacked": {"w": (2, 4, 8), "gain": (2, 4)},
              "conv": {"kernel": (3, 3, 2, 5)}, "embed": (10, 4), "pos": (6, 4), "head": (4, 10)}
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)  # noqa: E731
    params = jax.tree.map(jnp.ones, shapes, is_leaf=is_shape)
    mask = optim.decay_mask(axes)
    assert mask(params) == want
    boxed = jax.tree.map(lambda a, spec: nn.LogicallyPartitioned(a, tuple(spec)), params, axes)
    assert jax.tree.leaves(mask(boxed)) == jax.tree.leaves(want)
    # Weight decay of 0.5 at lr 1 moves exactly the decayed leaves, by 0.5 * value.
    tx = optax.adamw(1.0, weight_decay=0.5, mask=mask)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    jax.tree.map(lambda u, decayed: np.testing.assert_array_equal(u, -0.5 if decayed else 0.0),
                 updates, want)
    with pytest.raises(KeyError, match="'extra' is not in the weight-decay table"):
        mask(dict(params, extra=jnp.ones(3)))


def test_decays_refuses_unclassified_leaves():
    with pytest.raises(ValueError, match="no logical axis names"):
        optim.decays(None, where="w")
    with pytest.raises(ValueError, match=r"\['bogus'\]"):
        optim.decays(("embed", "bogus"), where="w")


def test_adamw_decays_only_the_masked_leaves():
    config = tr.TransformerConfig(text_vocab=20, image_vocab=16, text_len=6, grid=3, width=16,
                                  depth=2, heads=2)
    boxed = tr.init_variables(config, jax.random.key(0))["params"]
    axes = sharding.logical_specs(boxed)
    c = ml_collections.ConfigDict(dict(
        name="adamw", b1=0.9, b2=0.96, eps=1e-8, weight_decay=0.5, max_variance=0.0,
        clip_global_norm=0.0, grad_accum=1, lr=dict(kind="constant", value=0.1)))
    tx, _ = optim.build(c, axes)
    tx.init(boxed)  # the mask also applies to the boxed tree the loop initialises with
    params = jax.tree.map(lambda a: a + 1.0, nn.unbox(boxed))
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    decayed, _ = _decayed(axes)
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        name = sharding.path_str(path)
        assert bool(np.asarray(u).any()) == (name in decayed), name


def test_adam_variance_clip_by_hand():
    b1, b2, eps, vmax = 0.9, 0.96, 1e-8, 5.0
    g1 = {"w": jnp.asarray([100.0, 0.5, -30.0])}
    g2 = {"w": jnp.asarray([1.0, 0.5, 2.0])}
    tx = optim.scale_by_adam(b1, b2, eps, vmax)
    state = tx.init(g1)
    _, state1 = tx.update(g1, state)
    u2, state = tx.update(g2, state1)
    g1n, g2n = np.asarray(g1["w"]), np.asarray(g2["w"])
    nu1 = np.minimum((1 - b2) * g1n**2, vmax)
    nu2 = np.minimum(b2 * nu1 + (1 - b2) * g2n**2, vmax)
    mu2 = b1 * (1 - b1) * g1n + (1 - b1) * g2n
    want = (mu2 / (1 - b1**2)) / (np.sqrt(nu2 / (1 - b2**2)) + eps)
    # 0.04 * 100^2 = 400 and 0.04 * 30^2 = 36 were clipped to 5.
    np.testing.assert_allclose(state1.nu["w"], [5.0, 0.01, 5.0], rtol=1e-6)
    np.testing.assert_allclose(state.nu["w"], nu2, rtol=1e-6)
    np.testing.assert_allclose(u2["w"], want, rtol=1e-5)
    # Without the clip it is optax's Adam, update for update.
    plain, ref = optim.scale_by_adam(b1, b2, eps), optax.scale_by_adam(b1, b2, eps)
    a, _ = plain.update(g1, plain.init(g1))
    b, _ = ref.update(g1, ref.init(g1))
    np.testing.assert_array_equal(a["w"], b["w"])
    assert isinstance(state, optax.ScaleByAdamState)


def test_variance_clip_is_on_in_the_paper_config_only():
    load = lambda f: configlib.load_config(os.path.join(ROOT, "configs", f))  # noqa: E731
    assert load("transformer_paper.py:tokens=x").optim.max_variance == 5.0
    assert load("transformer_shapes.py").optim.max_variance == 0.0
    assert load("dvae_shapes.py").optim.max_variance == 0.0


def test_build_rejects_a_negative_variance_clip():
    c = ml_collections.ConfigDict(dict(
        name="adamw", b1=0.9, b2=0.96, eps=1e-8, weight_decay=0.0, max_variance=-1.0,
        clip_global_norm=0.0, grad_accum=1, lr=dict(kind="constant", value=0.1)))
    with pytest.raises(ValueError, match="max_variance must be >= 0"):
        optim.build(c, {})
