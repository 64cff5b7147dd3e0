"""Tests of the FID Inception-v3 (dalle_jax.evals.inception).

The reference is torch-fidelity's standalone Inception module (the TensorFlow 2015-12-05
graph ported to torch; it needs torch only, not torchvision). It is built with random
weights (its constructor's weight loading is bypassed), its state dict is saved as a
``.pth`` in the pytorch-fid key layout, converted, and the features compared in float32.
torch-fidelity's package ``__init__`` imports torchvision, which this environment lacks,
so the module file is loaded on its own when the package import fails.
"""

import importlib
import importlib.util
import os
import subprocess
import sys
import textwrap
import types
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.evals import inception as inc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONV_GAIN = 1.8  # as inception.random_variables: O(1) activations on random images


def load_torch_fidelity(submodule: str, stub_utils: bool = False):
    """A module of torch-fidelity (``torch_fidelity.<submodule>``), imported without the
    package ``__init__`` if that fails (it imports torchvision). ``stub_utils``: replace
    ``torch_fidelity.utils`` (torchvision, data loading) by placeholders, for the metric
    modules whose formulas do not use it. Skips the test when torch-fidelity is absent."""
    pytest.importorskip("torch")
    name = f"torch_fidelity.{submodule}"
    if not stub_utils:
        try:
            return importlib.import_module(name)
        except ImportError:
            pass
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torch-fidelity is not installed (make setup-test installs it)")
    pkg_dir = list(spec.submodule_search_locations)[0]
    saved = {k: v for k, v in sys.modules.items()
             if k == "torch_fidelity" or k.startswith("torch_fidelity.")}
    for k in saved:
        del sys.modules[k]
    stub = types.ModuleType("torch_fidelity")
    stub.__path__ = [pkg_dir]  # a package whose __init__ does not run
    sys.modules["torch_fidelity"] = stub
    if stub_utils:
        utils = types.ModuleType("torch_fidelity.utils")
        utils.__getattr__ = lambda attr: None
        sys.modules["torch_fidelity.utils"] = utils
    try:
        file_spec = importlib.util.spec_from_file_location(
            name, os.path.join(pkg_dir, submodule + ".py"))
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[name] = module
        file_spec.loader.exec_module(module)
        return module
    finally:
        for k in [k for k in sys.modules
                  if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
            del sys.modules[k]
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def tfi():
    return load_torch_fidelity("feature_extractor_inceptionv3")


@pytest.fixture(scope="module")
def torch_release(tfi, tmp_path_factory):
    """torch-fidelity's Inception with random weights and BN statistics, and its state
    dict saved to a .pth; returns (module, path)."""
    import torch

    d = tmp_path_factory.mktemp("inception")
    empty = d / "empty.pth"
    torch.save({}, empty)
    cls = tfi.FeatureExtractorInceptionV3
    # The constructor loads weights from a URL, or from a path with a strict
    # load_state_dict; skip that load and randomise the freshly built module instead.
    with mock.patch.object(cls, "load_state_dict", lambda self, *a, **k: None):
        model = cls("inception-v3-compat", ["2048", "logits_unbiased", "logits"],
                    feature_extractor_weights_path=str(empty))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("conv.weight"):
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=gen) * (CONV_GAIN / fan_in) ** 0.5)
            elif name == "fc.weight":
                t.copy_(torch.randn(t.shape, generator=gen) / t.shape[1] ** 0.5)
            elif name.endswith(("bn.weight", "running_var")):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
            else:  # bn.bias, running_mean, fc.bias
                t.copy_(0.1 * torch.randn(t.shape, generator=gen))
    model.eval()
    path = d / inc.WEIGHTS_FILENAME
    torch.save(model.state_dict(), path)
    return model, str(path)


def _images(n, h, w, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, h, w, 3)).astype(np.uint8)


def _torch_features(model, images):
    import torch

    with torch.no_grad():
        pool, unbiased, logits = model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    return {"pool": pool.numpy(), "logits_unbiased": unbiased.numpy(), "logits": logits.numpy()}


