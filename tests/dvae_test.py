"""Tests of the dVAE model, its objective and the image tokenizer (dalle_jax.tokenizers.dvae,
dvae_objective, image_tokenizer)."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dalle_jax import treeutil
from dalle_jax.tokenizers import dvae, dvae_objective, image_tokenizer

TINY = dvae.DVAEConfig(image_size=16, group_count=3, n_hid=16, n_blk_per_group=2, n_init=8,
                       vocab_size=32)


def _jit(fn, **kwargs):
    """Jitted partial: one compile instead of one per primitive in eager mode (2 CPU cores)."""
    return jax.jit(functools.partial(fn, **kwargs))


@pytest.fixture(scope="module")
def tiny_params():
    return dvae.init_params(TINY, jax.random.key(0))


def _images(shape, seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=shape)
    return x.astype(np.uint8) if dtype == np.uint8 else (x / 255.0).astype(dtype)


# ----------------------------------------------------------------------------- NumPy reference
# The objective written out again in float64 NumPy from its formulas (paper §A.2, §A.3), so
# the loss tests do not check dvae_objective against itself.

EPS = 0.1  # the pixel map's margin: [0, 1] -> [0.1, 0.9]


def _np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _np_logit_laplace_nll(x, mu, ln_b):
    """-ln of the logit-Laplace density 1/(2 b x (1-x)) exp(-|logit x - mu| / b)."""
    b = np.exp(ln_b)
    logit = np.log(x / (1 - x))
    return np.log(2 * b * x * (1 - x)) + np.abs(logit - mu) / b


def _np_gaussian_nll(x, mu, sigma):
    mean = 1 / (1 + np.exp(-mu))
    return (x - mean) ** 2 / (2 * sigma**2) + np.log(sigma * np.sqrt(2 * np.pi))


def _np_objective(images_u8, logits, stats, beta, recon="logit_laplace", sigma=0.1):
    """Loss and metrics of one batch from the encoder's logits and the decoder's stats."""
    x01 = images_u8.astype(np.float64) / 255.0
    x = (1 - 2 * EPS) * x01 + EPS
    c = x.shape[-1]
    mu, ln_b = stats[..., :c].astype(np.float64), stats[..., c:].astype(np.float64)
    nll = (_np_logit_laplace_nll(x, mu, ln_b) if recon == "logit_laplace"
           else _np_gaussian_nll(x, mu, sigma))
    q = _np_softmax(logits.astype(np.float64))
    v = logits.shape[-1]
    kl = np.sum(q * np.log(q * v), -1)  # KL(q || uniform) per position
    d = np.prod(x.shape[1:])
    nll_b, kl_b = nll.sum((1, 2, 3)), kl.sum((1, 2))
    recon_img = np.clip((1 / (1 + np.exp(-mu)) - EPS) / (1 - 2 * EPS), 0, 1)
    mse_b = np.mean((recon_img - x01) ** 2, (1, 2, 3))
    return dict(
        loss=np.mean((nll_b + beta * kl_b) / d),
        recon_nll=np.mean(nll_b) / d,
        kl_per_dim=np.mean(kl_b) / d,
        kl_per_position=np.mean(kl),
        # Bits per 8-bit value: the density on the mapped scale times the grid spacing
        # 0.8 / 255 there, plus the KL, over D ln 2.
        elb_bpd=np.mean((nll_b - d * np.log(0.8 / 255) + kl_b) / (d * np.log(2))),
        mse=np.mean(mse_b),
        psnr=np.mean(-10 * np.log10(mse_b)),
        code_usage=len(np.unique(logits.argmax(-1))),
        codes=logits.argmax(-1))


def _logits_and_stats(params, images, rng, tau, *, hard=False):
    """The encoder's logits and the decoder's output for the objective's Gumbel draw
    (``jax.random.gumbel(rng, logits.shape)``), the relaxed sample taken in NumPy."""
    x = jnp.asarray((1 - 2 * EPS) * (np.asarray(images) / 255.0) + EPS, jnp.float32)
    logits = np.asarray(_encode_logits(params, x), np.float64)
    g = np.asarray(jax.random.gumbel(rng, logits.shape, jnp.float32), np.float64)
    if hard:
        z = np.eye(logits.shape[-1])[np.argmax(logits + g, -1)]
    else:
        z = _np_softmax((logits + g) / tau)
    stats = _decode_relaxed(params, jnp.asarray(z, jnp.float32))
    return logits, np.asarray(stats, np.float64)


# The bare model (no objective) for `_logits_and_stats`, compiled once per shape.
_encode_logits = jax.jit(lambda p, x: dvae.DVAE(TINY).apply({"params": p}, x,
                                                           method=dvae.DVAE.encode_logits))
_decode_relaxed = jax.jit(lambda p, z: dvae.DVAE(TINY).apply({"params": p}, z,
                                                            method=dvae.DVAE.decode_relaxed))


def _check_aux(loss, aux, want, rtol=1e-4):
    np.testing.assert_allclose(loss, want["loss"], rtol=rtol)
    for k in ("recon_nll", "kl_per_dim", "kl_per_position", "elb_bpd", "mse", "psnr"):
        np.testing.assert_allclose(aux[k], want[k], rtol=rtol, atol=1e-6, err_msg=k)
    assert int(aux["code_usage"]) == want["code_usage"]
    np.testing.assert_array_equal(aux["codes"], want["codes"])


def test_paper_param_counts_without_allocation():
    abstract = dvae.abstract_params(dvae.DVAEConfig())
    assert treeutil.count_params(abstract["encoder"]) == 53_786_240
    assert treeutil.count_params(abstract["decoder"]) == 43_829_766
    assert len(jax.tree.leaves(abstract["encoder"])) == 74
    assert len(jax.tree.leaves(abstract["decoder"])) == 76
    flat = traverse_util.flatten_dict(abstract, sep="/")
    assert flat["encoder/input/kernel"].shape == (7, 7, 3, 256)
    assert flat["encoder/group_2/block_1/id_path/kernel"].shape == (1, 1, 256, 512)
    assert "encoder/group_1/block_1/id_path/kernel" not in flat
    assert flat["encoder/group_4/block_2/res_path/conv_4/kernel"].shape == (1, 1, 512, 2048)
    assert flat["encoder/output/conv/kernel"].shape == (1, 1, 2048, 8192)
    assert flat["decoder/input/kernel"].shape == (1, 1, 8192, 128)
    assert flat["decoder/group_1/block_1/res_path/conv_1/kernel"].shape == (1, 1, 128, 512)
    assert flat["decoder/group_4/block_2/res_path/conv_4/kernel"].shape == (3, 3, 64, 256)
    assert flat["decoder/output/conv/kernel"].shape == (1, 1, 256, 6)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract))


def test_config_validation_and_dict_round_trip():
    c = dvae.DVAEConfig(image_size=64, group_count=3, n_hid=16, vocab_size=64, dtype="bfloat16")
    assert c.grid == 16 and c.tokens_per_image == 256
    assert c.encoder_widths() == (16, 32, 64) and c.decoder_widths() == (64, 32, 16)
    assert dvae.DVAEConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown DVAEConfig keys.*'n_hidden'"):
        dvae.DVAEConfig.from_dict({"n_hidden": 3})
    with pytest.raises(ValueError, match="divisible by 2\\*\\*\\(group_count-1\\)=8"):
        dvae.DVAEConfig(image_size=36)
    with pytest.raises(ValueError, match="group_count must be >= 1"):
        dvae.DVAEConfig(group_count=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        dvae.DVAEConfig(n_hid=18)
    with pytest.raises(ValueError, match="dtype"):
        dvae.DVAEConfig(dtype="float64")
    with pytest.raises(ValueError, match="vocab_size must be an int"):
        dvae.DVAEConfig(vocab_size=8192.0)


def test_tiny_forward_shapes_and_finiteness(tiny_params):
    images = _images((2, 16, 16, 3))
    encode_logits = _jit(image_tokenizer.encode_logits, model=TINY)
    logits = encode_logits(tiny_params, images)
    assert logits.shape == (2, 4, 4, 32) and logits.dtype == jnp.float32
    tokens = _jit(image_tokenizer.encode, model=TINY)(tiny_params, images)
    assert tokens.shape == (2, 4, 4) and tokens.dtype == jnp.int32
    np.testing.assert_array_equal(tokens, jnp.argmax(logits, -1))
    stats = _jit(image_tokenizer.decode_tokens, model=TINY)(tiny_params, tokens)
    assert stats.shape == (2, 16, 16, 6) and stats.dtype == jnp.float32
    out = dvae.stats_to_images(stats)
    assert out.shape == (2, 16, 16, 3)
    assert bool(jnp.all(jnp.isfinite(logits))) and bool(jnp.all(jnp.isfinite(stats)))
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # uint8 and [0, 1] float inputs mean the same image.
    np.testing.assert_allclose(
        encode_logits(tiny_params, images.astype(np.float32) / 255.0),
        logits, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_fp32_ends(tiny_params):
    cfg = dvae.DVAEConfig(**{**TINY.to_dict(), "dtype": "bfloat16"})
    images = _images((1, 16, 16, 3))
    logits = _jit(image_tokenizer.encode_logits, model=cfg)(tiny_params, images)
    ref = _jit(image_tokenizer.encode_logits, model=TINY)(tiny_params, images)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, ref, atol=0.1 * float(jnp.abs(ref).max()) + 1e-3)


def test_every_kernel_has_logical_axes():
    specs = traverse_util.flatten_dict(dvae.param_logical_specs(TINY), sep="/")
    assert specs, "no parameters"
    for name, spec in specs.items():
        if name.endswith("kernel"):
            assert spec[:2] == ("conv_window", "conv_window"), name
            assert len(spec) == 4, name
        else:
            assert len(spec) == 1, name
    assert tuple(specs["encoder/output/conv/kernel"]) == (
        "conv_window", "conv_window", "conv_in", "codebook")
    assert tuple(specs["decoder/input/kernel"]) == (
        "conv_window", "conv_window", "codebook", "conv_out")
    assert tuple(specs["encoder/group_1/block_1/res_path/conv_2/kernel"]) == (
        "conv_window", "conv_window", "conv_in", "conv_out")
    assert tuple(specs["encoder/input/bias"]) == ("conv_out",)
    # Every name is in the project's vocabulary (sharding.py raises on unknown names).
    from dalle_jax import sharding
    for spec in specs.values():
        assert set(spec) <= set(sharding.LOGICAL_AXES)


def test_init_scale_matches_release(tiny_params):
    flat = traverse_util.flatten_dict(tiny_params, sep="/")
    for name, fan_in in [("encoder/input/kernel", 7 * 7 * 3),
                         ("encoder/group_3/block_2/res_path/conv_1/kernel", 3 * 3 * 64),
                         ("decoder/input/kernel", 32)]:
        assert abs(float(jnp.std(flat[name])) * math.sqrt(fan_in) - 1.0) < 0.15, name
    assert all(float(jnp.abs(v).max()) == 0.0 for n, v in flat.items() if n.endswith("bias"))
    # Distinct kernels get distinct draws.
    a = flat["encoder/group_1/block_1/res_path/conv_2/kernel"]
    b = flat["encoder/group_1/block_2/res_path/conv_2/kernel"]
    assert not np.allclose(a, b)
    # init_variables: the same values, boxed with logical axes (what the trainer shards).
    boxed = dvae.init_variables(TINY, jax.random.key(0))["params"]
    assert isinstance(boxed["encoder"]["input"]["kernel"], nn.LogicallyPartitioned)
    jax.tree.map(np.testing.assert_array_equal, nn.unbox(boxed), tiny_params)
    # The modules' own initialiser (DVAE.init path) has the same scale.
    conv = dvae.Conv(in_features=12, features=64, kernel_size=3)
    v = nn.unbox(conv.init(jax.random.key(1), jnp.zeros((1, 4, 4, 12))))["params"]
    assert abs(float(jnp.std(v["kernel"])) * math.sqrt(12 * 9) - 1.0) < 0.1
    assert float(jnp.abs(v["bias"]).max()) == 0.0


def test_decode_tokens_equals_decode_relaxed_one_hot(tiny_params):
    # Non-zero input bias so the gather path's bias handling is exercised.
    params = jax.tree.map(lambda x: x, tiny_params)
    params["decoder"]["input"]["bias"] = jnp.linspace(-1.0, 1.0, TINY.n_init)
    tokens = jax.random.randint(jax.random.key(1), (2, 4, 4), 0, TINY.vocab_size)
    a = _jit(image_tokenizer.decode_tokens, model=TINY)(params, tokens)
    b = _jit(image_tokenizer.decode_relaxed, model=TINY)(params, jax.nn.one_hot(tokens, TINY.vocab_size))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_kl_to_uniform():
    v = 32
    np.testing.assert_allclose(dvae_objective.kl_to_uniform(jnp.zeros((3, v))), 0.0, atol=1e-6)
    peaked = jnp.zeros((v,)).at[5].set(100.0)
    np.testing.assert_allclose(dvae_objective.kl_to_uniform(peaked), math.log(v), rtol=1e-5)
    logits = jax.random.normal(jax.random.key(0), (4, v))
    q = _np_softmax(np.asarray(logits, np.float64))
    direct = np.sum(q * np.log(q * v), -1)
    np.testing.assert_allclose(dvae_objective.kl_to_uniform(logits), direct, rtol=1e-5, atol=1e-6)


def test_gumbel_softmax():
    logits = jax.random.normal(jax.random.key(0), (5, 7, 32)) * 3
    rng = jax.random.key(1)
    soft = dvae_objective.gumbel_softmax(logits, rng, 1.0)
    np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-5)
    assert bool(jnp.all(soft >= 0))
    # Same noise at every tau: the sample sharpens towards one_hot(argmax(logits + g)).
    peaks = [float(jnp.mean(jnp.max(dvae_objective.gumbel_softmax(logits, rng, t), -1)))
             for t in (1.0, 0.1, 1e-3)]
    assert peaks[0] < peaks[1] < peaks[2] and peaks[2] > 0.99
    cold = dvae_objective.gumbel_softmax(logits, rng, 1e-3)
    np.testing.assert_array_equal(jnp.argmax(cold, -1), jnp.argmax(soft, -1))
    # Noise really is there: samples differ from the plain argmax somewhere.
    assert bool(jnp.any(jnp.argmax(cold, -1) != jnp.argmax(logits, -1)))


def test_map_unmap_round_trip():
    x = jnp.linspace(0.0, 1.0, 11)
    y = dvae.map_pixels(x)
    np.testing.assert_allclose([float(y.min()), float(y.max())], [0.1, 0.9], atol=1e-7)
    np.testing.assert_allclose(dvae.unmap_pixels(y), x, atol=1e-6)
    np.testing.assert_array_equal(dvae.unmap_pixels(jnp.array([0.0, 1.0])), [0.0, 1.0])


def test_logit_laplace_nll_matches_density():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.1, 0.9, size=(4, 3))
    mu = rng.normal(size=(4, 3))
    ln_b = rng.normal(scale=0.5, size=(4, 3))
    nll, nll_param = dvae_objective.logit_laplace_nll(jnp.asarray(x, jnp.float32),
                                            jnp.asarray(np.concatenate([mu, ln_b], -1), jnp.float32))
    b = np.exp(ln_b)
    density = 1.0 / (2 * b * x * (1 - x)) * np.exp(-np.abs(np.log(x / (1 - x)) - mu) / b)
    np.testing.assert_allclose(nll, -np.log(density), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nll - nll_param, np.log(2) + np.log(x) + np.log(1 - x),
                               rtol=1e-5, atol=1e-5)
    # By hand: at x = 1/2, mu = 0, b = 1 the density is 1 / (2 * 1/4) = 2; at x = 0.9
    # (logit ln 9), mu = 0, b = e it is exp(-ln 9 / e) / (2 e 0.09).
    got = dvae_objective.logit_laplace_nll(jnp.asarray([[0.5], [0.9]]),
                                           jnp.asarray([[0.0, 0.0], [0.0, 1.0]]))[0]
    np.testing.assert_allclose(np.ravel(got), [-math.log(2),
                                               math.log(2 * math.e * 0.09) + math.log(9) / math.e],
                               rtol=1e-6)
    # The density integrates to one over (0, 1) (checks the formula, not the code).
    grid = np.linspace(1e-6, 1 - 1e-6, 200001)
    f = 1 / (2 * 0.3 * grid * (1 - grid)) * np.exp(-np.abs(np.log(grid / (1 - grid)) - 0.2) / 0.3)
    assert abs(np.trapezoid(f, grid) - 1.0) < 1e-3


def test_recon_nll_options():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(0.1, 0.9, size=(4, 3)), jnp.float32)
    mu = rng.normal(size=(4, 3))
    ln_b = np.array([[-5.0, 0.3, -1.0]] * 4)
    stats = jnp.asarray(np.concatenate([mu, ln_b], -1), jnp.float32)
    # Default: the unclamped logit-Laplace term.
    np.testing.assert_allclose(dvae_objective.recon_nll(x, stats)[0],
                               _np_logit_laplace_nll(np.asarray(x), mu, ln_b), rtol=1e-5, atol=1e-5)
    # ln_b_min floors ln b (and only ln b) before the logit-Laplace term.
    np.testing.assert_allclose(dvae_objective.recon_nll(x, stats, ln_b_min=-2.0)[0],
                               _np_logit_laplace_nll(np.asarray(x), mu, np.maximum(ln_b, -2.0)),
                               rtol=1e-5, atol=1e-5)
    grad_ln_b = jax.grad(lambda s: dvae_objective.recon_nll(x, s, ln_b_min=-2.0)[0].sum())(stats)[:, 3:]
    assert np.all(np.asarray(grad_ln_b)[:, 0] == 0) and np.all(np.asarray(grad_ln_b)[:, 1:] != 0)
    # "mse": Gaussian density of the mapped pixel around sigmoid(mu), ln b ignored.
    nll, nll_param = dvae_objective.recon_nll(x, stats, recon_loss="mse", mse_sigma=0.2)
    mean = 1 / (1 + np.exp(-mu))
    density = np.exp(-((np.asarray(x) - mean) ** 2) / (2 * 0.2**2)) / (0.2 * math.sqrt(2 * math.pi))
    np.testing.assert_allclose(nll, -np.log(density), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nll_param, (np.asarray(x) - mean) ** 2 / 0.08, rtol=1e-5, atol=1e-6)
    grads = jax.grad(lambda s: dvae_objective.recon_nll(x, s, recon_loss="mse")[0].sum())(stats)
    assert np.all(np.asarray(grads)[:, 3:] == 0) and np.all(np.asarray(grads)[:, :3] != 0)
    with pytest.raises(ValueError, match="recon_loss must be one of"):
        dvae_objective.recon_nll(x, stats, recon_loss="l1")
    with pytest.raises(ValueError, match="sigma must be > 0"):
        dvae_objective.recon_nll(x, stats, recon_loss="mse", mse_sigma=0.0)


def test_dvae_loss_with_mse_recon(tiny_params):
    images = _images((2, 16, 16, 3), seed=4)
    rng = jax.random.key(5)
    loss, aux = _jit(dvae_objective.dvae_loss, tau=0.5, beta=2.0, model=TINY, recon_loss="mse",
                     mse_sigma=0.1)(tiny_params, images, rng)
    logits, stats = _logits_and_stats(tiny_params, images, rng, 0.5)
    _check_aux(loss, aux, _np_objective(images, logits, stats, 2.0, recon="mse", sigma=0.1))
    np.testing.assert_allclose(aux["recon_nll"] - aux["recon_nll_param"],
                               math.log(0.1 * math.sqrt(2 * math.pi)), rtol=1e-5)
    # The parameter-dependent part is the squared error on the mapped scale over 2 sigma^2.
    x_mapped = 0.8 * images / 255.0 + 0.1
    sq = np.mean((1 / (1 + np.exp(-stats[..., :3])) - x_mapped) ** 2)
    np.testing.assert_allclose(aux["recon_nll_param"], sq / 0.02, rtol=1e-4)


def test_dvae_loss_and_gradients(tiny_params):
    images = _images((2, 16, 16, 3), seed=3)
    rng = jax.random.key(2)
    loss_fn = jax.jit(lambda p, x, r: dvae_objective.dvae_loss(p, x, r, tau=1.0, beta=6.6, model=TINY))
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(tiny_params, images, rng)
    logits, stats = _logits_and_stats(tiny_params, images, rng, 1.0)
    want = _np_objective(images, logits, stats, 6.6)
    _check_aux(loss, aux, want)
    assert aux["codes"].shape == (2, 4, 4) and aux["codes"].dtype == jnp.int32
    for v in (loss, *[aux[k] for k in ("recon_nll", "recon_nll_param", "elb_bpd", "mse")]):
        assert bool(jnp.isfinite(v))
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    flat = traverse_util.flatten_dict(grads, sep="/")
    # Gradient reaches the encoder through the relaxation and the KL.
    assert float(jnp.abs(flat["encoder/input/kernel"]).max()) > 0
    assert float(jnp.abs(flat["decoder/input/kernel"]).max()) > 0
    # The true-ELB path (a hard sample) also runs.
    hard_loss, hard = _jit(dvae_objective.dvae_loss, tau=1.0, beta=1.0, model=TINY,
                           hard_sample=True)(tiny_params, images, rng)
    logits, stats = _logits_and_stats(tiny_params, images, rng, 1.0, hard=True)
    _check_aux(hard_loss, hard, _np_objective(images, logits, stats, 1.0))


def test_bad_inputs(tiny_params):
    with pytest.raises(ValueError, match="images are 32x32 .*image_size=16"):
        image_tokenizer.encode(tiny_params, _images((1, 32, 32, 3)), model=TINY)
    with pytest.raises(ValueError, match="1 channels .*input_channels=3"):
        image_tokenizer.encode(tiny_params, _images((1, 16, 16, 1)), model=TINY)
    with pytest.raises(ValueError, match="4-D"):
        image_tokenizer.encode(tiny_params, _images((16, 16, 3)), model=TINY)
    with pytest.raises(ValueError, match="dtype int32"):
        image_tokenizer.encode(tiny_params, _images((1, 16, 16, 3)).astype(np.int32), model=TINY)
    with pytest.raises(ValueError, match=r"\(B, 4, 4\)"):
        image_tokenizer.decode(tiny_params, jnp.zeros((1, 8, 8), jnp.int32), model=TINY)
    with pytest.raises(ValueError, match="integers"):
        image_tokenizer.decode(tiny_params, jnp.zeros((1, 4, 4), jnp.float32), model=TINY)
    with pytest.raises(ValueError, match=r"\(B, 4, 4, 32\)"):
        image_tokenizer.decode_relaxed(tiny_params, jnp.zeros((1, 4, 4, 16)), model=TINY)
    tok = image_tokenizer.ImageTokenizer(TINY, tiny_params)
    with pytest.raises(ValueError, match=r"\[0, 32\), got min 32, max 32"):
        tok.decode(np.full((1, 4, 4), 32))
    with pytest.raises(ValueError, match="got min -1"):
        tok.decode(np.full((1, 4, 4), -1))
    with pytest.raises(ValueError, match="image_size=16"):
        tok.encode(np.zeros((1, 8, 8, 3), np.uint8))


def test_image_tokenizer_round_trip(tiny_params):
    tok = image_tokenizer.ImageTokenizer(TINY, tiny_params)
    images = _images((3, 16, 16, 3), seed=5)
    tokens = tok.encode(images)
    logits = _jit(image_tokenizer.encode_logits, model=TINY)(tiny_params, images)
    np.testing.assert_array_equal(tokens, jnp.argmax(logits, -1))
    out = tok.decode(np.asarray(tokens))
    assert out.shape == (3, 16, 16, 3) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, tok.decode(tokens))
    assert tok.grid == 4 and tok.vocab_size == 32


def test_logical_constraints_under_mesh(tiny_params):
    # Activations carry ("batch", "height", "width") constraints; they must resolve
    # under the project's rules on the 8 fake devices.
    from dalle_jax import sharding
    mesh = sharding.make_mesh({"data": -1})
    images = _images((8, 16, 16, 3))
    fn = jax.jit(lambda p, x: image_tokenizer.encode(p, x, model=TINY))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.get_rules("fsdp")):
        assert "sharding_constraint" in str(fn.lower(tiny_params, images).as_text())
        tokens = fn(tiny_params, images)
    np.testing.assert_array_equal(tokens, fn(tiny_params, images))
