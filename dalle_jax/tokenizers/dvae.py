"""The discrete VAE (stage 1 of DALL·E, paper §2.1 and App. A): the model.

This module owns:

* `DVAEConfig`, the architecture hyper-parameters;
* the Flax Linen encoder and decoder, built layer for layer like OpenAI's released
  ``dall_e`` package (NHWC instead of NCHW; same parameter names, see below);
* parameter initialisation and abstract shapes;
* the pixel map between images and the model's input/output space.

Its training objective (Gumbel-softmax relaxation, KL, likelihoods) is
`dalle_jax.tokenizers.dvae_objective`; image <-> token grid (`encode` / `decode`,
`ImageTokenizer`) is `dalle_jax.tokenizers.image_tokenizer`; parameter exports are
`dalle_jax.exports`.

Parameter tree (the ``params`` collection, without the ``{"params": ...}`` wrapper)::

    encoder/input/{kernel,bias}                         7x7, C -> n_hid
    encoder/group_<g>/block_<i>/id_path/{kernel,bias}   1x1, only where width changes
    encoder/group_<g>/block_<i>/res_path/conv_<j>/...   j = 1..4
    encoder/output/conv/{kernel,bias}                   1x1, -> vocab logits
    decoder/input/{kernel,bias}                         1x1, vocab -> n_init
    decoder/group_<g>/block_<i>/{id_path,res_path/conv_<j>}/...
    decoder/output/conv/{kernel,bias}                   1x1, -> 2C (mu, ln b)

which is OpenAI's state-dict name ``blocks.<path>.{w,b}`` with ``.`` -> ``/``,
``w`` -> ``kernel`` (OIHW -> HWIO) and ``b`` -> ``bias``. Groups and blocks count from 1
as in the release. Kernels are ``(kh, kw, in, out)``.

Widths: encoder group g (1-based) is ``n_hid * 2**(g-1)`` wide and the decoder's groups
are the same widths reversed. With group_count = 4 this is the release's 1, 2, 4, 8 x n_hid;
other group counts follow the same doubling rule.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import sharding

# Paper §A.3 eq. 3: pixels are squeezed into [eps, 1 - eps] so that the logit-Laplace
# density (supported on (0, 1)) never has to model the endpoints.
LOGIT_LAPLACE_EPS = 0.1

_DTYPES = ("float32", "bfloat16", "float16")

# Logical names of an NHWC activation between layers (channels are left to XLA).
_ACT_AXES = ("batch", "height", "width", None)


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class DVAEConfig:
    """Architecture of the dVAE. Defaults are the paper's model (paper §A.1; OpenAI release).

    Attributes:
        image_size: side of the square input image, in pixels.
        input_channels: image channels (3 for RGB); the decoder predicts twice as many.
        group_count: number of resolution groups; the grid is ``image_size / 2**(group_count-1)``.
        n_hid: width of the first encoder group / last decoder group.
        n_blk_per_group: residual blocks per group.
        n_init: width of the decoder's input 1x1 conv.
        vocab_size: codebook size K.
        dtype: compute dtype of the convolutions (the encoder's last and the decoder's first
            conv always run in float32, as in the release). Parameters are always float32.
        post_gain: multiplier of every resblock's residual branch; 0 (the default) means
            the paper's ``1 / n_layers**2``. Small, short CPU runs may raise it: the paper's
            constant keeps the network near its identity paths for many thousands of steps.
    """

    image_size: int = 256
    input_channels: int = 3
    group_count: int = 4
    n_hid: int = 256
    n_blk_per_group: int = 2
    n_init: int = 128
    vocab_size: int = 8192
    dtype: str = "float32"
    post_gain: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "dtype":
                if value not in _DTYPES:
                    raise ValueError(f"DVAEConfig.dtype must be one of {_DTYPES}, got {value!r}")
            elif f.name == "post_gain":
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"DVAEConfig.post_gain must be a number >= 0, got {value!r}")
            elif not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"DVAEConfig.{f.name} must be an int, got {value!r}")
        minimum = dict(image_size=1, input_channels=1, group_count=1, n_hid=4,
                       n_blk_per_group=1, n_init=1, vocab_size=2)
        for name, lo in minimum.items():
            if getattr(self, name) < lo:
                raise ValueError(f"DVAEConfig.{name} must be >= {lo}, got {getattr(self, name)}")
        # Bottleneck blocks use n_out // 4 hidden channels; the narrowest block is n_hid wide.
        if self.n_hid % 4:
            raise ValueError(f"DVAEConfig.n_hid must be a multiple of 4, got {self.n_hid}")
        factor = 2 ** (self.group_count - 1)
        if self.image_size % factor:
            raise ValueError(
                f"DVAEConfig.image_size={self.image_size} must be divisible by "
                f"2**(group_count-1)={factor} (one 2x pooling after each group but the last)"
            )

    @property
    def grid(self) -> int:
        """Side G of the token grid."""
        return self.image_size // 2 ** (self.group_count - 1)

    @property
    def tokens_per_image(self) -> int:
        return self.grid * self.grid

    @property
    def resblock_gain(self) -> float:
        """The residual-branch multiplier: ``post_gain``, or the paper's 1 / n_layers**2."""
        return float(self.post_gain) if self.post_gain else 1.0 / self.n_layers**2

    @property
    def n_layers(self) -> int:
        """Total residual blocks per network; sets post_gain = 1 / n_layers**2."""
        return self.group_count * self.n_blk_per_group

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def encoder_widths(self) -> tuple[int, ...]:
        """Output width of each encoder group: n_hid * 2**g (256, 512, 1024, 2048 in the paper)."""
        return tuple(self.n_hid * 2**g for g in range(self.group_count))

    def decoder_widths(self) -> tuple[int, ...]:
        """Output width of each decoder group: the encoder's widths reversed."""
        return self.encoder_widths()[::-1]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | Any) -> DVAEConfig:
        """Builds a config from a mapping (or anything with ``to_dict``, e.g. a ConfigDict).

        Raises:
            ValueError: on keys that are not config fields.
        """
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DVAEConfig keys {unknown}; allowed keys are {sorted(known)}")
        return cls(**d)

    def architecture_diff(self, other: DVAEConfig) -> dict[str, tuple[Any, Any]]:
        """Fields that change the parameter shapes and differ: ``{name: (self, other)}``."""
        names = ("input_channels", "group_count", "n_hid", "n_blk_per_group", "n_init", "vocab_size")
        return {n: (getattr(self, n), getattr(other, n)) for n in names
                if getattr(self, n) != getattr(other, n)}


