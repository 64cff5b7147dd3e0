"""The stage-2 transformer (paper §2.2, App. B.1): a decoder-only sparse-attention transformer
over the joint text + image token stream, its input/target conventions and its loss.

This module owns:

* `TransformerConfig`, the architecture hyper-parameters (`TransformerConfig.paper_12b` is the
  paper's 64-layer, 3968-wide, 62-head model);
* `Transformer`, a Flax Linen module: embeddings, the resblock stack, the two output heads;
* the pure per-layer functions (`attention_branch`, `attention_output`, `mlp_branch`,
  `qkv_projection`, `attend`) and embeddings (`embed_text`, `embed_image`), kept
  module-level so the sampler (`dalle_jax.sample.sampler`) runs the same code with its KV
  cache, and so that float16 training wraps each resblock branch in its own gradient
  scale (`grad_scaled`; the scales live in the optimizer,
  `dalle_jax.train.optim.per_resblock_grad_scaling`);
* `make_inputs` and `loss_fn`, the sequence and target conventions;
* `param_specs` (shapes, logical axes and init of every parameter) and `init_variables`, the
  fast jittable init.

Sequence layout (the paper's Fig. 10 as far as it can be read; the exact slot layout is not
published). ``L = T + I`` slots, ``I = G*G``:

* text slots ``0..T-1`` hold the caption slots ``[BOS, bpe..., pad_p...]`` exactly as the text
  tokenizer writes them (ids ``< text_vocab``; the pad of slot ``p`` is its own id, so pads
  are learned tokens and are not masked, paper §2.2). Text slot ``t < T-1`` predicts the id
  in slot ``t+1`` over the whole text vocabulary, pads included (the paper leaves open
  whether pads count in the loss; they are learned tokens with their own embedding rows, so
  they are predicted like any other token). BOS in slot 0 is never predicted, and slot
  ``T-1`` predicts nothing because the slot after it always holds BOI;
* image slot ``T+k`` holds ``[BOI, z_0, ..., z_{I-2}][k]``, carries the row and column
  embeddings of cell ``k`` and predicts ``z_k`` over the image vocabulary. BOI is the extra
  image embedding row ``image_vocab``.

Each modality's softmax is restricted to its own vocabulary, and instead of one joint head
with a logits mask the model computes text logits on text slots only and image logits on
image slots only: the same probabilities, without the ``T x image_vocab`` and
``I x text_vocab`` blocks that a mask would throw away.

Parameters. Every resblock's weights are stored stacked on a leading ``layers`` axis
(``params["layers"][name]`` has shape ``(depth, ...)``) whether or not the stack is run
with ``lax.scan``; with ``scan_layers=False`` a Python loop takes layer ``l``'s slice. One
layout therefore serves training (either way), checkpoints and sampling, and switching
``scan_layers`` never needs a conversion. Each layer is a pure function of its slice, so
`jax.checkpoint` (remat policies) and `jax.lax.scan` apply to it directly.

Precision (paper App. D item 2): parameters, embeddings, the residual stream, layer norms
and logits are float32; the matmuls inside the resblock branches run in ``config.dtype``
and the attention softmax is float32. In float16 the backward pass of each resblock
branch runs at its own gradient scale (``grad_scales`` of `Transformer.__call__`,
`grad_scaled`), the paper's per-resblock scaling (§2.4): one loss scale cannot keep both
the early resblocks' large gradients and the late ones' small gradients inside float16's
range.

Parameter layout for sharding: the attention projections store their heads x head-width
dim fused (``qkv_kernel (depth, D, 3, H*K)``, ``out_kernel (depth, H*K, D)``, logical axis
``attn``), so a tensor-parallel axis can split it when the head count does not divide the
tensor degree; the vocabulary tables are padded (`TransformerConfig.vocab_multiple`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.models import attention, masks

PyTree = Any

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_REMAT = ("none", "full", "dots")
_ATTENTION = ("structured", "dense")
_CONV_KINDS = ("raster", "2d")

# Sparse Transformer (Child et al. 2019, §6) init: N(0, 0.125/sqrt(d_in)) weights, embeddings
# alike; the default of `TransformerConfig.init_scale`.
INIT_SCALE = 0.125
LN_EPS = 1e-5
# `init_variables` cuts all normal parameters from one draw up to this many scalars.
_ONE_DRAW_MAX = 1 << 26
# Vocabulary tables (embeddings and heads) get rows up to a multiple of this by default
# (`TransformerConfig.vocab_multiple`), so a tensor-sharded vocabulary divides the mesh.
VOCAB_MULTIPLE = 128

# Logical names of the main activations.
_X_AXES = ("batch", "length", "embed")
_HEAD_AXES = ("batch", "length", "heads", "kv")
_MLP_AXES = ("batch", "length", "mlp")
_LOGIT_AXES = ("batch", "length", "vocab")


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture of the stage-2 transformer.

    Attributes:
        text_vocab: rows of the text embedding and width of the text head: the BPE vocabulary
            plus one pad id per text slot (``TextTokenizer.text_vocab_size(text_len)``).
        image_vocab: dVAE codebook size; the image embedding has one extra row for BOI.
        text_len: text slots ``T`` (BOS, caption, pads).
        grid: image grid side ``G``; ``I = G*G`` image slots.
        width, depth, heads: ``D``, number of layers (each an attention and an MLP resblock),
            and attention heads (``D`` must divide by it).
        mlp_ratio: MLP hidden width as a multiple of ``D`` (Sparse Transformer: 4).
        dropout: dropout on each resblock branch output (paper: not stated, so 0).
        attn_pattern: layer mask pattern, see `masks.layer_kinds`.
        conv_kernel: window side of the convolutional mask (paper: 11).
        conv_kind: ``"raster"`` (window offsets on the raster index, wrapping across rows)
            or ``"2d"`` (the window on grid coordinates, clipped) for ``conv``; see `masks.mask`.
        dtype: compute dtype of the resblock matmuls.
        attention: ``"structured"`` (`attention.attend_structured`: only the logits a
            layer's mask can allow are computed, so row/column/conv layers cost a fraction
            of a dense one) or ``"dense"`` (every ``L x L`` logit, then the mask). Both give
            the same result; the choice only changes the cost.
        remat: ``"none"``, ``"full"`` (recompute each layer in the backward pass, paper §2.4)
            or ``"dots"`` (keep the weight matmul outputs, recompute the rest).
        scan_layers: run the layer stack with ``lax.scan`` (compiles one layer) instead of a
            Python loop; the parameters are the same either way.
        loss_text_weight: weight of the text cross-entropy; the image gets the rest (paper
            §2.2: 1/8 and 7/8).
        init_scale: the factor ``s`` of the initial weights N(0, s/sqrt(d_in)) (see
            `param_specs`); the Sparse Transformer's 0.125 by default. Only the
            initialisation depends on it.
        vocab_multiple: the embedding tables and heads are stored with their vocabulary
            rows padded up to a multiple of this (`text_vocab_padded`,
            `image_vocab_padded`, `image_embed_rows`), so that a vocabulary sharded over a
            tensor-parallel mesh axis divides it (the paper's image embedding has 8,193
            rows with BOI, and a BPE model may end with fewer pieces than asked for).
            Padding rows start at zero and are never looked up, and the heads' padding
            columns are cut off the logits (`unpad`), so neither the model's distribution
            nor its outputs' shapes depend on the padding.
    """

    text_vocab: int
    image_vocab: int
    text_len: int
    grid: int
    width: int
    depth: int
    heads: int
    mlp_ratio: int = 4
    dropout: float = 0.0
    attn_pattern: str = "paper"
    conv_kernel: int = masks.PAPER_CONV_KERNEL
    conv_kind: str = "raster"
    dtype: str = "float32"
    attention: str = "structured"
    remat: str = "none"
    scan_layers: bool = False
    loss_text_weight: float = 1 / 8
    init_scale: float = INIT_SCALE
    vocab_multiple: int = VOCAB_MULTIPLE

    def __post_init__(self):
        for name in ("text_vocab", "image_vocab", "grid", "width", "depth", "heads",
                     "mlp_ratio", "vocab_multiple"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.text_len < 2:
            raise ValueError(f"text_len must be >= 2 (BOS plus at least one predicted slot), "
                             f"got {self.text_len}")
        if self.text_vocab <= self.text_len:
            raise ValueError(f"text_vocab={self.text_vocab} must exceed text_len="
                             f"{self.text_len}: it holds the BPE ids plus one pad per text slot")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} is not divisible by heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.conv_kind not in _CONV_KINDS:
            raise ValueError(f"conv_kind must be one of {_CONV_KINDS}, got {self.conv_kind!r}")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be a positive odd number, got {self.conv_kernel}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {self.dtype!r}")
        if self.attention not in _ATTENTION:
            raise ValueError(f"attention must be one of {_ATTENTION}, got {self.attention!r}")
        if self.remat not in _REMAT:
            raise ValueError(f"remat must be one of {_REMAT}, got {self.remat!r}")
        if not 0.0 <= self.loss_text_weight <= 1.0:
            raise ValueError(f"loss_text_weight must be in [0, 1], got {self.loss_text_weight}")
        if not self.init_scale > 0.0:
            raise ValueError(f"init_scale must be > 0, got {self.init_scale}")
        masks.layer_kinds(self.depth, self.attn_pattern)  # raises on a bad pattern

    @classmethod
    def paper_12b(cls, **overrides: Any) -> TransformerConfig:
        """The paper's model (§2.2, App. B.1, Table 1): 64 layers, 62 heads x 64, d = 3968."""
        base = dict(text_vocab=16384 + 256, image_vocab=8192, text_len=256, grid=32,
                    width=3968, depth=64, heads=62)
        return cls(**{**base, **overrides})

    @property
    def text_vocab_padded(self) -> int:
        """Rows of ``text_embed`` and columns of ``text_head``: ``text_vocab`` rounded up."""
        return _round_up(self.text_vocab, self.vocab_multiple)

    @property
    def image_vocab_padded(self) -> int:
        """Columns of ``image_head``: ``image_vocab`` rounded up."""
        return _round_up(self.image_vocab, self.vocab_multiple)

    @property
    def image_embed_rows(self) -> int:
        """Rows of ``image_embed``: the codes plus BOI, rounded up."""
        return _round_up(self.image_vocab + 1, self.vocab_multiple)

    @property
    def image_len(self) -> int:
        return self.grid * self.grid

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_len

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_width(self) -> int:
        return self.mlp_ratio * self.width

    @property
    def boi_id(self) -> int:
        """Image-embedding row of the begin-of-image token (the input of the first image slot)."""
        return self.image_vocab

    @property
    def compute_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    def layer_kinds(self) -> tuple[str, ...]:
        """Mask kind of each layer, with ``conv`` resolved through ``conv_kind``."""
        conv = f"conv_{self.conv_kind}"
        return tuple(conv if k == "conv" else k
                     for k in masks.layer_kinds(self.depth, self.attn_pattern))


