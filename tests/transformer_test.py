"""Stage-2 transformer: shapes, logical axes, init, causality, loss, remat/scan and sharding."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dalle_jax import sharding, treeutil
from dalle_jax.models import masks
from dalle_jax.models import transformer as tr

BPE_VOCAB = 14
TEXT_LEN, GRID = 6, 3
TINY = tr.TransformerConfig(text_vocab=BPE_VOCAB + TEXT_LEN, image_vocab=16, text_len=TEXT_LEN,
                            grid=GRID, width=32, depth=4, heads=2, conv_kernel=3)
L = TEXT_LEN + GRID * GRID


# Halves XLA compile time on CPU; every comparison below runs under the same setting.
pytestmark = pytest.mark.usefixtures("fast_compile")


@functools.lru_cache(maxsize=None)
def _params(config: tr.TransformerConfig, seed: int = 0, noise: float = 0.1) -> dict:
    """Unboxed params with host-side noise on every leaf, so heads, biases and gains are
    generic (the fresh zero heads would make every gradient below them vanish)."""
    init = jax.jit(functools.partial(tr.init_variables, config))
    params = nn.unbox(init(jax.random.key(seed)))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + noise * rng.standard_normal(a.shape, np.float32), params)


def _batch(config: tr.TransformerConfig, batch: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    text = rng.integers(0, config.text_vocab, (batch, config.text_len), dtype=np.int32)
    image = rng.integers(0, config.image_vocab, (batch, config.image_len), dtype=np.int32)
    return jnp.asarray(text), jnp.asarray(image)


def _loss(params, text, image, config):
    logits_text, logits_image = tr.Transformer(config).apply({"params": params}, text, image)
    return tr.loss_fn(logits_text, logits_image, text, image,
                      text_weight=config.loss_text_weight)[0]


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides,err", [
    (dict(heads=3), "not divisible"),
    (dict(text_len=1, text_vocab=20), "text_len"),
    (dict(text_vocab=6), "must exceed text_len"),
    (dict(attn_pattern="row,row"), "names 2 layers"),
    (dict(conv_kind="toroidal"), "conv_kind"),
    (dict(conv_kernel=4), "odd"),
    (dict(dtype="float64"), "dtype"),
    (dict(remat="some"), "remat"),
    (dict(dropout=1.0), "dropout"),
    (dict(loss_text_weight=1.5), "loss_text_weight"),
    (dict(depth=0), "depth"),
])
def test_config_validation(overrides, err):
    with pytest.raises(ValueError, match=err):
        dataclasses.replace(TINY, **overrides)


def test_config_layer_kinds_and_masks():
    assert TINY.layer_kinds() == ("row", "column", "row", "conv_raster")
    c2d = dataclasses.replace(TINY, conv_kind="2d")
    assert c2d.layer_kinds()[-1] == "conv_2d"
    table, index = tr.layer_masks(TINY)
    assert table.shape == (3, L, L) and list(index) == [0, 1, 0, 2]
    np.testing.assert_array_equal(table[2], masks.mask(TEXT_LEN, GRID, "conv", kernel=3))


# ----------------------------------------------------------------------------- shapes, axes, init


@pytest.mark.parametrize("use_jit", [False, True])
def test_shapes_and_finite(use_jit):
    text, image = _batch(TINY)
    fn = tr.Transformer(TINY).apply
    fn = jax.jit(fn) if use_jit else fn
    logits_text, logits_image = fn({"params": _params(TINY)}, text, image)
    # Heads are stored padded to a multiple of 128; the logits are the real vocabularies.
    assert (TINY.text_vocab_padded, TINY.image_vocab_padded) == (128, 128)
    assert logits_text.shape == (2, TEXT_LEN, TINY.text_vocab)
    assert logits_image.shape == (2, GRID * GRID, TINY.image_vocab)
    assert logits_text.dtype == logits_image.dtype == jnp.float32
    assert np.isfinite(logits_text).all() and np.isfinite(logits_image).all()


def test_every_param_has_logical_axes():
    abstract = tr.abstract_variables(TINY)
    specs = nn.get_partition_spec(abstract)["params"]
    shapes = nn.unbox(abstract)["params"]
    flat_specs = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
    flat_shapes = jax.tree.leaves(shapes)
    assert len(flat_specs) == len(flat_shapes) == 21
    for (path, spec), shape in zip(flat_specs, flat_shapes):
        name = jax.tree_util.keystr(path)
        assert isinstance(spec, P) and len(spec) == len(shape.shape), name
        assert any(a is not None for a in spec), name
        assert all(a is None or a in sharding.LOGICAL_AXES for a in spec), name
        if "layers" in name:
            assert spec[0] == "layers" and shape.shape[0] == TINY.depth, name
    assert specs["layers"]["qkv_kernel"] == P("layers", "embed", None, "attn")
    assert specs["layers"]["out_kernel"] == P("layers", "attn", "embed")
    # Every preset resolves every name (unknown names would raise).
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    for preset in sharding.RULES:
        sharding.tree_shardings(abstract, mesh, sharding.get_rules(preset))


def test_init_matches_module_and_distribution():
    variables = jax.jit(functools.partial(tr.init_variables, TINY))(jax.random.key(0))
    # Same tree, shapes and axis names as the module's own (per-parameter PRNG) init.
    own = jax.eval_shape(functools.partial(tr.Transformer(TINY).init,
                                           method=tr.Transformer.create_params),
                         jax.random.key(0))
    assert jax.tree.structure(own) == jax.tree.structure(variables)
    assert nn.get_partition_spec(own) == nn.get_partition_spec(variables)
    per_param = jax.eval_shape(functools.partial(tr.init_variables, TINY, one_draw=False),
                               jax.random.key(0))
    assert jax.tree.structure(per_param) == jax.tree.structure(variables)
    p = nn.unbox(variables)["params"]
    d, n = TINY.width, TINY.depth
    assert not p["text_head"].any() and not p["image_head"].any()
    assert (p["layers"]["ln1_scale"] == 1).all() and not p["layers"]["qkv_bias"].any()
    stds = {
        "qkv_kernel": 0.125 / math.sqrt(d),
        "mlp_in_kernel": 0.125 / math.sqrt(d),
        "out_kernel": 0.125 / math.sqrt(d) / math.sqrt(2 * n),
        "mlp_out_kernel": 0.125 / math.sqrt(4 * d) / math.sqrt(2 * n),
    }
    for name, std in stds.items():
        assert abs(float(p["layers"][name].std()) / std - 1) < 0.1, name
    text_embed = p["text_embed"][:TINY.text_vocab]
    assert abs(float(text_embed.std()) / (0.125 / math.sqrt(d)) - 1) < 0.2
    # Vocabulary padding rows start at zero (and are never looked up).
    assert not p["text_embed"][TINY.text_vocab:].any()
    assert not p["image_embed"][TINY.image_vocab + 1:].any()
    assert abs(float(p["text_pos"].std()) / (0.125 / math.sqrt(2 * d)) - 1) < 0.2
    # Zero heads: the first prediction is uniform within each modality.
    text, image = _batch(TINY)
    lt, li = jax.jit(tr.Transformer(TINY).apply)(variables, text, image)
    _, m = tr.loss_fn(lt, li, text, image)
    np.testing.assert_allclose(m["loss_text"], math.log(TINY.text_vocab), rtol=1e-6)
    np.testing.assert_allclose(m["loss_image"], math.log(TINY.image_vocab), rtol=1e-6)


def test_init_scale_scales_every_normal_parameter():
    base = nn.unbox(tr.init_variables(TINY, jax.random.key(0)))["params"]
    wide = dataclasses.replace(TINY, init_scale=1.0)
    scaled = nn.unbox(tr.init_variables(wide, jax.random.key(0)))["params"]
    assert jax.tree.structure(base) == jax.tree.structure(scaled)
    # The same draw, the normal parameters multiplied by 1.0 / 0.125; ones and zeros stay.
    specs = jax.tree.leaves(tr.param_specs(TINY), is_leaf=lambda x: isinstance(x, tr.ParamSpec))
    for spec, a, b in zip(specs, jax.tree.leaves(base), jax.tree.leaves(scaled), strict=True):
        factor = 8.0 if spec.init == "normal" else 1.0
        np.testing.assert_allclose(b, a * factor, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="init_scale"):
        dataclasses.replace(TINY, init_scale=0.0)


def test_jit_init_program_does_not_grow_with_depth():
    """Init draws each stacked layer leaf in one call, so the program XLA compiles has the
    same size at any depth (an unrolled per-layer init would grow with it), and a new key
    reuses the compiled program."""
    sizes = set()
    for depth in (1, 4, 16):
        init = functools.partial(tr.init_variables, dataclasses.replace(TINY, depth=depth))
        sizes.add((len(jax.make_jaxpr(init)(jax.random.key(1)).jaxpr.eqns),
                   len(jax.jit(init).lower(jax.random.key(1)).as_text().splitlines())))
    assert len(sizes) == 1, sizes
    init = jax.jit(functools.partial(tr.init_variables, TINY))
    a, b = init(jax.random.key(1)), init(jax.random.key(2))
    assert init._cache_size() == 1
    assert not np.array_equal(nn.unbox(a)["params"]["text_embed"],
                              nn.unbox(b)["params"]["text_embed"])


def test_the_suite_runs_with_rank_promotion_raising():
    """conftest makes implicit rank promotion an error, so a forward pass that adds a
    (L, D) table to (B, L, D) activations without saying how fails here."""
    assert jax.config.jax_numpy_rank_promotion == "raise"
    with pytest.raises(ValueError, match="rank_promotion"):
        jnp.zeros((2, 3, 4)) + jnp.zeros((3, 4))


def test_paper_size_param_count():
    config = tr.TransformerConfig.paper_12b(scan_layers=True)
    abstract = tr.abstract_variables(config)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nn.unbox(abstract)))
    n = treeutil.count_params(abstract)
    print(f"paper-size transformer parameters: {n:,}")
    d = 3968
    per_layer = 12 * d * d + 13 * d
    # Vocabulary tables padded to multiples of 128: text 16,640 already is; the image
    # embedding's 8,192 codes + BOI become 8,320 rows.
    embed = (16384 + 256 + 256 + 8320 + 2 * 32) * d
    heads = d * (16384 + 256 + 8192)
    assert n == 64 * per_layer + embed + heads + 2 * d
    assert 11.5e9 < n < 12.5e9


# ----------------------------------------------------------------------------- sequence, causality


def test_make_inputs():
    text, image = _batch(TINY)
    text_in, image_in = tr.make_inputs(text, image, TINY.boi_id)
    np.testing.assert_array_equal(text_in, text)
    assert (image_in[:, 0] == TINY.image_vocab).all()
    np.testing.assert_array_equal(image_in[:, 1:], image[:, :-1])


def _dependence(fn, x_BLD):
    """``dep[s, j]``: some output at slot s has a non-zero gradient w.r.t. input slot j."""
    jac = jax.jit(jax.jacrev(fn))(x_BLD)  # (1, S, V, 1, L, D)
    return np.asarray(jnp.abs(jac).sum(axis=(0, 2, 3, 5)) > 0)


@pytest.mark.parametrize("kind", ["row", "column", "conv_raster", "conv_2d"])
def test_single_layer_gradient_shows_mask(kind):
    config = dataclasses.replace(TINY, depth=1, attn_pattern=kind)
    model, params = tr.Transformer(config), _params(config)
    x_BLD = jax.random.normal(jax.random.key(0), (1, L, config.width))
    dep = _dependence(lambda x: model.apply({"params": params}, x, method=model.encode), x_BLD)
    np.testing.assert_array_equal(dep, masks.mask(TEXT_LEN, GRID, kind, kernel=3))


def test_full_model_causality():
    model, params = tr.Transformer(TINY), _params(TINY)
    x_BLD = jax.random.normal(jax.random.key(0), (1, L, TINY.width))
    apply = lambda x: model.apply({"params": params}, x, method=model.from_embeddings)  # noqa: E731
    dep = np.concatenate([_dependence(lambda x: apply(x)[0], x_BLD),
                          _dependence(lambda x: apply(x)[1], x_BLD)])
    assert not np.triu(dep, 1).any(), "a logit depends on a later slot"
    assert not dep[:TEXT_LEN, TEXT_LEN:].any(), "a text logit depends on an image slot"
    # Exactly the slots reachable through the layer masks (each keeps its diagonal).
    table, index = tr.layer_masks(TINY)
    reach = np.eye(L, dtype=bool)
    for i in index:
        reach = (table[i].astype(int) @ reach.astype(int)) > 0
    np.testing.assert_array_equal(dep, reach)


def test_image_token_only_affects_later_image_logits():
    model, params = tr.Transformer(TINY), {"params": _params(TINY)}
    text, image = _batch(TINY, batch=1)
    apply = jax.jit(model.apply)
    base_text, base_image = apply(params, text, image)
    j = 4
    changed = image.at[0, j].set((image[0, j] + 1) % TINY.image_vocab)
    new_text, new_image = apply(params, text, changed)
    np.testing.assert_array_equal(new_text, base_text)  # text never sees image
    differs = np.abs(np.asarray(new_image - base_image)).max(-1)[0] > 0
    # z_j is the input of image slot j + 1, so only predictions of z_k, k > j, move.
    np.testing.assert_array_equal(differs, np.arange(GRID * GRID) > j)


def test_pads_have_their_own_embeddings():
    model, params = tr.Transformer(TINY), {"params": _params(TINY)}
    pads = BPE_VOCAB + np.arange(TEXT_LEN)
    text_a = np.array([[2, 5, *pads[2:]]], np.int32)
    text_b = text_a.copy()
    text_b[0, 3] = pads[4]  # another slot's pad in slot 3
    image_in = jnp.full((1, GRID * GRID), TINY.boi_id, jnp.int32)
    ea = model.apply(params, text_a, image_in, method=model.embed)
    eb = model.apply(params, text_b, image_in, method=model.embed)
    assert np.abs(np.asarray(ea[0, 3] - eb[0, 3])).min() > 0
    np.testing.assert_array_equal(np.delete(ea, 3, axis=1), np.delete(eb, 3, axis=1))
    table = params["params"]["text_embed"][BPE_VOCAB:TINY.text_vocab]
    assert len(np.unique(np.asarray(table), axis=0)) == TEXT_LEN


# ----------------------------------------------------------------------------- loss


def test_loss_weighting_by_hand():
    rng = np.random.default_rng(0)
    b, vt, vi = 3, TINY.text_vocab, TINY.image_vocab
    lt = rng.standard_normal((b, TEXT_LEN, vt)).astype(np.float32)
    li = rng.standard_normal((b, GRID * GRID, vi)).astype(np.float32)
    text, image = _batch(TINY, batch=b, seed=1)

    def ce(logits, targets):
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return -np.take_along_axis(logp, np.asarray(targets)[..., None], -1).mean()

    want_text = ce(lt[:, :-1], text[:, 1:])  # slot t predicts slot t+1; BOS never predicted
    want_image = ce(li, image)  # image slot k predicts z_k
    loss, m = tr.loss_fn(jnp.asarray(lt), jnp.asarray(li), text, image)
    np.testing.assert_allclose(m["loss_text"], want_text, rtol=1e-5)
    np.testing.assert_allclose(m["loss_image"], want_image, rtol=1e-5)
    np.testing.assert_allclose(loss, want_text / 8 + 7 * want_image / 8, rtol=1e-5)
    acc = (lt[:, :-1].argmax(-1) == np.asarray(text)[:, 1:]).mean()
    np.testing.assert_allclose(m["acc_text"], acc)
    loss_half, _ = tr.loss_fn(jnp.asarray(lt), jnp.asarray(li), text, image, text_weight=0.5)
    np.testing.assert_allclose(loss_half, (want_text + want_image) / 2, rtol=1e-5)


# ----------------------------------------------------------------------------- variants


@pytest.fixture(scope="module")
def reference():
    """Loss and grads of the plain model: Python loop over layers, no remat."""
    text, image = _batch(TINY)
    return jax.jit(jax.value_and_grad(functools.partial(_loss, config=TINY)))(
        _params(TINY), text, image)


@pytest.mark.parametrize("remat,scan", [("full", False), ("dots", False), ("none", True),
                                        ("full", True)])
def test_remat_and_scan_match_plain(remat, scan, reference):
    config = dataclasses.replace(TINY, remat=remat, scan_layers=scan)
    text, image = _batch(TINY)
    loss, grads = jax.jit(jax.value_and_grad(functools.partial(_loss, config=config)))(
        _params(TINY), text, image)
    ref_loss, ref_grads = reference
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads, ref_grads)


def test_dropout():
    config = dataclasses.replace(TINY, dropout=0.5, scan_layers=True)
    model, params = tr.Transformer(config), {"params": _params(TINY)}
    text, image = _batch(TINY)
    det = model.apply(params, text, image)
    ref = tr.Transformer(TINY).apply(params, text, image)
    np.testing.assert_allclose(det[1], ref[1], rtol=1e-5, atol=1e-6)
    drop = model.apply(params, text, image, deterministic=False,
                       rngs={"dropout": jax.random.key(3)})
    assert np.isfinite(drop[1]).all() and not np.allclose(drop[1], det[1])


def test_bfloat16_compute(reference):
    config = dataclasses.replace(TINY, dtype="bfloat16")
    text, image = _batch(TINY)
    logits_text, logits_image = jax.jit(tr.Transformer(config).apply)(
        {"params": _params(TINY)}, text, image)
    assert logits_text.dtype == logits_image.dtype == jnp.float32
    loss, _ = tr.loss_fn(logits_text, logits_image, text, image)
    np.testing.assert_allclose(loss, reference[0], rtol=2e-2)


def test_sharded_fsdp_matches_single_device():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    rules = sharding.get_rules("fsdp")
    abstract = tr.abstract_variables(TINY)
    shardings = sharding.tree_shardings(abstract, mesh, rules)
    # Sharded init straight from the abstract tree (nothing built unsharded first).
    init = jax.jit(functools.partial(tr.init_variables, TINY), out_shardings=shardings)
    fresh = init(jax.random.key(0))
    qkv = fresh["params"]["layers"]["qkv_kernel"].value
    assert qkv.sharding.spec == P(None, "fsdp", None, None)
    assert len(qkv.addressable_shards) == 8 and qkv.addressable_shards[0].data.shape[1] == 8

    text, image = _batch(TINY, batch=8)
    params = _params(TINY)
    single = jax.jit(functools.partial(_loss, config=TINY))(params, text, image)
    sharded_params = jax.device_put(params, shardings["params"])
    batch_sh = jax.sharding.NamedSharding(mesh, sharding.batch_spec(mesh, rules, ndim=2))
    fn = jax.jit(functools.partial(_loss, config=TINY),
                 out_shardings=sharding.replicated(mesh))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        assert "sharding_constraint" in fn.lower(sharded_params, text, image).as_text()
        loss = fn(sharded_params, jax.device_put(text, batch_sh), jax.device_put(image, batch_sh))
    np.testing.assert_allclose(loss, single, rtol=1e-5, atol=1e-5)
