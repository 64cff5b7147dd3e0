"""Tests of the OpenAI dVAE importer (dalle_jax.tokenizers.openai_import).

The golden tests build the ``dall_e`` package's own Encoder/Decoder with random weights on
CPU, pickle them whole (as OpenAI did), convert, and compare forward passes in fp32.
``dall_e`` fixes group_count = 4 and requires n_hid >= 64 and vocab_size >= 512.
"""

import functools
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from dalle_jax import exports, treeutil
from dalle_jax.tokenizers import dvae, image_tokenizer, openai_import

IMAGE = 32  # grid 4 with group_count 4
N_HID, VOCAB, N_BLK = 64, 512, 2


def _jit(fn, **kwargs):
    return jax.jit(functools.partial(fn, **kwargs))


@pytest.fixture(scope="module")
def release(tmp_path_factory, require):
    """Randomised dall_e Encoder/Decoder, pickled to disk; returns (enc, dec, enc_pkl, dec_pkl).

    Skips without torch or dall_e, except in CI, where it fails naming the missing package."""
    torch = require("torch")
    dall_e = require("dall_e")
    torch.manual_seed(0)
    kw = dict(n_hid=N_HID, n_blk_per_group=N_BLK, vocab_size=VOCAB,
              device=torch.device("cpu"), requires_grad=False, use_mixed_precision=False)
    enc, dec = dall_e.Encoder(**kw), dall_e.Decoder(n_init=32, **kw)
    with torch.no_grad():
        for module in (enc, dec):
            for name, p in module.named_parameters():
                if name.endswith(".b"):
                    # Biases are zero at init: randomise them so their mapping is tested.
                    p.normal_(std=0.1)
                else:
                    p.mul_(1.0 + 0.3 * torch.randn_like(p))
                if "res_path.conv_4" in name and name.endswith(".w"):
                    # Undo most of post_gain = 1/64 so a res_path mapping error cannot hide
                    # under the tolerance.
                    p.mul_(16.0)
    d = tmp_path_factory.mktemp("openai")
    enc_pkl, dec_pkl = d / "encoder.pkl", d / "decoder.pkl"
    torch.save(enc, enc_pkl)
    torch.save(dec, dec_pkl)
    return enc, dec, str(enc_pkl), str(dec_pkl)


@pytest.fixture(scope="module")
def converted(release):
    _, _, enc_pkl, dec_pkl = release
    return openai_import.convert(enc_pkl, dec_pkl, image_size=IMAGE)


def test_config_inferred(converted, release):
    config, params = converted
    assert config == dvae.DVAEConfig(image_size=IMAGE, input_channels=3, group_count=4,
                                     n_hid=N_HID, n_blk_per_group=N_BLK, n_init=32,
                                     vocab_size=VOCAB)
    enc, dec, _, _ = release
    n_torch = sum(p.numel() for p in enc.parameters()) + sum(p.numel() for p in dec.parameters())
    assert treeutil.count_params(params) == n_torch
    flat = traverse_util.flatten_dict(params, sep="/")
    w = enc.state_dict()["blocks.group_2.block_1.res_path.conv_1.w"].numpy()
    np.testing.assert_array_equal(
        flat["encoder/group_2/block_1/res_path/conv_1/kernel"], w.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(flat["decoder/output/conv/bias"],
                                  dec.state_dict()["blocks.output.conv.b"].numpy())


def test_encoder_matches_release(converted, release):
    import torch  # installed: the release fixture requires it
    from dall_e import map_pixels

    config, params = converted
    enc = release[0]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, IMAGE, IMAGE, 3)).astype(np.uint8)
    x01 = images.astype(np.float32) / 255.0
    with torch.no_grad():
        ref = enc(map_pixels(torch.from_numpy(x01.transpose(0, 3, 1, 2).copy())))
    ref = ref.numpy().transpose(0, 2, 3, 1)  # (B, G, G, V)
    ours = np.asarray(_jit(image_tokenizer.encode_logits, model=config)(params, images))
    assert ours.shape == ref.shape == (2, 4, 4, VOCAB)
    scale = float(np.abs(ref).max())
    assert scale > 1.0
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * scale)
    # Same tokens wherever the top-2 gap is above the numerical noise.
    top2 = np.sort(ref, -1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 1e-3 * scale
    assert clear.mean() > 0.9
    tokens = np.asarray(image_tokenizer.ImageTokenizer(config, params).encode(images))
    np.testing.assert_array_equal(tokens[clear], ref.argmax(-1)[clear])


def test_decoder_matches_release(converted, release):
    import torch  # installed: the release fixture requires it
    from dall_e import unmap_pixels

    config, params = converted
    dec = release[1]
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=(2, 4, 4))
    relaxed = np.asarray(jax.nn.softmax(
        3.0 * jax.random.normal(jax.random.key(0), (2, 4, 4, VOCAB)), -1))
    one_hot = np.eye(VOCAB, dtype=np.float32)[tokens]

    def torch_stats(z_BGGC):
        with torch.no_grad():
            out = dec(torch.from_numpy(np.ascontiguousarray(z_BGGC.transpose(0, 3, 1, 2))))
        return out

    for z, ours in [
        (one_hot, _jit(image_tokenizer.decode_tokens, model=config)(params, tokens)),
        (relaxed, _jit(image_tokenizer.decode_relaxed, model=config)(params, relaxed)),
    ]:
        ref_t = torch_stats(z)
        ref = ref_t.numpy().transpose(0, 2, 3, 1)
        assert ours.shape == ref.shape == (2, IMAGE, IMAGE, 6)
        scale = float(np.abs(ref).max())
        np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4, atol=1e-4 * scale)
    # Image reconstruction from the token path, as in OpenAI's notebook.
    ref_img = unmap_pixels(torch.sigmoid(torch_stats(one_hot)[:, :3])).numpy().transpose(0, 2, 3, 1)
    img = image_tokenizer.ImageTokenizer(config, params).decode(tokens)
    np.testing.assert_allclose(np.asarray(img), ref_img, atol=1e-5)