def test_key_layout_matches_torch_fidelity(torch_release):
    model, _ = torch_release
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()
              if not k.endswith("num_batches_tracked")}
    ours = {k: shape for k, (_, shape) in inc.key_map().items()}
    assert theirs == ours
    assert len(ours) == 472 and ours["fc.weight"] == (1008, 2048)


def test_features_match_torch_fidelity(torch_release):
    """Pool features and both logits on 64×64 uint8 images (so the TF1.x resize inside
    is exercised), through load_inception and extract_features. (Two images: the
    network costs about 6 GFLOP per image on the CPU.)"""
    model, path = torch_release
    images = _images(2, 64, 64)
    ref = _torch_features(model, images)
    apply_fn, variables = inc.load_inception(path)
    assert apply_fn.resize == "tf1x"
    ours = inc.extract_features(apply_fn, variables, images, batch_size=2)
    assert set(ours) == {"pool", "logits", "logits_unbiased"}
    report = []
    for name in ("pool", "logits_unbiased", "logits"):
        a, b = ours[name], ref[name]
        assert a.shape == b.shape and a.dtype == np.float32
        scale = float(np.abs(b).max())
        assert 0.05 < scale < 50, (name, scale)  # the random weights keep it O(1)
        err = np.abs(a - b)
        big = np.abs(b) > 0.1 * scale
        rel = (err[big] / np.abs(b[big])).max()
        report.append(f"{name}: max|ref| {scale:.3g}, max abs diff {err.max():.2e}, "
                      f"max rel diff where |ref| > 10% of max {rel:.2e}")
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale, err_msg=name)
    print("\n" + "\n".join(report))
    np.testing.assert_allclose(ours["logits"] - ours["logits_unbiased"],
                               np.broadcast_to(variables["params"]["fc"]["bias"], (2, 1008)),
                               atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 64), (299, 299), (37, 512), (1000, 300)])
def test_tf1x_resize_matches_torch_fidelity(tfi, shape):
    import torch

    images = _images(2, *shape, seed=1)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    ref = tfi.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    ref = ((ref - 128) / 128).permute(0, 2, 3, 1).numpy()
    ours = np.asarray(jax.jit(inc.preprocess)(images))
    assert ours.shape == (2, 299, 299, 3)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    if shape == (299, 299):
        np.testing.assert_array_equal(ours, (images.astype(np.float32) - 128) / 128)
    # floats in [0, 1] are the same images
    np.testing.assert_allclose(np.asarray(inc.preprocess(images / np.float32(255))), ours,
                               atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 64), (299, 299), (37, 512), (1000, 300)])
def test_bilinear_resize_matches_torch_interpolate(shape):
    torch = pytest.importorskip("torch")
    images = _images(2, *shape, seed=2)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    ref = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear",
                                          align_corners=False)
    ref = (2 * ref - 1).permute(0, 2, 3, 1).numpy()
    ours = np.asarray(inc.preprocess(images, resize="bilinear"))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_clean_resize():
    from PIL import Image

    # 299×299 input: PIL leaves it unchanged.
    images = _images(2, 299, 299, seed=3)
    np.testing.assert_array_equal(inc.resize_clean(images), images.astype(np.float32))
    # A constant image stays constant (bicubic weights sum to 1) and within [0, 255].
    const = np.full((1, 50, 70, 3), 255, np.uint8)
    np.testing.assert_allclose(inc.resize_clean(const), 255.0, atol=1e-3)
    # On a smooth image (no overshoot, so no clipping between PIL's two passes), PIL's
    # float path agrees with its own 8-bit path to within the 8-bit rounding (of the
    # result and of the intermediate between the two passes).
    yy, xx = np.mgrid[0:64, 0:80]
    smooth = np.stack([128 + 60 * np.sin(yy / 9.0 + c) * np.cos(xx / 13.0) for c in range(3)],
                      axis=-1)[None].round().astype(np.uint8)
    ours = inc.resize_clean(smooth)
    for ch in range(3):
        eight_bit = np.asarray(Image.fromarray(smooth[0, :, :, ch]).resize(
            (299, 299), resample=Image.Resampling.BICUBIC), np.float32)
        diff = np.abs(ours[0, :, :, ch] - eight_bit)
        assert diff.max() <= 1.5 and diff.mean() < 0.5
    # On noise, bicubic overshoots and the result is clipped to [0, 255].
    small = _images(1, 64, 80, seed=4)
    ours = inc.resize_clean(small)
    assert ours.min() == 0 and ours.max() == 255
    # Through InceptionFn: the host does the resize, the device only normalises.
    fn = inc.InceptionFn(resize="clean")
    host = fn.host_preprocess(small)
    np.testing.assert_array_equal(host, ours)
    np.testing.assert_allclose(np.asarray(inc.preprocess(small, "clean")), (ours - 128) / 128,
                               atol=1e-6)
    with pytest.raises(ValueError, match="resize must be one of"):
        inc.InceptionFn(resize="bicubic")


