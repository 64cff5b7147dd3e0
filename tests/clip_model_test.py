"""The contrastive towers (`dalle_jax.models.clip`): shapes, the causal text mask, one
parameter tree for all entry points, preprocessing and config validation."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dalle_jax.models import clip

TINY = clip.ClipConfig(embed_dim=16, image_size=16, patch_size=4, vision_width=32,
                       vision_layers=2, vision_heads=2, vocab_size=50, context_length=12,
                       text_width=24, text_layers=2, text_heads=3)


@pytest.fixture(scope="module")
def params():
    return clip.init_params(TINY, jax.random.key(0))


def _tokens(rng, b, eot):
    tokens = rng.integers(1, TINY.vocab_size - 1, (b, TINY.context_length)).astype(np.int32)
    for r, e in enumerate(eot):
        tokens[r, e] = TINY.vocab_size - 1
        tokens[r, e + 1:] = 0
    return tokens


def test_default_config_is_vit_b32():
    shapes = clip.param_shapes(clip.ClipConfig())
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert n == 151_277_313  # OpenAI's ViT-B/32
    assert clip.ClipConfig().num_patches == 49


def test_init_params_follows_the_module_rules(params):
    shapes = clip.param_shapes(TINY)
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    jax.tree.map(lambda s, p: np.testing.assert_equal(s.shape, p.shape), shapes, params)
    np.testing.assert_array_equal(params["visual"]["ln_pre"]["scale"], 1.0)
    np.testing.assert_array_equal(params["text"]["resblocks_1"]["mlp_c_fc_bias"], 0.0)
    checks = [(params["text"]["token_embedding"], 0.02),
              (params["text"]["positional_embedding"], 0.01),
              (params["visual"]["positional_embedding"], 32 ** -0.5),
              (params["visual"]["resblocks_0"]["attn_qkv_kernel"], 32 ** -0.5),
              (params["visual"]["resblocks_0"]["mlp_c_proj_kernel"], 32 ** -0.5 / 2),
              (params["text"]["resblocks_0"]["mlp_c_fc_kernel"], 48 ** -0.5)]
    for leaf, std in checks:
        assert abs(float(np.std(leaf)) / std - 1) < 0.15, (leaf.shape, std)
    again = clip.init_params(TINY, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, again, params)
    other = clip.init_params(TINY, jax.random.key(1))
    assert not np.array_equal(other["visual"]["proj"], params["visual"]["proj"])


def test_shapes_and_one_tree(params):
    model = clip.CLIP(TINY)
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
    eot = np.array([2, 5, 11], np.int32)
    tokens = _tokens(rng, 3, eot)
    img = jax.jit(functools.partial(model.apply, method=model.encode_image))(
        {"params": params}, pixels)
    txt = jax.jit(functools.partial(model.apply, method=model.encode_text))(
        {"params": params}, tokens, eot)
    assert img.shape == (3, 16) and txt.shape == (3, 16)
    assert img.dtype == jnp.float32 and txt.dtype == jnp.float32
    img2, txt2, scale = jax.jit(model.apply)({"params": params}, pixels, tokens, eot)
    np.testing.assert_allclose(img, img2, rtol=1e-6)
    np.testing.assert_allclose(txt, txt2, rtol=1e-6)
    np.testing.assert_allclose(scale, np.log(1 / 0.07), rtol=1e-6)
    assert set(params) == {"visual", "text", "logit_scale"}
    assert params["visual"]["resblocks_1"]["attn_qkv_kernel"].shape == (32, 3, 32)
    assert params["text"]["resblocks_0"]["attn_qkv_bias"].shape == (3, 24)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    with pytest.raises(ValueError, match="pixels of shape"):
        model.apply({"params": params}, pixels[:, :8], method=model.encode_image)


def test_text_mask_is_causal(params):
    model = clip.CLIP(TINY)
    rng = np.random.default_rng(1)
    eot = np.array([4, 7], np.int32)
    tokens = _tokens(rng, 2, eot)
    enc = jax.jit(lambda t, e: model.apply({"params": params}, t, e, method=model.encode_text))
    base = np.asarray(enc(tokens, eot))
    after = tokens.copy()
    after[0, 5:] = rng.integers(1, 40, TINY.context_length - 5)
    after[1, 8:] = 3
    np.testing.assert_array_equal(np.asarray(enc(after, eot)), base)
    before = tokens.copy()
    before[:, 1] = (before[:, 1] + 1) % (TINY.vocab_size - 1)
    changed = np.asarray(enc(before, eot))
    assert np.all(np.abs(changed - base).max(axis=-1) > 1e-4)
    # Fewer positions than context_length gives the same features (causal mask).
    short = np.asarray(enc(tokens[:, :8], eot))
    np.testing.assert_allclose(short, base, atol=1e-5)


def test_compute_dtype_bfloat16(params):
    model = clip.CLIP(dataclasses.replace(TINY, dtype="bfloat16"))
    ref = clip.CLIP(TINY)
    pixels = np.random.default_rng(2).normal(size=(2, 16, 16, 3)).astype(np.float32)
    img = jax.jit(functools.partial(model.apply, method=model.encode_image))(
        {"params": params}, pixels)
    img_ref = jax.jit(functools.partial(ref.apply, method=ref.encode_image))(
        {"params": params}, pixels)
    assert img.dtype == jnp.float32
    assert np.all(np.asarray(clip.similarity(img, img_ref)) > 0.99)


def test_normalize_and_similarity():
    a = jnp.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(clip.normalize(a), [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)
    b = jnp.array([[6.0, 8.0], [1.0, 0.0]])
    c = jnp.array([[-3.0, -4.0], [0.0, 2.0]])
    np.testing.assert_allclose(clip.similarity(b, c), [-1.0, 0.0], atol=1e-6)


def _expected(u8):
    mean = np.asarray(clip.MEAN, np.float32)
    std = np.asarray(clip.STD, np.float32)
    return (u8.astype(np.float32) / 255.0 - mean) / std


def test_preprocess_centre_crop_without_resize():
    cfg = dataclasses.replace(TINY, image_size=4, patch_size=2)
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    out = clip.preprocess(image[None], cfg)
    assert out.shape == (1, 4, 4, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], _expected(image[:, 1:5]), atol=1e-6)
    # Tall image: rows cropped; torchvision rounds the offset (7 - 4) / 2 = 1.5 to 2.
    tall = np.arange(7 * 4 * 3, dtype=np.uint8).reshape(7, 4, 3)
    np.testing.assert_allclose(clip.preprocess(tall, cfg)[0], _expected(tall[2:6]), atol=1e-6)
    # Float input in [0, 1] is the same image.
    np.testing.assert_allclose(clip.preprocess(image[None] / 255.0, cfg), out, atol=1e-6)


def test_preprocess_resizes_shorter_side_with_pil_bicubic():
    cfg = dataclasses.replace(TINY, image_size=8, patch_size=2)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)
    out = clip.preprocess(images, cfg)
    assert out.shape == (2, 8, 8, 3)
    for im, got in zip(images, out):
        # Shorter side 20 -> 8, longer int(8 * 30 / 20) = 12, then columns 2..9.
        small = np.asarray(Image.fromarray(im).resize((12, 8), Image.Resampling.BICUBIC))
        np.testing.assert_allclose(got, _expected(small[:, 2:10]), atol=1e-6)
    # A flat colour stays that colour through the resize.
    flat = np.full((1, 32, 24, 3), (10, 128, 250), np.uint8)
    np.testing.assert_allclose(clip.preprocess(flat, cfg)[0],
                               np.broadcast_to(_expected(flat[0, 0, 0]), (8, 8, 3)), atol=1e-5)
    # Float images resize per channel in PIL's float mode: close to the uint8 path.
    np.testing.assert_allclose(clip.preprocess(images / 255.0, cfg), out, atol=0.05)
    assert clip.preprocess(np.zeros((0, 20, 30, 3), np.uint8), cfg).shape == (0, 8, 8, 3)


def test_preprocess_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        clip.preprocess(np.zeros((2, 16, 16), np.uint8), TINY)
    with pytest.raises(ValueError, match="dtype"):
        clip.preprocess(np.zeros((1, 16, 16, 3), np.int32), TINY)
    with pytest.raises(ValueError, match="resize"):
        clip.preprocess(np.zeros((1, 16, 16, 3), np.uint8), TINY, resize="lanczos")


@pytest.mark.parametrize("change, message", [
    (dict(vision_width=31), "vision_width=31 is not divisible by vision_heads=2"),
    (dict(text_width=25), "text_width=25 is not divisible by text_heads=3"),
    (dict(image_size=18), "image_size=18 is not divisible by patch_size=4"),
    (dict(embed_dim=0), "embed_dim must be >= 1"),
    (dict(vision_layers=-1), "vision_layers must be >= 1"),
    (dict(context_length=1), "context_length must be >= 2"),
    (dict(activation="relu"), "activation must be one of"),
    (dict(dtype="float64"), "dtype must be one of"),
    (dict(patch_size=4.0), "patch_size must be an integer"),
])
def test_config_validation(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **change)