def test_round_trip_without_torch():
    # Our params -> release-style numpy state dicts -> convert: exact, any group_count.
    config = dvae.DVAEConfig(image_size=16, group_count=3, n_hid=16, n_blk_per_group=1,
                             n_init=8, vocab_size=32)
    params = dvae.init_params(config, jax.random.key(0))
    sds = {}
    for half in ("encoder", "decoder"):
        flat = traverse_util.flatten_dict(params[half])
        sds[half] = {openai_import.path_to_torch_name((half, *p)):
                     (np.asarray(v).transpose(3, 2, 0, 1) if v.ndim == 4 else np.asarray(v))
                     for p, v in flat.items()}
    assert "blocks.group_2.block_1.id_path.w" in sds["encoder"]
    assert sds["decoder"]["blocks.input.w"].shape == (8, 32, 1, 1)
    got_config, got = openai_import.convert(sds["encoder"], sds["decoder"], image_size=16)
    assert got_config == config
    jax.tree.map(np.testing.assert_array_equal, got, jax.tree.map(np.asarray, params))


def test_missing_golden_dependency_skips_locally_and_fails_in_ci(require, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="'no_such_package_x' is missing"):
        require("no_such_package_x")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="'no_such_package_x' is missing.*CI is set"):
        require("no_such_package_x")
    assert require("numpy") is np


def test_not_a_dvae_pickle(tmp_path, release):
    import torch  # installed: the release fixture requires it
    enc, dec, enc_pkl, dec_pkl = release
    linear = tmp_path / "linear.pkl"
    torch.save(torch.nn.Linear(3, 4), linear)
    with pytest.raises(openai_import.NotADVAEError,
                       match=r"encoder '.*linear.pkl'.*no tensor 'blocks.input.w'"):
        openai_import.convert(linear, dec_pkl)
    with pytest.raises(openai_import.NotADVAEError, match="expected a dall_e Decoder"):
        openai_import.convert(enc_pkl, enc_pkl)
    with pytest.raises(openai_import.NotADVAEError, match="expected a dall_e Encoder"):
        openai_import.convert(dec, dec)
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"definitely not a pickle")
    with pytest.raises(openai_import.NotADVAEError, match="not a readable torch pickle"):
        openai_import.convert(junk, dec_pkl)
    listing = tmp_path / "list.pkl"
    torch.save([1, 2, 3], listing)
    with pytest.raises(openai_import.NotADVAEError, match="builtins.list"):
        openai_import.convert(listing, dec_pkl)
    # A state dict with a wrong shape names the tensor.
    sd = {k: v.numpy().copy() for k, v in enc.state_dict().items()}
    sd["blocks.group_3.block_2.res_path.conv_2.w"] = np.zeros((64, 64, 1, 1), np.float32)
    with pytest.raises(openai_import.NotADVAEError,
                       match=r"blocks.group_3.block_2.res_path.conv_2.w: shape \(64, 64, 1, 1\), "
                             r"expected \(64, 64, 3, 3\)"):
        openai_import.convert(sd, dec)
    del sd["blocks.group_3.block_2.res_path.conv_2.w"]
    with pytest.raises(openai_import.NotADVAEError, match=r"missing: \['blocks.group_3"):
        openai_import.convert(sd, dec)
    with pytest.raises(FileNotFoundError):
        openai_import.convert(tmp_path / "missing.pkl", dec_pkl)


def test_save_load_and_cli(tmp_path, release, converted):
    _, _, enc_pkl, dec_pkl = release
    config, params = converted
    out = tmp_path / "ckpt"
    got = openai_import.main(enc_pkl, dec_pkl, str(out), image_size=IMAGE)
    assert got == config
    assert os.path.isfile(out / exports.META_FILE)
    loaded_config, loaded = exports.load_dvae(out)
    assert loaded_config == config
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(loaded))
    # Same architecture, other resolution / dtype: accepted, and the caller's config wins.
    other = dvae.DVAEConfig(**{**config.to_dict(), "image_size": 64, "dtype": "bfloat16"})
    assert exports.load_dvae(out, other)[0] == other
    # A differently sized dVAE is refused with the fields listed.
    wrong = dvae.DVAEConfig(**{**config.to_dict(), "n_hid": 128, "vocab_size": 8192})
    with pytest.raises(ValueError, match=r"n_hid: checkpoint 64 vs expected 128.*"
                                         r"vocab_size: checkpoint 512 vs expected 8192"):
        exports.load_dvae(out, wrong)
    tok = image_tokenizer.ImageTokenizer.load(str(out), config)
    assert tok.grid == 4
    with pytest.raises(FileExistsError, match="not empty"):
        openai_import.main(enc_pkl, dec_pkl, str(out))
    with pytest.raises(FileNotFoundError, match="not a dVAE parameter checkpoint"):
        exports.load_dvae(tmp_path / "nothing")


def test_load_params_with_sharding(tmp_path):
    config = dvae.DVAEConfig(image_size=8, group_count=2, n_hid=8, n_blk_per_group=1,
                             n_init=4, vocab_size=16)
    params = dvae.init_params(config, jax.random.key(3))
    exports.save_dvae(tmp_path / "c", config, params)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    _, loaded = exports.load_dvae(tmp_path / "c", config, sharding=replicated)
    leaf = jax.tree.leaves(loaded)[0]
    assert leaf.sharding == replicated
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    with pytest.raises(ValueError, match="structure"):
        exports.save_dvae(tmp_path / "d", config, {"encoder": params["encoder"]})