def _save(obj, path):
    import torch

    torch.save(obj, path)
    return str(path)


def test_wrong_network_is_refused(torch_release, tmp_path):
    import torch

    model, _ = torch_release
    sd = dict(model.state_dict())
    # torchvision's ImageNet inception_v3: 1000 classes and an auxiliary classifier.
    tv = dict(sd)
    tv["fc.weight"], tv["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    tv["AuxLogits.conv0.conv.weight"] = torch.zeros(128, 768, 1, 1)
    tv["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    with pytest.raises(ValueError) as e:
        inc.convert_pytorch_fid_weights(_save(tv, tmp_path / "tv.pth"))
    msg = str(e.value)
    assert "expected the pytorch-fid Inception-v3 (FID variant) weights" in msg
    assert "1008-way fc" in msg and "Mixed_7c" in msg
    assert "unexpected keys: AuxLogits.conv0.conv.weight, AuxLogits.fc.weight" in msg
    assert "fc.weight (1000, 2048) (expected (1008, 2048))" in msg
    assert "torchvision" in msg
    # Some other network altogether.
    with pytest.raises(ValueError, match=r"missing keys: .*\(472 in all\); unexpected keys: "
                                         r"layer\.weight"):
        inc.convert_pytorch_fid_weights(
            _save({"layer.weight": torch.zeros(3, 3)}, tmp_path / "other.pth"))
    # One block's weights missing.
    partial = {k: v for k, v in sd.items() if not k.startswith("Mixed_7c.branch_pool")}
    with pytest.raises(ValueError, match=r"missing keys: Mixed_7c\.branch_pool\.bn\.bias"):
        inc.convert_pytorch_fid_weights(_save(partial, tmp_path / "partial.pth"))
    # Not a state dict.
    with pytest.raises(ValueError, match="not a state dict"):
        inc.convert_pytorch_fid_weights(_save(torch.zeros(3), tmp_path / "tensor.pth"))


def test_converted_layout(torch_release):
    model, path = torch_release
    variables = inc.convert_pytorch_fid_weights(path)
    sd = model.state_dict()
    w = sd["Mixed_6b.branch7x7_2.conv.weight"].numpy()  # (out, in, 1, 7)
    np.testing.assert_array_equal(
        variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"], w.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], sd["fc.weight"].numpy().T)
    np.testing.assert_array_equal(variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                  sd["Mixed_7c.branch_pool.bn.running_var"].numpy())
    shapes = jax.tree.map(lambda a: a.shape, inc._abstract_variables())
    assert jax.tree.map(np.shape, variables) == shapes


def test_missing_weights_message(monkeypatch, tmp_path):
    monkeypatch.delenv(inc.WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as e:
        inc.load_inception()
    msg = str(e.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in msg
    assert "DALLE_JAX_INCEPTION_WEIGHTS (not set)" in msg
    assert ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
            "pt_inception-2015-12-05-6726825d.pth") in msg
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        inc.load_inception(missing)
    monkeypatch.setenv(inc.WEIGHTS_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=r"DALLE_JAX_INCEPTION_WEIGHTS = '.*nowhere"):
        inc.load_inception()


def test_random_variables():
    v = inc.random_variables(jax.random.PRNGKey(0))
    assert jax.tree.map(np.shape, v) == jax.tree.map(lambda a: a.shape, inc._abstract_variables())
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(v))
    variances = [bn["var"] for _, bn in _bn_stats(v["batch_stats"])]
    assert len(variances) == 94 and min(float(x.min()) for x in variances) >= 0.5
    w = inc.random_variables(0)
    assert jax.tree.map(np.shape, w) == jax.tree.map(np.shape, v)


def _bn_stats(tree, prefix=""):
    for k, sub in tree.items():
        if "var" in sub:
            yield prefix + k, sub
        else:
            yield from _bn_stats(sub, prefix + k + "/")


# --------------------------------------------------------------------------- extraction


def _toy_apply(variables, images):
    """A cheap stand-in network: per-image mean and a linear map of the flattened image."""
    x = images.astype(jnp.float32).reshape(images.shape[0], -1) / 255
    return {"mean": x.mean(axis=1), "proj": x @ variables["w"]}


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture
def toy():
    rng = np.random.RandomState(5)
    images = rng.randint(0, 256, (11, 4, 4, 3)).astype(np.uint8)
    variables = {"w": rng.standard_normal((48, 5)).astype(np.float32)}
    return images, variables, jax.tree.map(np.asarray, _toy_apply(variables, images))


def test_extract_features_array_and_iterable(toy):
    images, variables, ref = toy
    traces = []

    def apply(v, x):
        traces.append(x.shape)
        return _toy_apply(v, x)

    out = inc.extract_features(apply, variables, images, batch_size=4)
    assert traces == [(4, 4, 4, 3)]  # one compile; the last batch (3 rows) is padded
    jax.tree.map(_close, out, ref)
    chunks = (images[i:j] for i, j in [(0, 1), (1, 6), (6, 7), (7, 11)])
    out = inc.extract_features(_toy_apply, variables, chunks, batch_size=4)
    jax.tree.map(_close, out, ref)
    with pytest.raises(ValueError, match="no images"):
        inc.extract_features(_toy_apply, variables, iter(()), batch_size=4)


def test_extract_features_host_preprocess(toy):
    """An apply_fn with host_preprocess / device_fn (as InceptionFn): the host part runs
    on each batch before it is sent, only device_fn is compiled."""
    images, variables, ref = toy

    class Split:
        def host_preprocess(self, batch):
            assert isinstance(batch, np.ndarray)
            return batch[:, :, :, ::-1].astype(np.float32)  # BGR on the host

        def device_fn(self, v, x):
            return _toy_apply(v, x[:, :, :, ::-1])

    out = inc.extract_features(Split(), variables, images, batch_size=4)
    jax.tree.map(_close, out, ref)


def test_extract_features_mesh(toy):
    images, variables, ref = toy
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    # batch_size 5 is rounded up to 8 (the mesh's devices); 11 rows: 2 steps, padded.
    out = inc.extract_features(_toy_apply, variables, images, batch_size=5, mesh=mesh)
    jax.tree.map(_close, out, ref)
    assert out["proj"].shape == (11, 5)


_MULTIPROCESS = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
    sys.path.insert(0, sys.argv[3])
    from dalle_jax.evals import inception as inc

    def apply(v, x):
        x = x.astype(np.float32).reshape(x.shape[0], -1)
        return {"proj": x @ v["w"]}

    rng = np.random.RandomState(0)
    w = {"w": rng.standard_normal((12, 3)).astype(np.float32)}
    data = [rng.randint(0, 256, (n, 2, 2, 3)).astype(np.uint8) for n in (5, 2)]
    me = jax.process_index()
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    out = inc.extract_features(apply, w, data[me], batch_size=2, mesh=mesh)
    ref = np.concatenate([d.reshape(d.shape[0], -1).astype(np.float32) @ w["w"] for d in data])
    np.testing.assert_allclose(out["proj"], ref, rtol=1e-5)
    print("OK", me, out["proj"].shape)
""")


@pytest.mark.slow
def test_extract_features_two_processes(tmp_path):
    """Two processes (2 CPU devices each) with 5 and 2 rows: both get all 7, in order."""
    import socket

    script = tmp_path / "extract.py"
    script.write_text(_MULTIPROCESS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i), ROOT],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for i, (p, o) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, o
        assert f"OK {i} (7, 3)" in o, o
