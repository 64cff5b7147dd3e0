"""Inception-v3 as used for FID and the Inception Score, in Flax (NHWC, inference only).

The FID and IS numbers reported in papers come from one specific network: the Inception-v3
graph TensorFlow published on 2015-12-05, whose weights were later converted to PyTorch
(``pt_inception-2015-12-05-6726825d.pth``). That graph differs from the textbook
Inception-v3 (and from torchvision's ImageNet model) in a few places, and every one of
them changes the features, so `InceptionV3FID` reproduces them:

* 1008 output classes instead of 1000 (the label set of the 2015 graph, with a
  background class and unused entries), and no auxiliary classifier;
* average pools inside the mixed blocks ignore the zero padding (each border output is
  the mean of the pixels actually inside the image, not of a window partly filled with
  zeros); this applies to the pool branch of the 35×35 blocks (``Mixed_5*``), the 17×17
  blocks (``Mixed_6b``–``Mixed_6e``) and the first 8×8 block (``Mixed_7b``);
* the last 8×8 block (``Mixed_7c``) takes a *max* pool in its pool branch where the
  paper's architecture takes an average pool;
* every convolution has no bias and is followed by batch norm with ε = 0.001, then ReLU.

Outputs (a dict): ``pool`` (N, 2048), the global average of the last block, which FID,
KID and precision/recall use; ``logits`` (N, 1008) = ``pool @ W + b``; and
``logits_unbiased`` (N, 1008) = ``pool @ W``, the logits without the fc bias. The
Inception Score of the original TensorFlow code is computed from the unbiased logits
(it multiplies the pool features by the softmax layer's weight matrix only), and so is
torch-fidelity's, so `dalle_jax.evals.fid.inception_score` should be given
``logits_unbiased`` for numbers comparable to theirs.

Input handling (`preprocess`). Images are ``(N, H, W, 3)`` RGB, either uint8 in [0, 255]
or floating point in [0, 1] (multiplied by 255 internally). They are resized to 299×299
and mapped to [-1, 1]; three variants, which give measurably different FIDs, so a
statistics file records which one made it (`dalle_jax.evals.fid.save_stats`):

* ``"tf1x"`` (default): TensorFlow 1.x ``resize_bilinear`` without half-pixel centres,
  the resize of the original graph and the one torch-fidelity re-implements: output
  pixel ``i`` samples the input at ``i * in/out`` (computed in float32), interpolating
  between the two neighbouring pixels (the upper one clamped to the border); the result
  (on the 0–255 scale) is then normalised as ``(x - 128) / 128``. With this default the
  features agree with torch-fidelity's Inception feature extractor.
* ``"bilinear"``: the resize of pytorch-fid, PyTorch's ``interpolate(mode="bilinear",
  align_corners=False)`` without antialiasing: output pixel ``i`` samples the input at
  ``(i + 0.5) * in/out - 0.5`` (clamped at 0), on images scaled to [0, 1], followed by
  ``2 x - 1``.
* ``"clean"``: a resize in the manner of clean-fid: each channel, as a float32 image on the 0–255
  scale, is resized to 299×299 with PIL's bicubic filter (which antialiases when
  downsampling), clipped to [0, 255], then normalised as ``(x - 128) / 128``. PIL runs
  on the host, so this mode cannot be traced: `InceptionFn.host_preprocess` does it
  before the batch goes to the accelerator.

Weights: `load_inception` reads the pytorch-fid weights file from a local path (or the
``DALLE_JAX_INCEPTION_WEIGHTS`` environment variable) and never downloads anything;
`convert_pytorch_fid_weights` maps its state dict (the torch-fidelity file
``weights-inception-2015-12-05-6726825d.pth`` uses the same key names) onto this module.

Numerics: convolutions and the fc run at ``precision="highest"`` by default, so float32
matmuls are not silently computed in TF32/bf16 on accelerators; that would perturb the
features enough to move FID noticeably.

`extract_features` runs the network over a dataset in fixed-size batches, on one device
or split over all devices of a `jax.sharding.Mesh` (also across processes).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
BN_EPS = 1e-3
RESIZE_MODES = ("tf1x", "bilinear", "clean")
DEFAULT_RESIZE = "tf1x"

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/"
               "fid_weights/pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_ENV = "DALLE_JAX_INCEPTION_WEIGHTS"
# The name recorded in statistics files made with this network (see fid.save_stats).
EXTRACTOR_NAME = "inception-v3-fid-2015-12-05"

_EXPECTED = (f"the pytorch-fid Inception-v3 (FID variant) weights ({WEIGHTS_FILENAME}): "
             "a state dict of conv+BN blocks Conv2d_1a_3x3 ... Conv2d_4a_3x3, Mixed_5b ... "
             "Mixed_7c, and a 1008-way fc (fc.weight (1008, 2048), fc.bias (1008,)), "
             "without AuxLogits")


# --------------------------------------------------------------------------- network


class BasicConv(nn.Module):
    """Convolution without bias, batch norm (running statistics, ε = 0.001), ReLU.

    ``padding`` is ``(pad_h, pad_w)``, symmetric zero padding as in the torch graph.
    """

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: str | None = "highest"

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, strides=(self.stride, self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision,
                    name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_valid_only(x):
    """3×3, stride 1, padding 1 average pool that averages only the in-image pixels."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class BlockA(nn.Module):
    """35×35 block (``Mixed_5b``–``Mixed_5d``): 1×1, 5×5, double 3×3 and pool branches.

    FID variant: the pool branch averages without counting the padding.
    """

    pool_features: int
    precision: str | None = "highest"

    @nn.compact
    def __call__(self, x):
        c = functools.partial(BasicConv, precision=self.precision)
        b1 = c(64, (1, 1), name="branch1x1")(x)
        b5 = c(48, (1, 1), name="branch5x5_1")(x)
        b5 = c(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = c(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = c(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_valid_only(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class BlockB(nn.Module):
    """Grid reduction 35×35 → 17×17 (``Mixed_6a``): strided 3×3, double 3×3, max pool."""

    precision: str | None = "highest"

    @nn.compact
    def __call__(self, x):
        c = functools.partial(BasicConv, precision=self.precision)
        b3 = c(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = c(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = c(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class BlockC(nn.Module):
    """17×17 block (``Mixed_6b``–``Mixed_6e``) with factorised 7×7 convolutions.

    FID variant: the pool branch averages without counting the padding.
    """

    channels_7x7: int
    precision: str | None = "highest"

    @nn.compact
    def __call__(self, x):
        c = functools.partial(BasicConv, precision=self.precision)
        c7 = self.channels_7x7
        b1 = c(192, (1, 1), name="branch1x1")(x)
        b7 = c(c7, (1, 1), name="branch7x7_1")(x)
        b7 = c(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = c(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = c(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = c(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = c(192, (1, 1), name="branch_pool")(_avg_pool_valid_only(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class BlockD(nn.Module):
    """Grid reduction 17×17 → 8×8 (``Mixed_7a``)."""

    precision: str | None = "highest"

    @nn.compact
    def __call__(self, x):
        c = functools.partial(BasicConv, precision=self.precision)
        b3 = c(192, (1, 1), name="branch3x3_1")(x)
        b3 = c(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = c(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = c(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = c(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class BlockE(nn.Module):
    """8×8 block (``Mixed_7b``, ``Mixed_7c``) with split 1×3 / 3×1 branches.

    FID variant: ``pool="avg"`` (``Mixed_7b``) averages without counting the padding;
    ``pool="max"`` (``Mixed_7c``) takes a 3×3 max pool (padding never wins a max)
    instead of the average pool of the published architecture.
    """

    pool: str
    precision: str | None = "highest"

    @nn.compact
    def __call__(self, x):
        c = functools.partial(BasicConv, precision=self.precision)
        b1 = c(320, (1, 1), name="branch1x1")(x)
        b3 = c(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([c(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              c(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)],
                             axis=-1)
        bd = c(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = c(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([c(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              c(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)],
                             axis=-1)
        if self.pool == "avg":
            pooled = _avg_pool_valid_only(x)
        elif self.pool == "max":
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
        bp = c(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class _Logits(nn.Module):
    """The 2048 → 1008 fc, returning the logits with and without its bias."""

    precision: str | None = "highest"

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (POOL_DIM, NUM_CLASSES))
        bias = self.param("bias", nn.initializers.zeros, (NUM_CLASSES,))
        unbiased = jnp.dot(x, kernel, precision=self.precision)
        return unbiased, unbiased + jnp.expand_dims(bias, tuple(range(unbiased.ndim - 1)))


class InceptionV3FID(nn.Module):
    """The FID Inception-v3 on preprocessed images.

    Takes ``(N, 299, 299, 3)`` float images already in [-1, 1] (see `preprocess`) and
    returns ``{"pool": (N, 2048), "logits": (N, 1008), "logits_unbiased": (N, 1008)}``.
    Variables: ``params`` (conv kernels, BN scale/bias, fc) and ``batch_stats`` (BN
    running mean/var), named after the torch modules (``Mixed_6b/branch7x7_2/conv``).
    """

    precision: str | None = "highest"

    @nn.compact
    def __call__(self, x):
        p = self.precision
        c = functools.partial(BasicConv, precision=p)
        x = c(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)      # 149
        x = c(32, (3, 3), name="Conv2d_2a_3x3")(x)                # 147
        x = c(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)                                   # 73
        x = c(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = c(192, (3, 3), name="Conv2d_4a_3x3")(x)               # 71
        x = _max_pool_3x3_s2(x)                                   # 35
        x = BlockA(32, precision=p, name="Mixed_5b")(x)
        x = BlockA(64, precision=p, name="Mixed_5c")(x)
        x = BlockA(64, precision=p, name="Mixed_5d")(x)
        x = BlockB(precision=p, name="Mixed_6a")(x)               # 17
        x = BlockC(128, precision=p, name="Mixed_6b")(x)
        x = BlockC(160, precision=p, name="Mixed_6c")(x)
        x = BlockC(160, precision=p, name="Mixed_6d")(x)
        x = BlockC(192, precision=p, name="Mixed_6e")(x)
        x = BlockD(precision=p, name="Mixed_7a")(x)               # 8
        x = BlockE("avg", precision=p, name="Mixed_7b")(x)
        x = BlockE("max", precision=p, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        unbiased, logits = _Logits(precision=p, name="fc")(pool)
        return {"pool": pool, "logits": logits, "logits_unbiased": unbiased}


# --------------------------------------------------------------------------- input


def _check_resize(resize: str) -> str:
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    return resize


def _to_255(images):
    """uint8 → float32 as is; floats (taken to be in [0, 1]) → float32 × 255."""
    if images.dtype == jnp.uint8 or images.dtype == np.uint8:
        return images.astype(jnp.float32)
    return images.astype(jnp.float32) * 255.0


def _tf1x_taps(n_in: int, n_out: int):
    """Source indices and weights of TF 1.x bilinear resize (no half-pixel centres)."""
    src = np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)
    lo = src.astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - lo.astype(np.float32)).astype(np.float32)


def resize_tf1x(x, size: int = INPUT_SIZE):
    """TF 1.x ``resize_bilinear(align_corners=False)`` of ``(N, H, W, C)`` float images.

    Interpolates along the width first, then the height, each as
    ``a + (b - a) * frac`` in float32, the order TF's kernel uses.
    """
    n, h, w, ch = x.shape
    ylo, yhi, dy = _tf1x_taps(h, size)
    xlo, xhi, dx = _tf1x_taps(w, size)
    dx = jnp.asarray(dx)[None, None, :, None]
    dy = jnp.asarray(dy)[None, :, None, None]
    top, bottom = jnp.take(x, ylo, axis=1), jnp.take(x, yhi, axis=1)

    def along_w(rows):
        left, right = jnp.take(rows, xlo, axis=2), jnp.take(rows, xhi, axis=2)
        return left + (right - left) * dx

    t, b = along_w(top), along_w(bottom)
    return t + (b - t) * dy


def _torch_bilinear_taps(n_in: int, n_out: int):
    """Source indices and weights of torch bilinear resize with align_corners=False."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    lo = src.astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    w1 = (src - lo.astype(np.float32)).astype(np.float32)
    return lo, hi, (np.float32(1.0) - w1).astype(np.float32), w1


def resize_bilinear(x, size: int = INPUT_SIZE):
    """PyTorch ``interpolate(mode="bilinear", align_corners=False)`` (no antialias) of
    ``(N, H, W, C)`` float images. (``jax.image.resize`` antialiases when downsampling,
    which is not what pytorch-fid does.)"""
    n, h, w, ch = x.shape
    ylo, yhi, y0, y1 = _torch_bilinear_taps(h, size)
    xlo, xhi, x0, x1 = _torch_bilinear_taps(w, size)
    x0, x1 = jnp.asarray(x0)[None, None, :, None], jnp.asarray(x1)[None, None, :, None]
    y0, y1 = jnp.asarray(y0)[None, :, None, None], jnp.asarray(y1)[None, :, None, None]

    def along_w(rows):
        return x0 * jnp.take(rows, xlo, axis=2) + x1 * jnp.take(rows, xhi, axis=2)

    return (y0 * along_w(jnp.take(x, ylo, axis=1))
            + y1 * along_w(jnp.take(x, yhi, axis=1)))


def resize_clean(images, size: int = INPUT_SIZE) -> np.ndarray:
    """clean-fid's resize on the host: each channel as a float32 PIL image (0–255 scale),
    bicubic to ``size``×``size``, clipped to [0, 255]. Returns float32 ``(N, size, size, 3)``
    on the 0–255 scale."""
    from PIL import Image

    x = np.asarray(images)
    x = x.astype(np.float32) if x.dtype == np.uint8 else x.astype(np.float32) * 255.0
    if x.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) images, got shape {x.shape}")
    out = np.empty((x.shape[0], size, size, x.shape[3]), np.float32)
    for i in range(x.shape[0]):
        for ch in range(x.shape[3]):
            img = Image.fromarray(np.ascontiguousarray(x[i, :, :, ch]))  # mode "F"
            img = img.resize((size, size), resample=Image.Resampling.BICUBIC)
            out[i, :, :, ch] = np.asarray(img, dtype=np.float32)
    return np.clip(out, 0.0, 255.0)


def preprocess(images, resize: str = DEFAULT_RESIZE):
    """Images ``(N, H, W, 3)`` (uint8, or floats in [0, 1]) → ``(N, 299, 299, 3)`` float32
    in [-1, 1] as the chosen ``resize`` mode prescribes (see the module docstring).

    ``"tf1x"`` and ``"bilinear"`` are traceable (jnp); ``"clean"`` runs PIL on the host
    and so needs concrete arrays.
    """
    _check_resize(resize)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) RGB images, got shape {images.shape}")
    if resize == "clean":
        return jnp.asarray((resize_clean(images) - 128.0) / 128.0)
    x = _to_255(jnp.asarray(images))
    if resize == "tf1x":
        return (resize_tf1x(x) - 128.0) / 128.0
    return 2.0 * resize_bilinear(x / 255.0) - 1.0


@dataclasses.dataclass(frozen=True)
class InceptionFn:
    """``apply_fn(variables, images) -> features dict`` for `InceptionV3FID`, with the input
    handling of one ``resize`` mode.

    Split in two so the host-only part of the ``"clean"`` mode stays out of jit:
    `host_preprocess` (numpy, before the batch goes to the device; resizes for "clean",
    passes the images through otherwise) and `device_fn` (traceable: resizes for "tf1x" /
    "bilinear", normalises, runs the network). `extract_features` uses both; calling the
    object runs them in turn.
    """

    resize: str = DEFAULT_RESIZE
    precision: str | None = "highest"

    def __post_init__(self):
        _check_resize(self.resize)

    def host_preprocess(self, images) -> np.ndarray:
        if self.resize == "clean":
            return resize_clean(images)
        return np.asarray(images)

    def device_fn(self, variables, images):
        if self.resize == "clean":
            if images.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
                raise ValueError("resize='clean' expects images already resized on the host "
                                 "(InceptionFn.host_preprocess); got shape "
                                 f"{images.shape}")
            x = (images.astype(jnp.float32) - 128.0) / 128.0
        else:
            x = preprocess(images, self.resize)
        return InceptionV3FID(precision=self.precision).apply(variables, x)

    def __call__(self, variables, images):
        return self.device_fn(variables, self.host_preprocess(images))


# --------------------------------------------------------------------------- variables


@functools.lru_cache(maxsize=None)
def _abstract_variables():
    model = InceptionV3FID()
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape)))


def _flat(tree) -> dict[tuple[str, ...], Any]:
    from flax import traverse_util
    from flax.core import unfreeze

    return traverse_util.flatten_dict(unfreeze(tree))


def _unflat(flat):
    from flax import traverse_util

    return traverse_util.unflatten_dict(flat)


_LEAF_TO_TORCH = {("params", "kernel"): "weight", ("params", "scale"): "weight",
                  ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
                  ("batch_stats", "var"): "running_var"}


def _torch_key(path: tuple[str, ...]) -> str:
    return ".".join(path[1:-1] + (_LEAF_TO_TORCH[(path[0], path[-1])],))


def _to_torch_layout(path, shape):
    """The torch shape of a Flax leaf and the transpose from torch to Flax."""
    if path[-1] == "kernel" and len(shape) == 4:       # (kh, kw, in, out) ← (out, in, kh, kw)
        return (shape[3], shape[2], shape[0], shape[1]), (2, 3, 1, 0)
    if path[-1] == "kernel" and len(shape) == 2:       # (in, out) ← (out, in)
        return (shape[1], shape[0]), (1, 0)
    return tuple(shape), None


@functools.lru_cache(maxsize=None)
def _key_table() -> dict[str, tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...] | None]]:
    out = {}
    for path, leaf in _flat(_abstract_variables()).items():
        out[_torch_key(path)] = (path, *_to_torch_layout(path, leaf.shape))
    return out


def key_map() -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """torch state-dict key → (Flax variable path, torch shape), for every variable."""
    return {k: (path, shape) for k, (path, shape, _) in _key_table().items()}


def variables_from_state_dict(state_dict: dict[str, Any], *, source: str = "state dict"
                              ) -> dict[str, Any]:
    """Maps a pytorch-fid-layout state dict (values: torch tensors or arrays) onto the
    Flax variables of `InceptionV3FID` (float32 numpy arrays).

    Every variable must be present with its exact shape and every key used, except the
    BN ``num_batches_tracked`` counters; otherwise ValueError names what was expected,
    the missing and unexpected keys and the shape mismatches.
    """
    if not isinstance(state_dict, dict):
        raise ValueError(f"{source}: expected {_EXPECTED}; got a {type(state_dict).__name__}, "
                         "not a state dict")
    arrays = {}
    for k, v in state_dict.items():
        if str(k).endswith("num_batches_tracked"):
            continue
        if hasattr(v, "detach"):
            v = v.detach().cpu()
            if hasattr(v, "float") and v.is_floating_point():
                v = v.float()
            v = v.numpy()
        arrays[str(k)] = np.asarray(v)
    expected = key_map()
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    wrong = [f"{k} {tuple(arrays[k].shape)} (expected {expected[k][1]})"
             for k in sorted(set(expected) & set(arrays))
             if tuple(arrays[k].shape) != expected[k][1]]
    if missing or unexpected or wrong:
        def few(items):
            shown = ", ".join(items[:8])
            return f"{shown}, ... ({len(items)} in all)" if len(items) > 8 else shown
        parts = [f"{source}: expected {_EXPECTED}"]
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if wrong:
            parts.append(f"wrong shapes: {few(wrong)}")
        if any(k.startswith("AuxLogits.") for k in unexpected) or any(
                k.startswith("fc.weight (1000") for k in wrong):
            parts.append("this looks like torchvision's ImageNet inception_v3 (auxiliary "
                         "classifier, 1000 classes), a different network whose features give "
                         "FIDs not comparable to published ones")
        raise ValueError("; ".join(parts))
    flat = {}
    for key, (path, _, perm) in _key_table().items():
        a = arrays[key].astype(np.float32)
        flat[path] = np.ascontiguousarray(a.transpose(perm) if perm else a)
    return _unflat(flat)


def convert_pytorch_fid_weights(path: str | os.PathLike) -> dict[str, Any]:
    """Reads the pytorch-fid weights file (``pt_inception-2015-12-05-6726825d.pth``, a torch
    state dict; torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` has the same
    keys) from a local path and returns the `InceptionV3FID` variables.

    torch is imported here only (ImportError with an explanation when it is missing); the
    file is read with ``weights_only=True`` (tensors only, no code). Raises ValueError on a
    file of another network (see `variables_from_state_dict`).
    """
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading the pytorch-fid Inception weights (.pth) needs torch "
                          "(CPU build is enough): pip install torch") from e
    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    return variables_from_state_dict(state, source=os.fspath(path))


def weights_path(path: str | os.PathLike | None = None) -> str:
    """The weights file to read: ``path``, else ``$DALLE_JAX_INCEPTION_WEIGHTS``; raises
    FileNotFoundError (naming the file, where it was looked for, where to get it) when
    neither names an existing file. Nothing is downloaded."""
    where = []
    if path is not None:
        where.append(f"the given path {os.fspath(path)!r}")
        candidate = os.fspath(path)
    else:
        env = os.environ.get(WEIGHTS_ENV)
        where.append(f"${WEIGHTS_ENV}" + (f" = {env!r}" if env else " (not set)"))
        candidate = env
    if candidate and os.path.isfile(candidate):
        return candidate
    raise FileNotFoundError(
        f"the FID Inception weights {WEIGHTS_FILENAME} were not found: looked for "
        f"{' and '.join(where)}. Download the file once from {WEIGHTS_URL} "
        f"(the pytorch-fid release) and pass its path or set {WEIGHTS_ENV} to it; "
        "nothing is downloaded automatically.")


def load_inception(path: str | os.PathLike | None = None, *, resize: str = DEFAULT_RESIZE,
                   precision: str | None = "highest") -> tuple[InceptionFn, dict[str, Any]]:
    """``(apply_fn, variables)`` for the FID Inception from a local weights file.

    ``path``: the ``.pth`` file; None reads ``$DALLE_JAX_INCEPTION_WEIGHTS``. ``apply_fn``
    is an `InceptionFn` for ``resize`` (``apply_fn(variables, images)``: uint8 or [0, 1]
    float ``(N, H, W, 3)`` images → ``{"pool", "logits", "logits_unbiased"}``).
    """
    variables = convert_pytorch_fid_weights(weights_path(path))
    return InceptionFn(resize=resize, precision=precision), variables


def random_variables(rng: jax.Array | int, *, conv_gain: float = 1.8) -> dict[str, Any]:
    """Random variables of the `InceptionV3FID` structure (for tests), float32 numpy.

    ``rng``: a JAX key or an int seed (drawn with numpy: one generator for all 472
    arrays). Kernels are normal with variance ``conv_gain / fan_in`` (1.8 keeps the
    activations of random images O(1) through the 94 conv layers); BN scale in
    [0.5, 1.5], bias and running mean ~ N(0, 0.1²), running variance in [0.5, 1.5]
    (positive); the fc is N(0, 1 / 2048) with bias ~ N(0, 0.1²).
    """
    if not isinstance(rng, (int, np.integer)):
        rng = int(jax.random.randint(rng, (), 0, 2**31 - 1))
    gen = np.random.default_rng(int(rng))
    out = {}
    for path, leaf in sorted(_flat(_abstract_variables()).items()):
        shape, name = leaf.shape, path[-1]
        if name == "kernel":
            fan_in = math.prod(shape[:-1])
            gain = conv_gain if len(shape) == 4 else 1.0
            v = gen.standard_normal(shape) * math.sqrt(gain / fan_in)
        elif name in ("scale", "var"):
            v = gen.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            v = 0.1 * gen.standard_normal(shape)
        out[path] = np.asarray(v, np.float32)
    return _unflat(out)


# --------------------------------------------------------------------------- extraction


def _batches(images, batch_size: int) -> Iterator[np.ndarray]:
    """Rows of an array, or of an iterable of arrays, re-cut into ``batch_size`` chunks
    (the last may be shorter)."""
    if isinstance(images, (np.ndarray, jax.Array)):
        for i in range(0, images.shape[0], batch_size):
            yield np.asarray(images[i:i + batch_size])
        return
    pending: list[np.ndarray] = []
    count = 0
    for item in images:
        item = np.asarray(item)
        if item.ndim == 3:
            item = item[None]
        pending.append(item)
        count += item.shape[0]
        while count >= batch_size:
            joined = np.concatenate(pending)
            yield joined[:batch_size]
            rest = joined[batch_size:]
            pending, count = ([rest] if rest.shape[0] else []), rest.shape[0]
    if count:
        yield np.concatenate(pending)


def _pad(batch: np.ndarray, rows: int) -> np.ndarray:
    if batch.shape[0] == rows:
        return batch
    pad = np.zeros((rows - batch.shape[0],) + batch.shape[1:], batch.dtype)
    return np.concatenate([batch, pad])


@functools.lru_cache(maxsize=16)
def _jit(fn, shardings=None):
    """One jitted function per (function, shardings), so repeated extractions with the
    same `InceptionFn` (equal dataclasses, equal bound methods) reuse the compiled program."""
    if shardings is None:
        return jax.jit(fn)
    in_shardings, out_sharding = shardings
    return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_sharding)


def _progress(total: int | None, desc: str):
    from dalle_jax import logs

    return logs.progress(total, desc, enabled=hasattr(sys.stderr, "isatty")
                         and sys.stderr.isatty())


def _process_row_ranges(sharding, global_rows: int, nproc: int) -> list[tuple[int, int]]:
    """The [start, stop) rows of the global batch that each process's devices hold."""
    ranges: list[list[int]] = [[global_rows, 0] for _ in range(nproc)]
    for device, index in sharding.devices_indices_map((global_rows,)).items():
        sl = index[0]
        start = 0 if sl.start is None else sl.start
        stop = global_rows if sl.stop is None else sl.stop
        r = ranges[device.process_index]
        r[0], r[1] = min(r[0], start), max(r[1], stop)
    for p, (start, stop) in enumerate(ranges):
        per = global_rows // nproc
        if stop - start != per:
            raise ValueError(f"process {p}'s devices do not hold one contiguous block of the "
                             "batch; order the mesh's devices by process")
    return [tuple(r) for r in ranges]


def extract_features(apply_fn: Callable, variables: Any, images: np.ndarray | Iterable,
                     batch_size: int, mesh: jax.sharding.Mesh | None = None, *,
                     desc: str = "inception") -> Any:
    """Runs ``apply_fn(variables, batch)`` over ``images`` in batches of ``batch_size`` rows.

    Args:
      apply_fn: e.g. the `InceptionFn` of `load_inception`; any ``(variables, batch) ->
        pytree of (rows, ...) arrays`` works. If it has ``host_preprocess`` /
        ``device_fn`` (as `InceptionFn` does), the first runs on the host before each
        batch is sent and only the second is compiled.
      images: an ``(N, H, W, C)`` array, or an iterable of such arrays (any sizes; they
        are re-cut into batches).
      batch_size: rows per step on this process. The last batch is padded with zeros (and
        the padding dropped) so one program, compiled once, serves every step. With a
        mesh it is rounded up to a multiple of this process's devices in the mesh.
      mesh: None runs on the default device. With a mesh, the batch is split over all its
        devices (the variables are replicated). Several processes (multi-host) each pass
        their own rows and all get every process's features back; every process must
        call this function (the processes keep stepping together until all are out of
        rows, so their row counts may differ).

    Returns:
      The pytree of ``apply_fn``'s outputs as numpy arrays, with the rows of all
      processes in process order (process 0's rows, then process 1's, ...); in a single
      process, the rows of ``images`` in order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    host_fn = getattr(apply_fn, "host_preprocess", None) or np.asarray
    device_fn = getattr(apply_fn, "device_fn", apply_fn)
    total = images.shape[0] if isinstance(images, (np.ndarray, jax.Array)) else None
    nproc = jax.process_count() if mesh is not None else 1

    if mesh is None:
        fn = _jit(device_fn)
        variables = jax.device_put(variables)
        put = jnp.asarray
        ranges = [(0, batch_size)]
    else:
        from jax.sharding import NamedSharding, PartitionSpec as P

        me = jax.process_index()
        n_local = sum(1 for d in mesh.devices.flat if d.process_index == me)
        batch_size = -(-batch_size // n_local) * n_local
        replicated = NamedSharding(mesh, P())
        batch_sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
        variables = jax.tree.map(
            lambda a: jax.make_array_from_process_local_data(replicated, np.asarray(a)),
            variables)
        fn = _jit(device_fn, ((replicated, batch_sharding), batch_sharding))
        ranges = _process_row_ranges(batch_sharding, batch_size * nproc, nproc)

        def put(batch):
            return jax.make_array_from_process_local_data(batch_sharding, batch)

    def gather(tree):
        if nproc == 1:
            return jax.tree.map(np.asarray, tree)
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)

    parts: list[list[Any]] = [[] for _ in range(nproc)]
    source = _batches(images, batch_size)
    template: np.ndarray | None = None
    bar = _progress(total, desc)
    try:
        for step in itertools.count():
            batch = next(source, None)
            if batch is not None:
                batch = host_fn(batch)
                template = batch
            n = 0 if batch is None else batch.shape[0]
            if nproc > 1:
                from jax.experimental import multihost_utils

                counts = np.asarray(multihost_utils.process_allgather(np.int32(n)))
                counts = counts.reshape(nproc)
                if counts.sum() == 0:
                    break
                if step == 0 and (counts == 0).any():
                    # Raised on every process alike (they all see the counts), so none is
                    # left waiting in a collective.
                    raise ValueError(
                        f"processes {np.flatnonzero(counts == 0).tolist()} have no rows; in a "
                        "multi-process extraction every process needs at least one (it takes "
                        "the batch shape from its own first rows)")
                if batch is None:
                    batch = np.zeros((0,) + template.shape[1:], template.dtype)
            else:
                if batch is None:
                    break
                counts = np.array([n])
            out = gather(fn(variables, put(_pad(batch, batch_size))))
            for p, (start, _) in enumerate(ranges):
                if counts[p]:
                    parts[p].append(jax.tree.map(lambda a: a[start:start + counts[p]], out))
            bar.update(n)
    finally:
        bar.close()
    chunks = [c for proc in parts for c in proc]
    if not chunks:
        raise ValueError("no images to extract features from")
    return jax.tree.map(lambda *xs: np.concatenate(xs), *chunks)
