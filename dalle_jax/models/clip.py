"""Contrastive image/text towers with the architecture of OpenAI's CLIP ViT models.

The reranker (`dalle_jax.rerank.scorer.ClipScorer`) scores each sampled image against its
caption by the cosine similarity of two embeddings. The towers here are the ViT variant of
CLIP (Radford et al. 2021), laid out so that OpenAI's released weights map onto them one
tensor at a time (`dalle_jax.rerank.openai_clip`) and the same module can be trained from
scratch (`dalle_jax.train.clip_task`):

* image tower: a patch-embedding convolution without bias, a learned class embedding, a
  learned positional embedding, ``ln_pre``, pre-LayerNorm residual attention blocks,
  ``ln_post`` on the class token, and a bias-free projection to the joint width;
* text tower: token and positional embeddings, the same blocks under a causal mask,
  ``ln_final``, the feature at each sequence's end-of-text slot, and a bias-free
  projection;
* ``logit_scale``: the learned log-temperature of the contrastive loss (OpenAI's initial
  value ``log(1 / 0.07)``).

Each residual block is ``x + attn(ln_1(x))`` followed by ``x + mlp(ln_2(x))``; the
attention keeps its query/key/value projections fused (``attn_qkv_kernel (D, 3, D)``,
``attn_qkv_bias (3, D)``, the output dimension ordered head by head) and the MLP is
``c_proj(act(c_fc(x)))`` with width ``4 D``. The activation is OpenAI's ``quick_gelu``
(``x * sigmoid(1.702 x)``) or the exact ``gelu``. The layers are a Python loop with one
parameter subtree per block (``resblocks_{i}``), the names the importer writes.

Parameter tree (what the importer writes)::

    visual/conv1 (P, P, 3, Dv)              visual/class_embedding (Dv,)
    visual/positional_embedding (N+1, Dv)   visual/ln_pre/{scale, bias}
    visual/resblocks_{i}/...                visual/ln_post/{scale, bias}
    visual/proj (Dv, E)
    text/token_embedding (V, Dt)            text/positional_embedding (T, Dt)
    text/resblocks_{i}/...                  text/ln_final/{scale, bias}
    text/text_projection (Dt, E)
    logit_scale ()

    resblocks_{i}: ln_1/{scale, bias}, attn_qkv_kernel (D, 3, D), attn_qkv_bias (3, D),
                   attn_out_kernel (D, D), attn_out_bias (D,), ln_2/{scale, bias},
                   mlp_c_fc_kernel (D, 4D), mlp_c_fc_bias (4D,),
                   mlp_c_proj_kernel (4D, D), mlp_c_proj_bias (D,)

Precision: parameters are float32; the matmuls run in ``ClipConfig.dtype``; layer norms
(eps 1e-5), the attention softmax and the embeddings the towers return are float32.

The initialisation follows OpenAI's (normal draws with their per-tensor scales, `init_std`),
so a tower trained here starts where theirs did; `init_params` draws it fast.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_ACTIVATIONS = ("quick_gelu", "gelu")
LN_EPS = 1e-5

# OpenAI CLIP's image normalisation (per RGB channel, on pixels in [0, 1]).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
# The initial logit scale (log of the inverse temperature 1 / 0.07).
INIT_LOGIT_SCALE = math.log(1 / 0.07)
_RESIZE = ("bicubic", "bilinear", "nearest")


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """Architecture of the two towers; the defaults are OpenAI's ViT-B/32.

    Attributes:
        embed_dim: width ``E`` of the joint embedding both towers project to.
        image_size: side of the (square) input images, in pixels.
        patch_size: side of the image patches; ``image_size`` must divide by it.
        vision_width, vision_layers, vision_heads: image tower width, depth and heads.
        vocab_size: rows of the token embedding (the text tokenizer's ids).
        context_length: text positions (the tokenizer's padded sequence length).
        text_width, text_layers, text_heads: text tower width, depth and heads.
        activation: MLP activation, ``"quick_gelu"`` (OpenAI's ``x * sigmoid(1.702 x)``)
            or ``"gelu"`` (exact).
        dtype: compute dtype of the matmuls (``float32``, ``bfloat16`` or ``float16``);
            parameters stay float32.
    """

    embed_dim: int = 512
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vocab_size: int = 49408
    context_length: int = 77
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    activation: str = "quick_gelu"
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("embed_dim", "image_size", "patch_size", "vision_width", "vision_layers",
                     "vision_heads", "vocab_size", "context_length", "text_width",
                     "text_layers", "text_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not divisible by "
                             f"patch_size={self.patch_size}")
        if self.vision_width % self.vision_heads:
            raise ValueError(f"vision_width={self.vision_width} is not divisible by "
                             f"vision_heads={self.vision_heads}")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width={self.text_width} is not divisible by "
                             f"text_heads={self.text_heads}")
        if self.context_length < 2:
            raise ValueError(f"context_length must be >= 2 (start and end of text), got "
                             f"{self.context_length}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got "
                             f"{self.activation!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {self.dtype!r}")

    @property
    def grid(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def compute_dtype(self) -> Any:
        return _DTYPES[self.dtype]


# ----------------------------------------------------------------------------- layers


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation ``x * sigmoid(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


def init_std(tower: str, name: str, width: int, layers: int, patch_size: int = 1
             ) -> float | None:
    """Standard deviation of the initial normal draw of parameter ``name`` of a tower
    (``"visual"`` or ``"text"``) of ``width`` and ``layers``; None for the parameters that
    start at a constant (layer-norm gains 1, biases 0, ``logit_scale``).

    OpenAI's scales: attention input ``width^-0.5``, attention and MLP outputs
    ``width^-0.5 (2 layers)^-0.5``, MLP input ``(2 width)^-0.5``, token embedding 0.02,
    text positions 0.01, image class/positional embeddings and both projections
    ``width^-0.5``; the patch kernel (PyTorch's default init in OpenAI's code) here
    ``fan_in^-0.5``.
    """
    attn = width ** -0.5
    out = attn * (2 * layers) ** -0.5
    table = {
        "attn_qkv_kernel": attn, "attn_out_kernel": out,
        "mlp_c_fc_kernel": (2 * width) ** -0.5, "mlp_c_proj_kernel": out,
        "conv1": (3 * patch_size * patch_size) ** -0.5,
        "class_embedding": attn, "proj": attn, "text_projection": attn,
        "token_embedding": 0.02,
        "positional_embedding": attn if tower == "visual" else 0.01,
    }
    return table.get(name)


def _normal(std: float):
    return nn.initializers.normal(std)


def _activation(name: str):
    if name == "quick_gelu":
        return quick_gelu
    return lambda x: jax.nn.gelu(x, approximate=False)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis in float32 (eps 1e-5), params ``scale`` and ``bias``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        lead = tuple(range(x.ndim - 1))  # explicit: no implicit rank promotion
        return ((x - mean) * jax.lax.rsqrt(var + LN_EPS) * jnp.expand_dims(scale, lead)
                + jnp.expand_dims(bias, lead))


def _dense(x: jax.Array, w: jax.Array, b: jax.Array | None, dtype: Any) -> jax.Array:
    """``x @ w + b`` with the matmul in ``dtype`` and a float32 result."""
    y = jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    return y if b is None else y + jnp.expand_dims(b, tuple(range(y.ndim - b.ndim)))


class ResidualAttentionBlock(nn.Module):
    """One pre-LN block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``.

    Attributes:
        width, heads: model width ``D`` and attention heads (``D`` divides by it).
        layers: depth of the tower (scales the initial output projections, as OpenAI's).
        activation, dtype: see `ClipConfig`.
    """

    width: int
    heads: int
    layers: int
    activation: str = "quick_gelu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: jax.Array, mask_LL: jax.Array | None = None) -> jax.Array:
        d, h = self.width, self.heads
        k = d // h
        zeros = nn.initializers.zeros

        def weight(name, shape):
            return self.param(name, _normal(init_std("", name, d, self.layers)), shape)

        attn = {
            "qkv_kernel": weight("attn_qkv_kernel", (d, 3, d)),
            "qkv_bias": self.param("attn_qkv_bias", zeros, (3, d)),
            "out_kernel": weight("attn_out_kernel", (d, d)),
            "out_bias": self.param("attn_out_bias", zeros, (d,)),
        }
        mlp = {
            "c_fc_kernel": weight("mlp_c_fc_kernel", (d, 4 * d)),
            "c_fc_bias": self.param("mlp_c_fc_bias", zeros, (4 * d,)),
            "c_proj_kernel": weight("mlp_c_proj_kernel", (4 * d, d)),
            "c_proj_bias": self.param("mlp_c_proj_bias", zeros, (d,)),
        }

        b, length, _ = x_BLD.shape
        h_BLD = LayerNorm(name="ln_1")(x_BLD)
        qkv_BL3D = jnp.einsum("bld,dte->blte", h_BLD.astype(self.dtype),
                              attn["qkv_kernel"].astype(self.dtype),
                              preferred_element_type=jnp.float32) + attn["qkv_bias"][None, None]
        qkv_BL3HK = qkv_BL3D.reshape(b, length, 3, h, k)
        q_BLHK = qkv_BL3HK[:, :, 0] * (k ** -0.5)
        k_BLHK, v_BLHK = qkv_BL3HK[:, :, 1], qkv_BL3HK[:, :, 2]
        logits_BHLL = jnp.einsum("bqhk,bshk->bhqs", q_BLHK.astype(self.dtype),
                                 k_BLHK.astype(self.dtype),
                                 preferred_element_type=jnp.float32)
        if mask_LL is not None:
            logits_BHLL = jnp.where(mask_LL[None, None], logits_BHLL,
                                    jnp.finfo(jnp.float32).min)
        probs_BHLL = jax.nn.softmax(logits_BHLL, axis=-1)
        out_BLHK = jnp.einsum("bhqs,bshk->bqhk", probs_BHLL.astype(self.dtype),
                              v_BLHK.astype(self.dtype), preferred_element_type=jnp.float32)
        out_BLD = _dense(out_BLHK.reshape(b, length, d), attn["out_kernel"], attn["out_bias"],
                         self.dtype)
        x_BLD = x_BLD + out_BLD

        h_BLD = LayerNorm(name="ln_2")(x_BLD)
        h_BLF = _activation(self.activation)(
            _dense(h_BLD, mlp["c_fc_kernel"], mlp["c_fc_bias"], self.dtype))
        return x_BLD + _dense(h_BLF, mlp["c_proj_kernel"], mlp["c_proj_bias"], self.dtype)


class VisionTower(nn.Module):
    """The ViT image tower: ``(B, S, S, 3)`` preprocessed pixels to ``(B, E)`` embeddings."""

    config: ClipConfig

    @nn.compact
    def __call__(self, pixels_BHWC: jax.Array) -> jax.Array:
        c = self.config
        d, p, dtype = c.vision_width, c.patch_size, c.compute_dtype
        if pixels_BHWC.ndim != 4 or pixels_BHWC.shape[1:] != (c.image_size, c.image_size, 3):
            raise ValueError(f"the image tower takes pixels of shape (B, {c.image_size}, "
                             f"{c.image_size}, 3), got {tuple(pixels_BHWC.shape)}")

        def weight(name, shape):
            return self.param(name, _normal(init_std("visual", name, d, c.vision_layers, p)),
                              shape)

        conv = weight("conv1", (p, p, 3, d))
        cls_D = weight("class_embedding", (d,))
        pos_ND = weight("positional_embedding", (c.num_patches + 1, d))
        proj_DE = weight("proj", (d, c.embed_dim))

        b = pixels_BHWC.shape[0]
        x_BGGD = jax.lax.conv_general_dilated(
            pixels_BHWC.astype(dtype), conv.astype(dtype), window_strides=(p, p),
            padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=jnp.float32)
        x_BPD = x_BGGD.reshape(b, c.num_patches, d)
        x_BND = jnp.concatenate([jnp.broadcast_to(cls_D, (b, 1, d)), x_BPD], axis=1) + pos_ND[None]
        x_BND = LayerNorm(name="ln_pre")(x_BND)
        for i in range(c.vision_layers):
            x_BND = ResidualAttentionBlock(d, c.vision_heads, c.vision_layers, c.activation,
                                           dtype, name=f"resblocks_{i}")(x_BND)
        cls_BD = LayerNorm(name="ln_post")(x_BND[:, 0])
        return _dense(cls_BD, proj_DE, None, dtype)


class TextTower(nn.Module):
    """The causal text tower: ``(B, T)`` token ids and each row's end-of-text slot to
    ``(B, E)`` embeddings."""

    config: ClipConfig

    @nn.compact
    def __call__(self, tokens_BT: jax.Array, eot_index_B: jax.Array) -> jax.Array:
        c = self.config
        d, dtype = c.text_width, c.compute_dtype
        if tokens_BT.ndim != 2 or not 1 <= tokens_BT.shape[1] <= c.context_length:
            raise ValueError(f"the text tower takes tokens of shape (B, T) with T <= "
                             f"{c.context_length}, got {tuple(tokens_BT.shape)}")

        def weight(name, shape):
            return self.param(name, _normal(init_std("text", name, d, c.text_layers)), shape)

        table_VD = weight("token_embedding", (c.vocab_size, d))
        pos_TD = weight("positional_embedding", (c.context_length, d))
        proj_DE = weight("text_projection", (d, c.embed_dim))

        length = tokens_BT.shape[1]
        x_BTD = jnp.take(table_VD, tokens_BT.astype(jnp.int32), axis=0) + pos_TD[None, :length]
        # Slot t attends to slots <= t, so the feature at the end-of-text slot never sees
        # the padding after it.
        causal_TT = jnp.tril(jnp.ones((length, length), jnp.bool_))
        for i in range(c.text_layers):
            x_BTD = ResidualAttentionBlock(d, c.text_heads, c.text_layers, c.activation, dtype,
                                           name=f"resblocks_{i}")(x_BTD, causal_TT)
        x_BTD = LayerNorm(name="ln_final")(x_BTD)
        eot_B = jnp.asarray(eot_index_B, jnp.int32).reshape(-1)
        x_BD = jnp.take_along_axis(x_BTD, eot_B[:, None, None], axis=1)[:, 0]
        return _dense(x_BD, proj_DE, None, dtype)


class CLIP(nn.Module):
    """Both towers and the logit scale, sharing one parameter tree.

    ``init`` goes through ``__call__`` and creates every parameter; ``encode_image`` and
    ``encode_text`` (``apply(..., method=...)``) read their tower's part of the same tree.
    """

    config: ClipConfig

    def setup(self):
        self.visual = VisionTower(self.config)
        self.text = TextTower(self.config)
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(INIT_LOGIT_SCALE), (), jnp.float32)

    def encode_image(self, pixels_BHWC: jax.Array) -> jax.Array:
        """``(B, embed_dim)`` float32 image embeddings, not normalised.

        Args:
            pixels_BHWC: preprocessed pixels (`preprocess`), ``(B, image_size,
                image_size, 3)``.
        """
        return self.visual(pixels_BHWC)

    def encode_text(self, tokens_BT: jax.Array, eot_index_B: jax.Array) -> jax.Array:
        """``(B, embed_dim)`` float32 text embeddings, not normalised.

        Args:
            tokens_BT: token ids ``(B, T)``, ``T <= context_length``.
            eot_index_B: the slot of each row's end-of-text token, whose feature is the
                sequence's embedding.
        """
        return self.text(tokens_BT, eot_index_B)

    def __call__(self, pixels_BHWC: jax.Array, tokens_BT: jax.Array, eot_index_B: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(image_emb_BE, text_emb_BE, logit_scale)``; the embeddings are not normalised
        and ``logit_scale`` is the learned log inverse temperature (not exponentiated)."""
        return (self.encode_image(pixels_BHWC), self.encode_text(tokens_BT, eot_index_B),
                self.logit_scale)


def param_shapes(config: ClipConfig) -> PyTree:
    """The parameter tree with ``jax.ShapeDtypeStruct`` leaves (traced, nothing computed)."""
    model = CLIP(config)
    pixels = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, config.context_length), jnp.int32)
    eot = jax.ShapeDtypeStruct((1,), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), pixels, tokens, eot)
    return nn.meta.unbox(dict(variables["params"]))


def _leaf_init(config: ClipConfig, path: tuple[str, ...]) -> tuple[str, float]:
    """``("normal", std)`` or ``("constant", value)`` of the leaf at ``path``."""
    name = path[-1]
    if name == "logit_scale":
        return "constant", INIT_LOGIT_SCALE
    if name == "scale":
        return "constant", 1.0
    if name == "bias" or name.endswith("_bias"):
        return "constant", 0.0
    tower = path[0]
    if tower == "visual":
        std = init_std("visual", name, config.vision_width, config.vision_layers,
                       config.patch_size)
    else:
        std = init_std("text", name, config.text_width, config.text_layers)
    if std is None:
        raise AssertionError(f"no initialisation rule for CLIP parameter {'/'.join(path)}")
    return "normal", std


def init_params(config: ClipConfig, rng: jax.Array) -> PyTree:
    """Freshly initialised float32 parameters of `CLIP` (a plain nested dict).

    The same distributions as ``CLIP(config).init`` (`init_std`), but every normal leaf is
    cut from one draw: compiling one random-number program instead of one per parameter
    keeps the init fast to compile.
    """
    return _init_fn(config)(rng)


@functools.lru_cache(maxsize=8)
def _init_fn(config: ClipConfig):
    """The jitted init of `init_params` (one compile per config)."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    rules = [_leaf_init(config, tuple(k.key for k in path)) for path, _ in leaves]
    sizes = [int(np.prod(s.shape)) for _, s in leaves]

    def draw(key):
        total = sum(n for n, (kind, _) in zip(sizes, rules) if kind == "normal")
        flat = jax.random.normal(key, (max(total, 1),), jnp.float32)
        out, at = [], 0
        for (_, s), n, (kind, value) in zip(leaves, sizes, rules):
            if kind == "normal":
                out.append(flat[at:at + n].reshape(s.shape) * jnp.float32(value))
                at += n
            else:
                out.append(jnp.full(s.shape, value, jnp.float32))
        return jax.tree_util.tree_unflatten(treedef, out)

    return jax.jit(draw)


# ----------------------------------------------------------------------------- helpers


def normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / ||x||`` over the last axis (float32; a zero vector stays zero)."""
    x = jnp.asarray(x, jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def similarity(image_emb: jax.Array, text_emb: jax.Array) -> jax.Array:
    """Cosine similarity of each pair ``(image_emb[i], text_emb[i])``: ``(N,)``."""
    return jnp.sum(normalize(image_emb) * normalize(text_emb), axis=-1)


def _pil_filter(resize: str):
    from PIL import Image

    return {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST}[resize]


def _resize_crop(image_HWC: np.ndarray, size: int, resize: str) -> np.ndarray:
    """Shorter side to ``size`` with PIL, then the centred ``size x size`` crop.

    uint8 images go through PIL's RGB path (uint8 out, as OpenAI's torchvision pipeline);
    float images are resized channel by channel in PIL's 32-bit float mode.
    """
    from PIL import Image

    h, w = image_HWC.shape[:2]
    if (h, w) != (size, size):
        # torchvision's Resize(int): the shorter side becomes `size`, the longer one
        # int(size * long / short).
        if h <= w:
            new_h, new_w = size, int(size * w / h)
        else:
            new_h, new_w = int(size * h / w), size
        if (new_h, new_w) != (h, w):
            filt = _pil_filter(resize)
            if image_HWC.dtype == np.uint8:
                image_HWC = np.asarray(Image.fromarray(image_HWC, "RGB").resize(
                    (new_w, new_h), filt))
            else:
                image_HWC = np.stack([
                    np.asarray(Image.fromarray(np.ascontiguousarray(image_HWC[..., ch]),
                                               "F").resize((new_w, new_h), filt))
                    for ch in range(3)], axis=-1)
        h, w = new_h, new_w
        # torchvision's CenterCrop offsets.
        top = int(round((h - size) / 2.0))
        left = int(round((w - size) / 2.0))
        image_HWC = image_HWC[top:top + size, left:left + size]
    return image_HWC


def preprocess(images: np.ndarray, config: ClipConfig, *, resize: str = "bicubic"
               ) -> np.ndarray:
    """OpenAI CLIP's image preprocessing on a batch: ``(N, S, S, 3)`` float32 pixels.

    Each image's shorter side is resized to ``S = config.image_size`` with PIL (bicubic by
    default, the filter of the torchvision PIL path OpenAI's preprocessing uses), the
    centred ``S x S`` square is cropped, the pixels are scaled to [0, 1] and normalised
    with OpenAI's per-channel mean and std. Images already ``S x S`` are not resampled.

    Args:
        images: uint8 ``(N, H, W, 3)`` (or one ``(H, W, 3)`` image), or float in [0, 1].
            uint8 images are resized in PIL's RGB mode, whose uint8 rounding OpenAI's
            pipeline has too; float images are resized per channel in PIL's float mode.
        config: gives ``image_size``.
        resize: PIL filter, ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.
    """
    if resize not in _RESIZE:
        raise ValueError(f"resize must be one of {_RESIZE}, got {resize!r}")
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3), got shape {images.shape}")
    if images.dtype == np.uint8:
        scale = 1.0 / 255.0
    elif np.issubdtype(images.dtype, np.floating):
        images = images.astype(np.float32)
        scale = 1.0
    else:
        raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
    size = config.image_size
    if images.shape[1:3] != (size, size):
        images = np.stack([_resize_crop(im, size, resize) for im in images]) if len(images) \
            else np.zeros((0, size, size, 3), images.dtype)
    x = images.astype(np.float32) * np.float32(scale)
    return ((x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)).astype(np.float32)