def _round_up(n: int, multiple: int) -> int:
    return -(-int(n) // int(multiple)) * int(multiple)


def layer_masks(config: TransformerConfig) -> tuple[np.ndarray, np.ndarray]:
    """The distinct masks ``(N, L, L)`` used by the model and each layer's index into them.

    Only the distinct masks become constants (at most a few, 1.6 MB each at the paper's
    size); a per-layer ``(depth, L, L)`` stack would put 105 MB of constants into the program.
    """
    kinds = config.layer_kinds()
    distinct = tuple(dict.fromkeys(kinds))
    table_NLL = np.stack([masks.mask(config.text_len, config.grid, k, kernel=config.conv_kernel)
                          for k in distinct])
    index = np.asarray([distinct.index(k) for k in kinds], np.int32)
    return table_NLL, index


# ----------------------------------------------------------------------------- sequence


def make_inputs(text_BT: jax.Array, image_BI: jax.Array,
                boi_id: int) -> tuple[jax.Array, jax.Array]:
    """Embedding inputs ``(text_BT, image_in_BI)`` from a caption and its image tokens.

    Text slots are fed as they are (slot ``t`` predicts slot ``t+1``); the image slots get
    ``[BOI, z_0, ..., z_{I-2}]`` so that slot ``T+k`` predicts ``z_k``.
    """
    boi_B1 = jnp.full((image_BI.shape[0], 1), boi_id, image_BI.dtype)
    return text_BT, jnp.concatenate([boi_B1, image_BI[:, :-1]], axis=1)


def unpad(logits_BSV: jax.Array, vocab: int) -> jax.Array:
    """Float32 logits of a padded head without its padding columns (index >= ``vocab``).

    The heads are stored with `TransformerConfig.vocab_multiple` padding so that a
    tensor-sharded vocabulary divides the mesh; cutting the (at most multiple - 1)
    padding columns off the output keeps them out of every softmax, loss and sample.
    """
    return logits_BSV[..., :vocab].astype(jnp.float32)


def _cross_entropy(logits_BSV: jax.Array, targets_BS: jax.Array) -> jax.Array:
    logits_BSV = logits_BSV.astype(jnp.float32)
    target_BS = jnp.take_along_axis(logits_BSV, targets_BS[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits_BSV, axis=-1) - target_BS


def loss_fn(logits_text_BTV: jax.Array, logits_image_BIC: jax.Array, text_BT: jax.Array,
            image_BI: jax.Array, *, text_weight: float = 1 / 8) -> tuple[jax.Array, dict]:
    """``text_weight * mean CE(text) + (1 - text_weight) * mean CE(image)`` (paper §2.2).

    Each mean runs over its own token count: ``B*(T-1)`` text targets (slots ``1..T-1``,
    predicted from slots ``0..T-2``; the logits of slot ``T-1`` are unused) and ``B*I``
    image targets. Returns the loss and ``loss``, ``loss_text``, ``loss_image``,
    ``acc_text``, ``acc_image``.
    """
    logits_text = logits_text_BTV[:, :-1]
    targets_text = text_BT[:, 1:]
    loss_text = _cross_entropy(logits_text, targets_text).mean()
    loss_image = _cross_entropy(logits_image_BIC, image_BI).mean()
    loss = text_weight * loss_text + (1.0 - text_weight) * loss_image
    metrics = {
        "loss": loss,
        "loss_text": loss_text,
        "loss_image": loss_image,
        "acc_text": (jnp.argmax(logits_text, -1) == targets_text).mean(),
        "acc_image": (jnp.argmax(logits_image_BIC, -1) == image_BI).mean(),
    }
    return loss, metrics


# ----------------------------------------------------------------------------- embeddings


def embed_text(text_embed: jax.Array, text_pos: jax.Array, text_BT: jax.Array,
               start: int | jax.Array = 0) -> jax.Array:
    """Float32 embeddings of text slots ``start .. start+T'-1``: token plus slot position."""
    pos_TD = jax.lax.dynamic_slice_in_dim(text_pos, start, text_BT.shape[1], axis=0)
    return jnp.take(text_embed, text_BT, axis=0) + pos_TD[None]


def image_positions(row_embed: jax.Array, col_embed: jax.Array) -> jax.Array:
    """``(I, D)`` position embedding of every image cell: row plus column (App. B.1).

    Cell ``k`` is ``(k // G, k % G)`` in raster order ("broadcasted row and column
    embeddings").
    """
    g, d = row_embed.shape
    return (row_embed[:, None, :] + col_embed[None, :, :]).reshape(g * g, d)


def embed_image(image_embed: jax.Array, row_embed: jax.Array, col_embed: jax.Array,
                image_in_BI: jax.Array, start: int | jax.Array = 0) -> jax.Array:
    """Float32 embeddings of image slots ``start .. start+I'-1`` from their input ids
    (``BOI`` or the previous cell's token)."""
    pos_ID = jax.lax.dynamic_slice_in_dim(image_positions(row_embed, col_embed), start,
                                          image_in_BI.shape[1], axis=0)
    return jnp.take(image_embed, image_in_BI, axis=0) + pos_ID[None]


# ----------------------------------------------------------------------------- layer functions


def _constrain(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, axes)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """LayerNorm over the last axis, computed in float32."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    lead = tuple(range(x.ndim - scale.ndim))  # explicit: no implicit rank promotion
    return (x - mean) * jax.lax.rsqrt(var + LN_EPS) * jnp.expand_dims(scale, lead) \
        + jnp.expand_dims(bias, lead)


def gelu_sigmoid(x: jax.Array) -> jax.Array:
    """``x * sigmoid(1.702 x)``, the Sparse Transformer's GELU approximation (ST §5.2)."""
    return x * jax.nn.sigmoid(1.702 * x)


def _dense(x_BLI: jax.Array, w_IO: jax.Array, b_O: jax.Array) -> jax.Array:
    """``x @ w + b`` over the last axis as one 2-D matmul on ``(B*L, in)``.

    Flattening the leading axes keeps every forward and backward product a plain matmul
    with a single contracting axis, the fast path of XLA's CPU and GPU dot emitters (an
    einsum contracting over both batch and length runs markedly slower on CPU).
    """
    lead = x_BLI.shape[:-1]
    y = x_BLI.reshape(-1, x_BLI.shape[-1]) @ w_IO + jnp.reshape(b_O, (1, -1))
    return y.reshape(lead + (w_IO.shape[-1],))


def qkv_projection(p: dict, h_BLD: jax.Array, dtype: Any,
                   heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries, keys and values ``(B, L, H, K)`` of one layer from the normed input.

    The kernel is stored ``(D, 3, H*K)``: the fused heads x head-width dim is what a
    tensor-parallel mesh axis shards, so a head count that does not divide the tensor
    degree (the paper's 62) still shards.
    """
    d, _, f = p["qkv_kernel"].shape
    qkv = _dense(h_BLD.astype(dtype), p["qkv_kernel"].astype(dtype).reshape(d, 3 * f),
                 p["qkv_bias"].astype(dtype).reshape(3 * f))
    qkv = qkv.reshape(qkv.shape[:-1] + (3, heads, f // heads))
    return tuple(_constrain(qkv[..., i, :, :], _HEAD_AXES) for i in range(3))


# Dense masked attention ``(B, Q, H, K)`` (mask on fp32 logits, fp32 softmax).
# ``mask_QS[q, s]`` allows query ``q`` to see key ``s``; a cached decode step passes the
# mask rows of its query slots against the cached keys.
attend = attention.dense_attend


def attention_branch(p: dict, x_BLD: jax.Array, kind: str,
                     config: TransformerConfig) -> jax.Array:
    """``attention(norm(x))`` of one layer with mask ``kind`` (ST §5.2), in float32."""
    dt = config.compute_dtype
    h_BLD = layer_norm(x_BLD, p["ln1_scale"], p["ln1_bias"])
    q, k, v = qkv_projection(p, h_BLD, dt, config.heads)
    if config.attention == "structured":
        out_BLHK = attention.attend_structured(q, k, v, kind=kind, text_len=config.text_len,
                                               grid=config.grid, kernel=config.conv_kernel)
    else:
        mask_LL = masks.mask(config.text_len, config.grid, kind, kernel=config.conv_kernel)
        out_BLHK = attend(q, k, v, jnp.asarray(mask_LL))
    return attention_output(p, out_BLHK, dt)


def attention_output(p: dict, out_BLHK: jax.Array, dtype: Any) -> jax.Array:
    """The attention output projection ``W_p`` (stored ``(H*K, D)``), returned in float32
    ``(B, L, D)``."""
    out_BLF = out_BLHK.reshape(out_BLHK.shape[:-2] + (-1,))
    y_BLD = _dense(out_BLF, p["out_kernel"].astype(dtype), p["out_bias"].astype(dtype))
    return _constrain(y_BLD.astype(jnp.float32), _X_AXES)


def mlp_branch(p: dict, x_BLD: jax.Array, config: TransformerConfig) -> jax.Array:
    """``W2 f(W1 norm(x) + b1) + b2`` of one layer (ST §5.2), returned in float32."""
    dt = config.compute_dtype
    h_BLD = layer_norm(x_BLD, p["ln2_scale"], p["ln2_bias"]).astype(dt)
    u_BLF = _dense(h_BLD, p["mlp_in_kernel"].astype(dt), p["mlp_in_bias"].astype(dt))
    u_BLF = _constrain(gelu_sigmoid(u_BLF), _MLP_AXES)
    y_BLD = _dense(u_BLF, p["mlp_out_kernel"].astype(dt), p["mlp_out_bias"].astype(dt))
    return _constrain(y_BLD.astype(jnp.float32), _X_AXES)


def _dropout(y: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return y
    keep = jax.random.bernoulli(key, 1.0 - rate, y.shape)
    return jnp.where(keep, y / (1.0 - rate), 0.0)


# The two resblocks of a layer and the layer parameters each one owns. Per-resblock
# gradient scaling keeps one scale per (layer, resblock): column 0 attention, 1 MLP.
RESBLOCKS = ("attn", "mlp")
RESBLOCK_PARAMS = {
    "attn": ("ln1_scale", "ln1_bias", "qkv_kernel", "qkv_bias", "out_kernel", "out_bias"),
    "mlp": ("ln2_scale", "ln2_bias", "mlp_in_kernel", "mlp_in_bias", "mlp_out_kernel",
            "mlp_out_bias"),
}


def grad_scaled(branch: Callable, p: PyTree, x: jax.Array, scale: jax.Array) -> jax.Array:
    """``branch(p, x)``, whose backward pass runs at gradient scale ``scale``.

    The mixed-precision scheme of the paper (§2.4, App. D): the incoming float32 residual
    gradient is multiplied by ``scale`` before it enters the 16-bit branch (where the
    cast to the compute dtype rounds it), the branch runs backward in the compute dtype,
    the activation gradient that leaves it has every non-finite value set to zero (so an
    overflow here cannot lower the scales of the resblocks before it) and is divided by
    ``scale`` before it joins the float32 residual gradient. The gradients of ``p`` are
    returned *still multiplied* by ``scale``: the optimizer transform that owns the
    scales (`dalle_jax.train.optim.per_resblock_grad_scaling`) divides them, checks them
    for non-finite values and updates the scale. ``scale`` gets no gradient.
    """

    @jax.custom_vjp
    def run(p, x, scale):
        return branch(p, x)

    def fwd(p, x, scale):
        y, vjp = jax.vjp(branch, p, x)
        return y, (vjp, scale)

    def bwd(res, g):
        vjp, scale = res
        dp, dx = vjp(g * scale.astype(g.dtype))
        dx = jnp.where(jnp.isfinite(dx), dx, jnp.zeros_like(dx)) / scale.astype(dx.dtype)
        return dp, dx, jnp.zeros_like(scale)

    run.defvjp(fwd, bwd)
    return run(p, x, scale)


def layer_forward(p: dict, x_BLD: jax.Array, key: jax.Array | None,
                  scales: jax.Array | None = None, *, kind: str,
                  config: TransformerConfig) -> jax.Array:
    """One layer with mask ``kind``: two pre-LN resblocks on the float32 residual stream
    (ST §5.2).

    ``scales`` (shape ``(2,)``: attention, MLP), when given, runs each resblock's backward
    pass at its own gradient scale (`grad_scaled`).
    """
    branches = {"attn": functools.partial(attention_branch, kind=kind, config=config),
                "mlp": functools.partial(mlp_branch, config=config)}
    keys = (None, None) if key is None else tuple(jax.random.split(key))
    for i, name in enumerate(RESBLOCKS):
        p_block = {n: p[n] for n in RESBLOCK_PARAMS[name]}
        if scales is None:
            y_BLD = branches[name](p_block, x_BLD)
        else:
            y_BLD = grad_scaled(branches[name], p_block, x_BLD, scales[i])
        x_BLD = x_BLD + _dropout(y_BLD, config.dropout, keys[i])
    return _constrain(x_BLD, _X_AXES)


def _remat(fn: Callable, config: TransformerConfig) -> Callable:
    if config.remat == "none":
        return fn
    # "full" saves nothing inside the layer (paper §2.4: recompute the activations within
    # the resblocks). "dots" keeps the outputs of the weight matmuls, which have no
    # dot_general batch dims, and recomputes the (B, H, L, L) attention products, norms and
    # activations.
    policy = (None if config.remat == "full"
              else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    # Under scan, CSE across iterations cannot undo the remat, so the guard is not needed.
    return jax.checkpoint(fn, policy=policy, prevent_cse=not config.scan_layers)


# ----------------------------------------------------------------------------- module


class ParamSpec(NamedTuple):
    """Shape, logical axes and initial distribution of one parameter.

    ``live`` (normal init only): the leading block that is drawn; the rest of ``shape``
    (vocabulary padding) starts at zero. None: the whole shape is drawn.
    """

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str  # "normal" (mean 0, stddev `std`), "zeros" or "ones"
    std: float = 0.0
    live: tuple[int, ...] | None = None

    @property
    def drawn_shape(self) -> tuple[int, ...]:
        return self.shape if self.live is None else self.live

    def from_noise(self, noise: jax.Array) -> jax.Array:
        """The initial value from standard-normal ``noise`` of `drawn_shape`."""
        value = noise.reshape(self.drawn_shape) * self.std
        pad = [(0, s - d) for s, d in zip(self.shape, self.drawn_shape)]
        return jnp.pad(value, pad) if any(p for _, p in pad) else value

    def initializer(self) -> Callable:
        if self.init == "normal":
            def init(key, shape, dtype=jnp.float32):
                return self.from_noise(jax.random.normal(key, self.drawn_shape, dtype))

            return init
        return nn.initializers.zeros if self.init == "zeros" else nn.initializers.ones


def param_specs(config: TransformerConfig) -> dict[str, Any]:
    """Every parameter's `ParamSpec`, nested like the ``params`` collection.

    Init follows the Sparse Transformer (ST §6; whether DALL·E kept it is not
    stated), with every "N(0, s)" read as a standard deviation and ``s = init_scale``
    (ST: 0.125):

    * token embeddings N(0, s/sqrt(D)); position embeddings N(0, s/sqrt(D * n_emb)),
      n_emb = number of embeddings summed into a slot: 2 for text (token + position), 3 for
      image (token + row + column, App. B.1);
    * weights N(0, s/sqrt(d_in)), biases 0, LayerNorm gains 1;
    * the two matrices that write into the residual stream (attention output W_p and the
      second MLP matrix W2) further scaled by 1/sqrt(2 * depth), so the stream's variance
      stays O(1) across the 2 * depth resblocks;
    * the output (logit) matrices 0, so the first prediction is uniform per modality;
    * vocabulary padding rows (`TransformerConfig.vocab_multiple`) 0: only the real rows
      are drawn, so the padding does not change the values of the others.
    """
    c = config
    n, d, h, k, f = c.depth, c.width, c.heads, c.head_dim, c.mlp_width
    res = 1.0 / math.sqrt(2 * n)
    s = c.init_scale
    w_in = s / math.sqrt(d)
    lnd = ("layers", "embed")
    ones = lambda shape, axes: ParamSpec(shape, axes, "ones")  # noqa: E731
    zeros = lambda shape, axes: ParamSpec(shape, axes, "zeros")  # noqa: E731
    normal = lambda shape, axes, std, live=None: ParamSpec(  # noqa: E731
        shape, axes, "normal", std, live)
    layers = {
        "ln1_scale": ones((n, d), lnd),
        "ln1_bias": zeros((n, d), lnd),
        "qkv_kernel": normal((n, d, 3, h * k), ("layers", "embed", None, "attn"), w_in),
        "qkv_bias": zeros((n, 3, h * k), ("layers", None, "attn")),
        "out_kernel": normal((n, h * k, d), ("layers", "attn", "embed"),
                             s / math.sqrt(h * k) * res),
        "out_bias": zeros((n, d), lnd),
        "ln2_scale": ones((n, d), lnd),
        "ln2_bias": zeros((n, d), lnd),
        "mlp_in_kernel": normal((n, d, f), ("layers", "embed", "mlp"), w_in),
        "mlp_in_bias": zeros((n, f), ("layers", "mlp")),
        "mlp_out_kernel": normal((n, f, d), ("layers", "mlp", "embed"),
                                 s / math.sqrt(f) * res),
        "mlp_out_bias": zeros((n, d), lnd),
    }
    return {
        "text_embed": normal((c.text_vocab_padded, d), ("vocab", "embed"), s / math.sqrt(d),
                             (c.text_vocab, d)),
        "text_pos": normal((c.text_len, d), ("length", "embed"), s / math.sqrt(2 * d)),
        "image_embed": normal((c.image_embed_rows, d), ("vocab", "embed"), s / math.sqrt(d),
                              (c.image_vocab + 1, d)),
        "row_embed": normal((c.grid, d), ("height", "embed"), s / math.sqrt(3 * d)),
        "col_embed": normal((c.grid, d), ("width", "embed"), s / math.sqrt(3 * d)),
        "layers": layers,
        "final_ln_scale": ones((d,), ("embed",)),
        "final_ln_bias": zeros((d,), ("embed",)),
        "text_head": zeros((d, c.text_vocab_padded), ("embed", "vocab")),
        "image_head": zeros((d, c.image_vocab_padded), ("embed", "vocab")),
    }


def _param(module: nn.Module, name: str, spec: ParamSpec) -> jax.Array:
    init = nn.with_logical_partitioning(spec.initializer(), spec.axes)
    return module.param(name, init, spec.shape, jnp.float32)


class LayerStack(nn.Module):
    """The parameters of every layer, stacked on a leading ``layers`` axis."""

    config: TransformerConfig

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        specs = param_specs(self.config)["layers"]
        return {name: _param(self, name, spec) for name, spec in specs.items()}


class Transformer(nn.Module):
    """Text + image transformer: ``(text_BT, image_BI) -> (logits_text_BTV, logits_image_BIC)``.

    Parameters (the ``params`` collection)::

        text_embed   (text_vocab, D)        text_pos  (T, D)
        image_embed  (image_vocab + 1, D)   row_embed (G, D)   col_embed (G, D)
        layers/<name> (depth, ...)          see `LayerStack`
        final_ln_scale, final_ln_bias (D,)
        text_head    (D, text_vocab)        image_head (D, image_vocab)
    """

    config: TransformerConfig

    def setup(self):
        specs = param_specs(self.config)
        self.text_embed = _param(self, "text_embed", specs["text_embed"])
        self.text_pos = _param(self, "text_pos", specs["text_pos"])
        self.image_embed = _param(self, "image_embed", specs["image_embed"])
        self.row_embed = _param(self, "row_embed", specs["row_embed"])
        self.col_embed = _param(self, "col_embed", specs["col_embed"])
        self.layers = LayerStack(self.config)
        self.final_ln_scale = _param(self, "final_ln_scale", specs["final_ln_scale"])
        self.final_ln_bias = _param(self, "final_ln_bias", specs["final_ln_bias"])
        self.text_head = _param(self, "text_head", specs["text_head"])
        self.image_head = _param(self, "image_head", specs["image_head"])

    def __call__(self, text_BT: jax.Array, image_BI: jax.Array, *,
                 deterministic: bool = True,
                 grad_scales: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Logits of every target from a caption's text slots and its image tokens.

        ``grad_scales`` ``(depth, 2)`` (attention, MLP per layer) turns on per-resblock
        gradient scaling in the backward pass (`grad_scaled`); the forward is unchanged.
        """
        text_in_BT, image_in_BI = make_inputs(text_BT, image_BI, self.config.boi_id)
        x_BLD = self.embed(text_in_BT, image_in_BI)
        return self.from_embeddings(x_BLD, deterministic=deterministic,
                                    grad_scales=grad_scales)

    def create_params(self) -> None:
        """Creates every parameter without a forward pass (``init(rng, method=...)``)."""
        self.layers()
        _ = self.text_embed  # any attribute access runs `setup`

    def embed(self, text_BT: jax.Array, image_in_BI: jax.Array) -> jax.Array:
        """Float32 slot embeddings ``(B, L, D)`` (paper App. B.1, Fig. 10)."""
        text_BTD = embed_text(self.text_embed, self.text_pos, text_BT)
        image_BID = embed_image(self.image_embed, self.row_embed, self.col_embed, image_in_BI)
        return _constrain(jnp.concatenate([text_BTD, image_BID], axis=1), _X_AXES)

    def encode(self, x_BLD: jax.Array, *, deterministic: bool = True,
               grad_scales: jax.Array | None = None) -> jax.Array:
        """The layer stack and the final LayerNorm: ``(B, L, D) -> (B, L, D)`` float32."""
        c = self.config
        if grad_scales is not None and grad_scales.shape != (c.depth, len(RESBLOCKS)):
            raise ValueError(f"grad_scales must have shape {(c.depth, len(RESBLOCKS))}, got "
                             f"{grad_scales.shape}")
        params = self.layers()
        kinds = c.layer_kinds()
        distinct = tuple(dict.fromkeys(kinds))
        keys = None
        if c.dropout > 0.0 and not deterministic:
            keys = jax.random.split(self.make_rng("dropout"), c.depth)
        # One (rematerialised) layer function per distinct mask kind.
        layer = {k: _remat(functools.partial(layer_forward, kind=k, config=c), c)
                 for k in distinct}
        x_BLD = x_BLD.astype(jnp.float32)
        if c.scan_layers:
            branches = [layer[k] for k in distinct]
            index = jnp.asarray([distinct.index(k) for k in kinds], jnp.int32)

            def body(x, xs):
                p_l, kind_l, key_l, scales_l = xs
                if len(branches) == 1:
                    return branches[0](p_l, x, key_l, scales_l), None
                return jax.lax.switch(kind_l, branches, p_l, x, key_l, scales_l), None

            x_BLD, _ = jax.lax.scan(body, x_BLD, (params, index, keys, grad_scales))
        else:
            for l in range(c.depth):
                p_l = jax.tree.map(lambda a: a[l], params)
                x_BLD = layer[kinds[l]](p_l, x_BLD, None if keys is None else keys[l],
                                        None if grad_scales is None else grad_scales[l])
        return layer_norm(x_BLD, self.final_ln_scale, self.final_ln_bias)

    def logits(self, h_BLD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Float32 text logits on the text slots and image logits on the image slots.

        Their last dims are ``text_vocab`` and ``image_vocab`` (the heads' padding columns
        are cut off, `unpad`).
        """
        c = self.config
        h_BLD = h_BLD.astype(jnp.float32)
        logits_text_BTV = unpad(_dense(h_BLD[:, :c.text_len], self.text_head, 0.0),
                                c.text_vocab)
        logits_image_BIC = unpad(_dense(h_BLD[:, c.text_len:], self.image_head, 0.0),
                                 c.image_vocab)
        return _constrain(logits_text_BTV, _LOGIT_AXES), _constrain(logits_image_BIC, _LOGIT_AXES)

    def from_embeddings(self, x_BLD: jax.Array, *, deterministic: bool = True,
                        grad_scales: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """`logits` of `encode`: the model from slot embeddings on."""
        return self.logits(self.encode(x_BLD, deterministic=deterministic,
                                       grad_scales=grad_scales))


# ----------------------------------------------------------------------------- helpers


def init_variables(config: TransformerConfig, rng: jax.Array, *,
                   one_draw: bool | None = None) -> dict[str, Any]:
    """``{"params": ...}`` with leaves boxed with their logical axes; jittable, no forward pass.

    Same distributions as ``Transformer(config).init`` (`param_specs`). With ``one_draw``
    every normal parameter is cut from a single draw: XLA on CPU compiles each PRNG call
    separately, and even ten of them take several seconds to compile on a small machine.
    Without it each parameter gets its own draw, so a sharded init of a large model never
    builds one unsharded noise vector. The default (None) picks one draw up to
    ``_ONE_DRAW_MAX`` normal scalars. The two modes give different values for one seed.
    """
    init = functools.partial(Transformer(config).init, method=Transformer.create_params)
    boxed = jax.eval_shape(init, jax.random.key(0))["params"]
    is_spec = lambda x: isinstance(x, ParamSpec)  # noqa: E731
    specs, treedef = jax.tree.flatten(param_specs(config), is_leaf=is_spec)
    sizes = [math.prod(s.drawn_shape) if s.init == "normal" else 0 for s in specs]
    if one_draw is None:
        one_draw = sum(sizes) <= _ONE_DRAW_MAX
    noise = jax.random.normal(rng, (sum(sizes),), jnp.float32) if one_draw else None
    values, offset = [], 0
    for i, (spec, size) in enumerate(zip(specs, sizes)):
        if spec.init != "normal":
            values.append(jnp.full(spec.shape, 1.0 if spec.init == "ones" else 0.0, jnp.float32))
        elif one_draw:
            values.append(spec.from_noise(noise[offset:offset + size]))
            offset += size
        else:
            key = jax.random.fold_in(rng, i)
            values.append(spec.from_noise(jax.random.normal(key, spec.drawn_shape,
                                                            jnp.float32)))
    is_box = lambda b: isinstance(b, nn.meta.AxisMetadata)  # noqa: E731
    params = jax.tree.map(lambda b, v: b.replace_boxed(v), boxed,
                          jax.tree.unflatten(treedef, values), is_leaf=is_box)
    return {"params": params}


def abstract_variables(config: TransformerConfig) -> dict[str, Any]:
    """Shapes, dtypes and logical axes of `init_variables`, allocating nothing."""
    return jax.eval_shape(functools.partial(init_variables, config), jax.random.key(0))