# ----------------------------------------------------------------------------- layers


class Conv(nn.Module):
    """Stride-1 SAME convolution with OpenAI's init: w ~ N(0, 1/sqrt(n_in * k**2)), b = 0.

    Parameters are float32; the input and parameters are cast to ``dtype`` for the compute.
    ``precision`` is passed to XLA (HIGHEST makes a float32 conv really fp32 on TPU/GPU,
    where the default uses bf16 / TF32 passes).
    """

    in_features: int
    features: int
    kernel_size: int
    dtype: Any = jnp.float32
    in_axis: str = "conv_in"
    out_axis: str = "conv_out"
    precision: Any = None

    def setup(self) -> None:
        k = self.kernel_size
        std = 1.0 / math.sqrt(self.in_features * k * k)
        self.kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=std),
                ("conv_window", "conv_window", self.in_axis, self.out_axis),
            ),
            (k, k, self.in_features, self.features),
            jnp.float32,
        )
        self.bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.out_axis,)),
            (self.features,),
            jnp.float32,
        )

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x_BHWC.astype(self.dtype),
            self.kernel.astype(self.dtype),
            window_strides=(1, 1),
            padding="SAME",  # == PyTorch padding (k-1)//2 for odd k at stride 1
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision,
        )
        return y + self.bias.astype(self.dtype).reshape(1, 1, 1, -1)

    def lookup(self, ids_BHW: jax.Array) -> jax.Array:
        """A 1x1 conv applied to ``one_hot(ids)``, computed as a row gather (paper §2.2 decoding).

        Out-of-range ids are clamped (``mode="clip"``); callers that need a check do it
        on the host (see `image_tokenizer.ImageTokenizer.decode`).
        """
        if self.kernel_size != 1:
            raise ValueError("lookup needs a 1x1 convolution")
        table = self.kernel[0, 0]  # (in, out)
        return (jnp.take(table, ids_BHW, axis=0, mode="clip")
                + jnp.expand_dims(self.bias, tuple(range(ids_BHW.ndim))))


