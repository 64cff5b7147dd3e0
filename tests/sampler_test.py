"""KV-cached sampler: cached logits equal the training forward's, determinism, completion."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.models import transformer as tr
from dalle_jax.sample import sampler as smp

TEXT_LEN, GRID = 5, 3
TINY = tr.TransformerConfig(text_vocab=12 + TEXT_LEN, image_vocab=16, text_len=TEXT_LEN,
                            grid=GRID, width=32, depth=4, heads=2, conv_kernel=3)


pytestmark = pytest.mark.usefixtures("fast_compile")


@functools.lru_cache(maxsize=None)
def _params(config: tr.TransformerConfig, seed: int = 0) -> dict:
    """Params with noise on every leaf (the fresh zero heads would give uniform logits)."""
    params = nn.unbox(jax.jit(functools.partial(tr.init_variables, config))(
        jax.random.key(seed)))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape, np.float32), params)


def _batch(config, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, config.text_vocab, (batch, config.text_len), dtype=np.int32),
            rng.integers(0, config.image_vocab, (batch, config.image_len), dtype=np.int32))


def _teacher_forced(params, config, text, image, n_prefix):
    """Text + image logits from the cache path: one pass over text and the first
    ``n_prefix`` image slots, then one cached step per remaining image slot."""
    cache = smp.init_cache(config, text.shape[0])
    x = smp.prefix_embeddings(params, config, text, image[:, :n_prefix])
    h, cache = smp.forward_cached(params, config, x, 0, cache)
    text_logits = tr.unpad(
        jnp.einsum("btd,dv->btv", h[:, :config.text_len], params["text_head"]), config.text_vocab)
    image_logits = [smp.image_logits(params, config, h[:, config.text_len:])]
    _, image_in = tr.make_inputs(text, image, config.boi_id)
    for k in range(n_prefix, config.image_len):
        x = tr.embed_image(params["image_embed"], params["row_embed"], params["col_embed"],
                           image_in[:, k:k + 1], start=k)
        h, cache = smp.forward_cached(params, config, x, config.text_len + k, cache)
        image_logits.append(smp.image_logits(params, config, h))
    return text_logits, jnp.concatenate(image_logits, axis=1)


@pytest.mark.parametrize("config", [
    TINY,
    dataclasses.replace(TINY, attn_pattern="dense"),
    dataclasses.replace(TINY, attn_pattern="column,conv_2d,row,column", conv_kernel=5),
    dataclasses.replace(TINY, grid=4, attn_pattern="row,column,row,conv", conv_kernel=3),
], ids=["paper", "dense", "mixed", "grid4"])
@pytest.mark.parametrize("n_prefix", [0, 4])
def test_cached_logits_equal_training_forward(config, n_prefix):
    params = _params(config)
    text, image = _batch(config)
    want_text, want_image = tr.Transformer(config).apply({"params": params}, text, image)
    got_text, got_image = _teacher_forced(params, config, text, image, n_prefix)
    np.testing.assert_allclose(got_text, want_text, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(got_image, want_image, atol=2e-5, rtol=2e-5)


def _sample(config, text, ids, key=0, prefix=None, **sampling):
    fn = jax.jit(functools.partial(smp.sample_tokens, config=config,
                                   sampling=smp.SamplingConfig(**sampling)))
    return np.asarray(fn(_params(config), text, ids, jax.random.key(key), prefix))


def test_greedy_sample_is_the_forward_argmax():
    text, _ = _batch(TINY, batch=3, seed=1)
    tokens = _sample(TINY, text, np.arange(3), top_k=1)
    _, logits_image = tr.Transformer(TINY).apply({"params": _params(TINY)}, text, tokens)
    np.testing.assert_array_equal(np.argmax(logits_image, -1), tokens)


def test_sample_depends_on_sample_id_not_on_batch():
    text, _ = _batch(TINY, batch=4, seed=2)
    ids = np.asarray([7, 3, 11, 0], np.int32)
    together = _sample(TINY, text, ids)
    alone = np.concatenate([_sample(TINY, text[i:i + 1], ids[i:i + 1]) for i in range(4)])
    np.testing.assert_array_equal(together, alone)
    # Another id (or seed) gives another stream; the same text with the same id the same image.
    same_text = np.repeat(text[:1], 3, axis=0)
    out = _sample(TINY, same_text, np.asarray([5, 5, 6], np.int32))
    np.testing.assert_array_equal(out[0], out[1])
    assert not np.array_equal(out[0], out[2])
    assert not np.array_equal(_sample(TINY, text, ids, key=1), together)


def test_completion_keeps_the_prefix_and_reproduces_the_rest():
    text, image = _batch(TINY, batch=2, seed=3)
    ids = np.asarray([0, 1], np.int32)
    full = _sample(TINY, text, ids)
    # The prefix is kept verbatim.
    completed = _sample(TINY, text, ids, prefix=image[:, :4])
    np.testing.assert_array_equal(completed[:, :4], image[:, :4])
    # Completing a sample's own first rows redraws the same rest: per-slot RNG streams and
    # the cache-filling pass agree with the one-slot-at-a-time path.
    again = _sample(TINY, text, ids, prefix=full[:, :GRID])
    np.testing.assert_array_equal(again, full)
    # A full-length prefix is returned as it is.
    np.testing.assert_array_equal(_sample(TINY, text, ids, prefix=image), image)


def test_filter_logits():
    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]], jnp.float32))
    kept = lambda **kw: np.isfinite(np.asarray(  # noqa: E731
        smp.filter_logits(logits, smp.SamplingConfig(**kw))))[0]
    np.testing.assert_array_equal(kept(top_k=2), [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(kept(top_p=0.5), [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(kept(top_p=0.6), [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(kept(top_p=0.86), [1, 1, 1, 1, 0])
    np.testing.assert_array_equal(kept(top_k=3, top_p=0.6), [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(kept(), [1, 1, 1, 1, 1])
    scaled = smp.filter_logits(logits, smp.SamplingConfig(temperature=2.0))
    np.testing.assert_allclose(scaled, logits / 2.0, rtol=1e-6)


def test_sampled_tokens_follow_the_filter():
    text, _ = _batch(TINY, batch=8, seed=4)
    tokens = _sample(TINY, text, np.arange(8), top_k=2)
    _, logits = tr.Transformer(TINY).apply({"params": _params(TINY)}, text, tokens)
    top2 = np.argsort(-np.asarray(logits), axis=-1)[..., :2]
    assert np.all((top2 == tokens[..., None]).any(-1))


@pytest.mark.parametrize("kw,err", [
    (dict(temperature=0.0), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(guidance=-0.5), "guidance"),
])
def test_sampling_config_rejects_bad_values(kw, err):
    with pytest.raises(ValueError, match=err):
        smp.SamplingConfig(**kw)


def test_bad_inputs_raise():
    text, image = _batch(TINY)
    with pytest.raises(ValueError, match="text_len"):
        _sample(TINY, text[:, :-1], np.arange(2))
    with pytest.raises(ValueError, match="sample id"):
        _sample(TINY, text, np.arange(3))
    with pytest.raises(ValueError, match="longer than the image"):
        _sample(TINY, text, np.arange(2), prefix=np.concatenate([image, image], 1))


class _FakeTextTokenizer:
    """Stands in for `TextTokenizer`: caption ``"c<i>"`` becomes slots ``[0, i, pads...]``."""

    def text_vocab_size(self, text_len):
        return TINY.text_vocab

    def encode_batch_slots(self, captions, *, text_len):
        out = np.tile(np.arange(12, 12 + text_len, dtype=np.int32), (len(captions), 1))
        out[:, 0] = 0
        # The empty caption (the unconditional text of guidance) keeps its pad in slot 1.
        out[:, 1] = [int(c[1:]) if c else 13 for c in captions]
        return out, {}


def test_sampler_batches_pad_and_number_samples_globally():
    s = smp.Sampler(TINY, _params(TINY), _FakeTextTokenizer())
    caps = ["c1", "c2", "c3"]
    a = s.tokens(caps, num_candidates=2, seed=5, batch_size=4)  # 6 samples: 4 + padded 2
    b = s.tokens(caps, num_candidates=2, seed=5, batch_size=6)
    assert a.shape == (3, 2, GRID, GRID)
    np.testing.assert_array_equal(a, b)
    # Caption 2, candidate 1 is global sample 5 whichever way it is requested.
    c = s.tokens(["c3"], num_candidates=1, seed=5, first_sample_index=5)
    np.testing.assert_array_equal(c[0, 0], a[2, 1])
    with pytest.raises(ValueError, match="no image tokenizer"):
        s.images(a)
    with pytest.raises(ValueError, match="num_candidates"):
        s.tokens(caps, num_candidates=0)


def test_candidate_ranges_draw_the_same_tokens_as_the_full_draw():
    s = smp.Sampler(TINY, _params(TINY), _FakeTextTokenizer())
    caps = ["c1", "c2", "c3"]
    full = s.tokens(caps, num_candidates=5, seed=4, batch_size=4)
    drawn = []
    parts = [s.tokens(caps, num_candidates=5, seed=4, batch_size=4, candidates=r,
                      progress=drawn.append) for r in [(0, 2), (2, 3), (3, 5)]]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), full)
    assert sum(drawn) == 3 * 5
    for bad in [(0, 0), (3, 6), (-1, 2)]:
        with pytest.raises(ValueError, match="candidates must be a range"):
            s.tokens(caps, num_candidates=5, candidates=bad)
    with pytest.raises(ValueError, match="no captions"):
        s.tokens([], num_candidates=2)


def _null_text(config):
    return _FakeTextTokenizer().encode_batch_slots([""], text_len=config.text_len)[0][0]


def test_guidance_zero_samples_the_unconditional_model():
    # u + 0 * (c - u) == u exactly: guided sampling at scale 0 draws what plain sampling
    # of the empty caption draws, so the twin rows, their cache and their pairing are right.
    text, _ = _batch(TINY, batch=3, seed=7)
    ids = np.arange(3, dtype=np.int32)
    null = _null_text(TINY)
    fn = jax.jit(functools.partial(smp.sample_tokens, config=TINY,
                                   sampling=smp.SamplingConfig(guidance=0.0)))
    guided = np.asarray(fn(_params(TINY), text, ids, jax.random.key(3), None, null))
    plain = _sample(TINY, np.tile(null, (3, 1)), ids, key=3)
    np.testing.assert_array_equal(guided, plain)
    assert not np.array_equal(plain, _sample(TINY, text, ids, key=3))


class _AlwaysTwin(smp.SamplingConfig):
    """Runs the guided program even at scale 1 (to test its arithmetic)."""

    @property
    def guided(self):
        return True


def test_guidance_one_is_unguided_sampling():
    text, _ = _batch(TINY, batch=4, seed=8)
    ids = np.arange(4, dtype=np.int32)
    null = _null_text(TINY)
    # Scale 1 runs the plain program: the same tokens bit for bit, at any temperature.
    s1 = smp.Sampler(TINY, _params(TINY), _FakeTextTokenizer(),
                     sampling=smp.SamplingConfig(guidance=1.0))
    s0 = smp.Sampler(TINY, _params(TINY), _FakeTextTokenizer())
    np.testing.assert_array_equal(s1.tokens(["c1", "c2"], num_candidates=3, seed=1),
                                  s0.tokens(["c1", "c2"], num_candidates=3, seed=1))
    # And the guided program itself reduces to it: u + 1 * (c - u) == c (greedy, so float
    # rounding of the difference cannot flip a draw).
    fn = jax.jit(functools.partial(smp.sample_tokens, config=TINY,
                                   sampling=_AlwaysTwin(top_k=1)))
    twin = np.asarray(fn(_params(TINY), text, ids, jax.random.key(0), None, null))
    np.testing.assert_array_equal(twin, _sample(TINY, text, ids, top_k=1))


def test_guided_sampling_is_the_same_on_a_mesh_and_follows_the_scale():
    from dalle_jax import sharding

    caps = ["c1", "c2", "c3"]
    g = smp.SamplingConfig(guidance=3.0)
    one = smp.Sampler(TINY, _params(TINY), _FakeTextTokenizer(), sampling=g)
    want = one.tokens(caps, num_candidates=3, seed=2, batch_size=4)
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1), jax.devices()[:8])
    s = smp.Sampler(TINY, _params(TINY), _FakeTextTokenizer(), sampling=g, mesh=mesh,
                    rules="dp")
    np.testing.assert_array_equal(s.tokens(caps, num_candidates=3, seed=2, batch_size=4), want)
    plain = smp.Sampler(TINY, _params(TINY), _FakeTextTokenizer()).tokens(
        caps, num_candidates=3, seed=2, batch_size=4)
    assert not np.array_equal(want, plain)


def test_sampler_completes_images_from_kept_rows():
    s = smp.Sampler(TINY, _params(TINY), _FakeTextTokenizer())
    _, image = _batch(TINY, batch=2, seed=6)
    out = s.complete(["c1", "c2"], keep_rows=1, image_tokens=image, num_candidates=2, seed=3)
    assert out.shape == (2, 2, GRID, GRID)
    np.testing.assert_array_equal(out[:, :, 0], np.repeat(image.reshape(2, 1, GRID, GRID)[:, :, 0],
                                                          2, axis=1))
    # Keeping every row returns the image; bad arguments are named.
    full = s.complete(["c1", "c2"], keep_rows=GRID, image_tokens=image)
    np.testing.assert_array_equal(full[:, 0].reshape(2, -1), image)
    with pytest.raises(ValueError, match="keep_rows"):
        s.complete(["c1", "c2"], keep_rows=GRID + 1, image_tokens=image)
    with pytest.raises(ValueError, match="exactly one"):
        s.complete(["c1", "c2"], keep_rows=1)
    with pytest.raises(ValueError, match="dVAE"):
        s.complete(["c1", "c2"], keep_rows=1, images=np.zeros((2, 16, 16, 3), np.uint8))


@pytest.mark.parametrize("rules,degrees,num_devices", [
    ("dp", dict(data=1, fsdp=1, tensor=1), 1),
    ("dp", dict(data=-1, fsdp=1, tensor=1), 8),
    ("fsdp", dict(data=1, fsdp=8, tensor=1), 8),
    ("fsdp_tp", dict(data=2, fsdp=2, tensor=2), 8),
])
def test_sampling_on_a_mesh_gives_the_same_images(rules, degrees, num_devices):
    from dalle_jax import sharding

    reference = smp.Sampler(TINY, _params(TINY), _FakeTextTokenizer())
    caps = ["c1", "c2", "c3"]
    want = reference.tokens(caps, num_candidates=3, seed=2, batch_size=4)
    mesh = sharding.make_mesh(degrees, jax.devices()[:num_devices])
    s = smp.Sampler(TINY, _params(TINY), _FakeTextTokenizer(), mesh=mesh, rules=rules)
    # Parameters live where the training rules put them.
    expected = smp.param_shardings(TINY, mesh, sharding.get_rules(rules))
    jax.tree.map(lambda p, sh: p.sharding.is_equivalent_to(sh, p.ndim) or pytest.fail(str(sh)),
                 s.params, expected)
    if rules != "dp":
        qkv = s.params["layers"]["qkv_kernel"]
        assert qkv.addressable_shards[0].data.size < qkv.size  # no device holds it whole
    # 9 samples in batches rounded up to the batch shards: same tokens as one device.
    got = s.tokens(caps, num_candidates=3, seed=2, batch_size=4)
    np.testing.assert_array_equal(got, want)