class ResPath(nn.Module):
    """Pre-activation bottleneck: (ReLU -> conv) x 4 with the given kernel sizes."""

    n_in: int
    n_out: int
    kernel_sizes: tuple[int, int, int, int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_hid = self.n_out // 4
        widths = (self.n_in, n_hid, n_hid, n_hid, self.n_out)
        for j, k in enumerate(self.kernel_sizes):
            x = Conv(widths[j], widths[j + 1], k, self.dtype, name=f"conv_{j + 1}")(nn.relu(x))
        return x


class Block(nn.Module):
    """``id_path(x) + post_gain * res_path(x)`` (paper §2.1: "multiplication of the outgoing
    activations ... by a small constant"); post_gain is a constant, there is no norm."""

    n_in: int
    n_out: int
    post_gain: float
    kernel_sizes: tuple[int, int, int, int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.n_in != self.n_out:
            identity = Conv(self.n_in, self.n_out, 1, self.dtype, name="id_path")(x)
        else:
            identity = x.astype(self.dtype)
        res = ResPath(self.n_in, self.n_out, self.kernel_sizes, self.dtype, name="res_path")(x)
        return identity + self.post_gain * res


class Group(nn.Module):
    """``n_blk`` blocks; the first changes width from ``n_in`` to ``n_out``."""

    n_in: int
    n_out: int
    n_blk: int
    post_gain: float
    kernel_sizes: tuple[int, int, int, int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.n_blk):
            n_in = self.n_in if i == 0 else self.n_out
            x = Block(n_in, self.n_out, self.post_gain, self.kernel_sizes, self.dtype,
                      name=f"block_{i + 1}")(x)
        return x


# Paper §A.1: encoder blocks are "primarily 3x3"; the release ends the encoder's
# res_path with a 1x1 and starts the decoder's with one.
_ENC_KERNELS = (3, 3, 3, 1)
_DEC_KERNELS = (1, 3, 3, 3)


class Encoder(nn.Module):
    """Image (mapped to [eps, 1-eps]) -> code logits ``(B, G, G, vocab)`` in float32."""

    config: DVAEConfig

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        c = self.config
        dt = c.compute_dtype
        # Paper §A.1: "The first convolution of the encoder is 7x7".
        x = Conv(c.input_channels, c.n_hid, 7, dt, name="input")(x_BHWC)
        n_in = c.n_hid
        for g, width in enumerate(c.encoder_widths()):
            x = Group(n_in, width, c.n_blk_per_group, c.resblock_gain, _ENC_KERNELS, dt,
                      name=f"group_{g + 1}")(x)
            if g < c.group_count - 1:
                # Paper §A.1: max-pooling gave a better ELB than average-pooling.
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = nn.with_logical_constraint(x, _ACT_AXES)
            n_in = width
        # The conv next to the relaxation stays fp32 (release: use_float16=False) and is
        # 1x1 (paper §2.1: a small receptive field there generalises better to the true ELB).
        x = nn.relu(x).astype(jnp.float32)
        logits = Head(n_in, c.vocab_size, jnp.float32, out_axis="codebook",
                      precision=jax.lax.Precision.HIGHEST, name="output")(x)
        return nn.with_logical_constraint(logits, _ACT_AXES)


class Head(nn.Module):
    """A 1x1 conv nested as ``<name>/conv``, mirroring the release's ``blocks.output.conv``."""

    n_in: int
    n_out: int
    dtype: Any = jnp.float32
    out_axis: str = "conv_out"
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Conv(self.n_in, self.n_out, 1, self.dtype, out_axis=self.out_axis,
                    precision=self.precision, name="conv")(x)


class Decoder(nn.Module):
    """Relaxed one-hot ``(B, G, G, vocab)`` or token ids ``(B, G, G)`` -> statistics
    ``(B, H, W, 2C)``: channels ``[:C]`` are mu, ``[C:]`` are ln b (paper §A.3), float32."""

    config: DVAEConfig

    @nn.compact
    def __call__(self, z: jax.Array, *, from_tokens: bool = False) -> jax.Array:
        c = self.config
        dt = c.compute_dtype
        # The conv that reads the relaxation stays fp32, as in the release. On token ids it is
        # an embedding lookup: a 1x1 conv of a one-hot selects one row of the kernel.
        inp = Conv(c.vocab_size, c.n_init, 1, jnp.float32, in_axis="codebook",
                   precision=jax.lax.Precision.HIGHEST, name="input")
        x = inp.lookup(z) if from_tokens else inp(z.astype(jnp.float32))
        x = nn.with_logical_constraint(x, _ACT_AXES)
        n_in = c.n_init
        for g, width in enumerate(c.decoder_widths()):
            x = Group(n_in, width, c.n_blk_per_group, c.resblock_gain, _DEC_KERNELS, dt,
                      name=f"group_{g + 1}")(x)
            if g < c.group_count - 1:
                # Paper §A.1: nearest-neighbour upsampling.
                x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = nn.with_logical_constraint(x, _ACT_AXES)
            n_in = width
        # Its few output channels (mu and ln b per colour) are named "channels", which no
        # preset shards: 6 outputs would not divide an fsdp degree of 4 or 8.
        stats = Head(n_in, 2 * c.input_channels, dt, out_axis="channels",
                     name="output")(nn.relu(x))
        return stats.astype(jnp.float32)


class DVAE(nn.Module):
    """Encoder + decoder under ``encoder/`` and ``decoder/``.

    ``__call__`` (used by ``init``) runs the decoder on softmax(logits) so that both halves
    get parameters; `image_tokenizer` and `dvae_objective` call its methods for real work.
    """

    config: DVAEConfig

    def setup(self) -> None:
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    def __call__(self, x_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = self.encoder(x_BHWC)
        return logits, self.decoder(jax.nn.softmax(logits, axis=-1))

    def encode_logits(self, x_BHWC: jax.Array) -> jax.Array:
        return self.encoder(x_BHWC)

    def decode_relaxed(self, z_BGGC: jax.Array) -> jax.Array:
        return self.decoder(z_BGGC)

    def decode_tokens(self, tokens_BGG: jax.Array) -> jax.Array:
        return self.decoder(tokens_BGG, from_tokens=True)


# ----------------------------------------------------------------------------- params


def as_model(model_or_config: DVAE | DVAEConfig) -> DVAE:
    """The module itself, or a `DVAE` built from a config."""
    if isinstance(model_or_config, DVAE):
        return model_or_config
    if isinstance(model_or_config, DVAEConfig):
        return DVAE(model_or_config)
    raise TypeError(f"expected a DVAE or DVAEConfig, got {type(model_or_config).__name__}")


def _abstract_variables(config: DVAEConfig) -> dict[str, Any]:
    """``DVAE.init`` under `jax.eval_shape`: shapes plus logical-axis boxes, no allocation."""
    x = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.input_channels),
                             jnp.float32)
    return jax.eval_shape(lambda k, x: DVAE(config).init(k, x), jax.random.key(0), x)


def abstract_params(config: DVAEConfig) -> dict[str, Any]:
    """Shapes and dtypes of the parameters (unboxed), allocating nothing."""
    return sharding.unboxed(_abstract_variables(config))["params"]


def init_params(config: DVAEConfig, rng: jax.Array) -> dict[str, Any]:
    """Fresh float32 parameters (unboxed ``params`` collection); jittable.

    Same distribution as the modules' own initialisers (kernels N(0, 1/sqrt(kh*kw*n_in)),
    biases 0) but every kernel is cut from one normal draw: XLA on CPU compiles each PRNG
    call separately, and ~100 of them (one per kernel, as ``DVAE.init`` does) take tens of
    seconds to compile on a small machine.
    """
    abstract = abstract_params(config)
    leaves, treedef = jax.tree.flatten(abstract)
    sizes = [math.prod(x.shape) if len(x.shape) == 4 else 0 for x in leaves]
    noise = jax.random.normal(rng, (sum(sizes),), jnp.float32)
    out, offset = [], 0
    for x, n in zip(leaves, sizes):
        if n:  # kernel (kh, kw, in, out)
            kh, kw, n_in, _ = x.shape
            std = 1.0 / math.sqrt(n_in * kh * kw)
            out.append(noise[offset:offset + n].reshape(x.shape) * std)
            offset += n
        else:  # bias
            out.append(jnp.zeros(x.shape, jnp.float32))
    return jax.tree.unflatten(treedef, out)


def init_variables(config: DVAEConfig, rng: jax.Array) -> dict[str, Any]:
    """``{"params": ...}`` like ``DVAE(config).init`` (leaves boxed with their logical axes,
    for `nn.get_partition_spec`), with the values of `init_params`."""
    boxed = _abstract_variables(config)["params"]
    values = init_params(config, rng)
    is_box = lambda b: isinstance(b, nn.meta.AxisMetadata)  # noqa: E731
    return {"params": jax.tree.map(lambda b, v: b.replace_boxed(v), boxed, values,
                                   is_leaf=is_box)}


def param_logical_specs(config: DVAEConfig) -> dict[str, Any]:
    """Logical axis names (PartitionSpecs of logical names) of every parameter."""
    return nn.get_partition_spec(_abstract_variables(config))["params"]


# ----------------------------------------------------------------------------- pixels


def map_pixels(x: jax.Array, eps: float = LOGIT_LAPLACE_EPS) -> jax.Array:
    """[0, 1] -> [eps, 1 - eps] (paper §A.3 eq. 3, on the [0, 1] scale)."""
    return (1.0 - 2.0 * eps) * x + eps


def unmap_pixels(x: jax.Array, eps: float = LOGIT_LAPLACE_EPS) -> jax.Array:
    """Inverse of `map_pixels`, clipped to [0, 1]."""
    return jnp.clip((x - eps) / (1.0 - 2.0 * eps), 0.0, 1.0)


def check_images(images: jax.Array, config: DVAEConfig) -> None:
    """Trace-time shape/dtype check of an image batch ``(B, H, W, C)``."""
    shape = tuple(images.shape)
    want = (config.image_size, config.image_size, config.input_channels)
    if len(shape) != 4:
        raise ValueError(f"images must be 4-D (B, H, W, C), got shape {shape}")
    if shape[1:3] != want[:2]:
        raise ValueError(
            f"images are {shape[1]}x{shape[2]} but the dVAE is configured for "
            f"image_size={config.image_size}"
        )
    if shape[3] != want[2]:
        raise ValueError(
            f"images have {shape[3]} channels but the dVAE is configured for "
            f"input_channels={config.input_channels} (layout is NHWC)"
        )
    dt = jnp.dtype(images.dtype)
    if dt != jnp.uint8 and not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"images must be uint8 in [0, 255] or floating in [0, 1], got dtype {dt}")


def to_unit_interval(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] or floating [0, 1] -> float32 [0, 1]."""
    if jnp.dtype(images.dtype) == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def stats_to_images(stats: jax.Array) -> jax.Array:
    """``unmap(sigmoid(mu))`` in [0, 1]; ln b is ignored (paper §A.3)."""
    c = stats.shape[-1] // 2
    return unmap_pixels(jax.nn.sigmoid(stats[..., :c].astype(jnp.float32)))
