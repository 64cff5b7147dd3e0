"""Structured masked attention: the sparse masks of `masks` computed without their zeros.

`attend_structured` returns what dense masked attention (`dense_attend` with
``masks.mask(T, G, kind)``) returns, but only computes the query-key logits that the mask
can allow, so its cost falls with the mask's density. The sequence is ``T`` text slots
followed by ``I = G*G`` image slots in raster order, and every mask kind shares three facts
(see `masks`), which split the ``(L, L)`` mask into independent blocks:

* text queries see text keys causally and never an image key, so they are a plain causal
  attention over the ``T`` text slots (the ``T x I`` block is never computed);
* image queries see *every* text key, so their text logits need no mask at all;
* image queries see image keys only through their kind's rule, which is local in the grid.

Each image query therefore runs one softmax over ``[T text keys] ++ [its candidate image
keys]``. The two groups of logits are kept apart and joined by a shared max and a shared
denominator (`_joint_softmax`), which is algebraically the softmax over the concatenated
row; the masked-out keys of the dense row contribute ``exp(-huge) == 0`` there, so leaving
them out changes nothing. Candidate image keys per kind:

* ``row``, ``conv_raster``, ``conv_2d`` (row band): the allowed image keys of a query in
  image row ``r`` lie in rows ``r-w .. r``. For ``row`` ``w = 1`` (offsets ``0..G`` reach
  back to the cell right above); for ``conv_2d`` ``w = kernel // 2``; for ``conv_raster``
  ``w = kernel // 2 + 1``, because a raster offset ``h*G + h`` wraps into the row before
  the window's top row (all clipped to ``G - 1``). ``w`` is not hard-coded: it is read off
  the mask itself. The keys of rows ``r-w .. r`` are gathered by stacking row-shifted
  copies of the ``(B, H, G, G, K)`` image keys (zero rows above row 0), which gives each
  query row a window of ``(w+1)*G`` keys. A static mask of the window, built by indexing
  ``masks.mask`` at exactly those (query, key) pairs, keeps the allowed ones, so the two
  can never disagree. Cost per image query: ``T + (w+1)*G`` logits instead of ``L``.
  Optionally ``nb`` consecutive query rows share one window of rows ``r0-w .. r0+nb-1``
  (``rows_per_block``; ``nb = 1`` is the minimal form above): ``T + (nb+w)*G`` logits per
  query, but ``nb*G``-row matmuls and ``(nb+w)/nb`` key copies instead of ``w+1``. The
  default groups rows until a block holds 32 query cells, at most ``w`` rows, so it is one
  row for ``row`` (``w = 1``) and for any kind once ``G >= 32``.
* ``column``: ``d % G == 0`` means same column, so with the image part reshaped to
  ``(B, G_rows, G_cols, H, K)`` each column is its own causal sequence of ``G`` cells: a
  lower-triangular ``(G, G)`` mask per column, ``T + G`` logits per image query. This is
  the paper's transposed column mask (Fig. 11c), obtained by reshaping instead of
  permuting the sequence.
* ``dense``, any band whose one-row window already covers the image (``(w+1)*G >= I``),
  and any band that would still compute more than `BAND_MAX_RATIO` of the dense logits
  (e.g. the paper's 11x11 conv mask on an 8x8 grid): the dense masked path.

The block structure is checked against ``masks.mask`` when a layout is first built (text
never sees image, image sees all text, no allowed key outside the window), so a change to
the mask formulas that broke it raises instead of silently computing another mask.

Numerics follow `dense_attend`: logits scaled by ``1/sqrt(K)`` with float32 accumulation,
float32 softmax, probabilities cast to ``v``'s dtype for the value matmul (so the matmuls
run in the dtype of q/k/v, e.g. bfloat16), output in ``v``'s dtype with the ``(batch,
length, heads, kv)`` logical-axis constraint. Inside, q/k/v are moved to a head-major
``(B, H, ...)`` layout once, so every block matmul is a plain batched matmul with no
per-einsum transposes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.models import masks

# Finite stand-in for -inf on masked logits (as in the transformer): every row keeps at
# least one allowed key (itself), so no softmax row is fully masked.
_MASKED = float(np.finfo(np.float32).min)
_HEAD_AXES = ("batch", "length", "heads", "kv")
STRUCTURED_KINDS = ("dense", "row", "column", "conv_raster", "conv_2d")
# Default band blocking: query rows are grouped until a block holds this many cells
# (capped at w rows). Small per-row matmuls run far below peak; at G >= 32 this is 1 row.
_MIN_BLOCK_QUERIES = 32
# A band layer whose structured logits are more than this fraction of the dense L x L
# takes the dense path instead: the window copies and the gradient sums over them cost
# more than the logits they save. Measured on CPU (fwd + bwd of one layer, B=16, H=4,
# K=64): conv_raster at T=32, G=8 (ratio 0.72) is 2.0x slower banded than dense; at T=64,
# G=16 (ratio 0.52) banding is 1.3x faster; row at T=32, G=8 (0.44) is a tie.
BAND_MAX_RATIO = 0.6


def _constrain(x: jax.Array) -> jax.Array:
    return nn.with_logical_constraint(x, _HEAD_AXES)


def _scaled(q: jax.Array) -> jax.Array:
    return q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)  # ST §5.2: 1/sqrt(d_head)


def dense_attend(q_BQHK: jax.Array, k_BSHK: jax.Array, v_BSHK: jax.Array,
                 mask_QS: jax.Array) -> jax.Array:
    """Dense masked attention ``(B, Q, H, K)``: mask applied to fp32 logits, fp32 softmax."""
    logits_BHQS = jnp.einsum("bqhk,bshk->bhqs", _scaled(q_BQHK), k_BSHK,
                             preferred_element_type=jnp.float32)
    logits_BHQS = jnp.where(mask_QS, logits_BHQS, _MASKED)
    probs_BHQS = jax.nn.softmax(logits_BHQS, axis=-1)
    out_BQHK = jnp.einsum("bhqs,bshk->bqhk", probs_BHQS.astype(v_BSHK.dtype), v_BSHK)
    return _constrain(out_BQHK.astype(v_BSHK.dtype))


# ----------------------------------------------------------------------------- layouts


class _Layout(NamedTuple):
    """Static description of how one (kind, T, G, kernel, rows_per_block) is computed."""

    path: str  # "dense", "band" or "column"
    window: int  # w: image rows above the query row that the band reaches (band only)
    text_QS: np.ndarray  # (T, T) text-to-text mask
    image: np.ndarray | None  # band: (G/nb, nb*G, (nb+w)*G); column: (G, G, G) as [c, r, r']
    rows_per_block: int = 1  # nb: image query rows that share one key window (band only)


def _band_width(image_II: np.ndarray, grid: int) -> int:
    """Largest ``row(query) - row(key)`` over the allowed image pairs."""
    qi, ki = np.nonzero(image_II)
    return int((qi // grid - ki // grid).max())


@functools.lru_cache(maxsize=None)
def _layout(kind: str, text_len: int, grid: int, kernel: int,
            rows_per_block: int | None = None,
            band_max_ratio: float = BAND_MAX_RATIO) -> _Layout:
    kind = masks.ALIASES.get(kind, kind)
    if kind not in STRUCTURED_KINDS:
        raise ValueError(f"attend_structured supports kinds "
                         f"{STRUCTURED_KINDS + tuple(masks.ALIASES)}, got {kind!r}")
    full_LL = masks.mask(text_len, grid, kind, kernel=kernel)
    t, g, n_img = text_len, grid, grid * grid
    text_QS = full_LL[:t, :t]
    if kind == "dense":
        return _Layout("dense", 0, text_QS, None)
    # The decomposition relies on these; fail loudly if the mask formulas ever change.
    if full_LL[:t, t:].any():
        raise AssertionError(f"{kind}: a text query sees an image key")
    if not full_LL[t:, :t].all():
        raise AssertionError(f"{kind}: an image query does not see every text key")
    image_II = full_LL[t:, t:]
    image_4 = image_II.reshape(g, g, g, g)  # [r, c, r', c']
    rows = np.arange(g)
    if kind == "column":
        if g >= n_img:
            return _Layout("dense", 0, text_QS, None)
        same_col = np.arange(g)[:, None] == np.arange(g)[None, :]
        if image_4.transpose(0, 2, 1, 3)[:, :, ~same_col].any():  # [r, r', c, c']
            raise AssertionError("column: an image query sees another column")
        # [c, r, r'] = allowed[(r, c), (r', c)]: the two indexed axes broadcast to the front.
        col_CRS = image_4[:, rows, :, rows]
        return _Layout("column", 0, text_QS, np.ascontiguousarray(col_CRS))
    w = _band_width(image_II, g)
    if (w + 1) * g >= n_img:  # the window would cover the whole image: nothing to save
        return _Layout("dense", w, text_QS, None)
    if rows_per_block is None:
        # Blocks of at least _MIN_BLOCK_QUERIES query cells, but never more than w rows,
        # so the window grows by less than 2x over the one-row window.
        rows_per_block = min(w, -(-_MIN_BLOCK_QUERIES // g))
    nb = max(1, min(rows_per_block, g - w - 1))  # keep the window smaller than the image
    # Query block i holds image rows i*nb .. i*nb + nb - 1 (rows past G are padding); its
    # window slot (s, c') holds image row i*nb - w + s, column c'.
    n_blocks = -(-g // nb)
    q_row = np.arange(n_blocks)[:, None] * nb + np.arange(nb)[None, :]  # (i, a)
    k_row = np.arange(n_blocks)[:, None] * nb - w + np.arange(nb + w)[None, :]  # (i, s)
    band = image_4[np.clip(q_row, None, g - 1)[:, :, None], :,
                   np.clip(k_row, 0, g - 1)[:, None, :], :]  # (i, a, s, c, c')
    valid = (q_row < g)[:, :, None] & ((k_row >= 0) & (k_row < g))[:, None, :]
    band = band & valid[..., None, None]
    band_NQW = np.transpose(band, (0, 1, 3, 2, 4)).reshape(n_blocks, nb * g, (nb + w) * g)
    # No allowed key may lie outside the window (the rows below r are excluded by causality).
    if int(band_NQW.sum()) != int(image_II.sum()):
        raise AssertionError(f"{kind}: allowed image keys outside the {nb + w}-row window")
    banded = _logits_computed("band", t, g, band_NQW)
    if banded > band_max_ratio * _logits_computed("dense", t, g, None):  # too little saved
        return _Layout("dense", w, text_QS, None)
    return _Layout("band", w, text_QS, np.ascontiguousarray(band_NQW), nb)


def _logits_computed(path: str, text_len: int, grid: int, image: np.ndarray | None) -> int:
    """Query-key logits one (batch element, head) computes on ``path``: the ``T x T`` text
    block and ``I x T`` image-to-text block, plus the path's image block (the band's
    ``image`` mask, window and block padding included, or ``G`` keys per column query);
    the dense path computes all ``L x L``."""
    t, n_img = text_len, grid * grid
    if path == "band":
        return t * t + n_img * t + image.size
    if path == "column":
        return t * t + n_img * t + n_img * grid
    return (t + n_img) ** 2


def attention_cost(kind: str, text_len: int, grid: int,
                   kernel: int = masks.PAPER_CONV_KERNEL,
                   rows_per_block: int | None = None,
                   band_max_ratio: float = BAND_MAX_RATIO) -> dict:
    """Query-key logits computed per batch element and head, structured vs dense.

    Returns ``{"kind", "path", "window", "rows_per_block", "allowed", "structured", "dense",
    "ratio"}``: ``allowed`` is the number of true mask entries (the floor any method must
    compute), ``structured`` what `attend_structured` computes (full ``T x T`` text block,
    ``I x T`` image-to-text block and the per-kind image block, window and block padding
    included), ``dense`` the ``L x L`` of dense attention and ``ratio = structured / dense``.
    """
    lay = _layout(kind, text_len, grid, kernel, rows_per_block, band_max_ratio)
    dense = _logits_computed("dense", text_len, grid, None)
    structured = _logits_computed(lay.path, text_len, grid, lay.image)
    allowed = int(masks.mask(text_len, grid, kind, kernel=kernel).sum())
    return {"kind": masks.ALIASES.get(kind, kind), "path": lay.path, "window": lay.window,
            "rows_per_block": lay.rows_per_block, "allowed": allowed,
            "structured": structured, "dense": dense, "ratio": structured / dense}


# ----------------------------------------------------------------------------- compute


def _joint_softmax(*logits: jax.Array) -> tuple[jax.Array, ...]:
    """Softmax over the concatenation of ``logits`` along the last axis, returned in pieces.

    All pieces share their leading axes. A common (gradient-free) max and one denominator
    make this exactly ``softmax(concatenate(logits, -1))`` split back, without building
    the concatenated array.
    """
    m = functools.reduce(jnp.maximum, [x.max(-1, keepdims=True) for x in logits])
    m = jax.lax.stop_gradient(m)
    exps = [jnp.exp(x - m) for x in logits]
    denom = functools.reduce(jnp.add, [e.sum(-1, keepdims=True) for e in exps])
    inv = 1.0 / denom
    return tuple(e * inv for e in exps)


def _text_attend(q_BHTK: jax.Array, k_BHTK: jax.Array, v_BHTK: jax.Array,
                 text_QS: np.ndarray) -> jax.Array:
    """Causal attention of the text queries over the text keys only, ``(B, H, T, K)``."""
    logits_BHQS = jnp.einsum("bhqk,bhsk->bhqs", q_BHTK, k_BHTK,
                             preferred_element_type=jnp.float32)
    probs_BHQS = jax.nn.softmax(jnp.where(jnp.asarray(text_QS), logits_BHQS, _MASKED), axis=-1)
    return jnp.einsum("bhqs,bhsk->bhqk", probs_BHQS.astype(v_BHTK.dtype), v_BHTK)


def _text_and_local_attend(q_BHNQK: jax.Array, k_BHTK: jax.Array, v_BHTK: jax.Array,
                           kl_BHNWK: jax.Array, vl_BHNWK: jax.Array,
                           mask_NQW: np.ndarray) -> jax.Array:
    """Groups ``n`` of image queries, each over every text key plus its own ``W`` local keys.

    One softmax per query over ``[T text logits] ++ [W local logits masked by mask_NQW]``;
    returns ``(B, H, N, Q, K)`` in ``v``'s dtype.
    """
    lt_BHNQT = jnp.einsum("bhnqk,bhtk->bhnqt", q_BHNQK, k_BHTK,
                          preferred_element_type=jnp.float32)
    li_BHNQW = jnp.einsum("bhnqk,bhnwk->bhnqw", q_BHNQK, kl_BHNWK,
                          preferred_element_type=jnp.float32)
    li_BHNQW = jnp.where(jnp.asarray(mask_NQW), li_BHNQW, _MASKED)
    pt_BHNQT, pi_BHNQW = _joint_softmax(lt_BHNQT, li_BHNQW)
    dt = v_BHTK.dtype
    # The two partial sums are added in float32 and rounded once, like one dense matmul.
    out_BHNQK = jnp.einsum("bhnqt,bhtk->bhnqk", pt_BHNQT.astype(dt), v_BHTK,
                           preferred_element_type=jnp.float32)
    out_BHNQK += jnp.einsum("bhnqw,bhnwk->bhnqk", pi_BHNQW.astype(dt), vl_BHNWK,
                            preferred_element_type=jnp.float32)
    return out_BHNQK.astype(dt)


def _band_attend(q_BHRCK: jax.Array, k_BHTK: jax.Array, v_BHTK: jax.Array,
                 k_BHRCK: jax.Array, v_BHRCK: jax.Array, w: int, nb: int,
                 band_NQW: np.ndarray) -> jax.Array:
    """Image queries over all text keys plus the image rows ``r - w .. r`` of their row ``r``.

    Query rows go in blocks of ``nb``; a block shares the key window of its ``nb + w`` rows.
    """
    b, h, g, _, kd = k_BHRCK.shape
    n_blocks = band_NQW.shape[0]
    g_pad = n_blocks * nb

    def window(x_BHRCK: jax.Array) -> jax.Array:
        # w zero rows on top (and padding at the bottom), then nb + w row-strided views
        # stacked on a window axis ordered like the static mask: window slot (s, c') of
        # block i holds cell (i*nb - w + s, c').
        pad_BHPCK = jnp.pad(x_BHRCK, ((0, 0), (0, 0), (w, g_pad - g), (0, 0), (0, 0)))
        shifted = [pad_BHPCK[:, :, s:s + g_pad - nb + 1:nb] for s in range(nb + w)]
        return jnp.stack(shifted, axis=3).reshape(b, h, n_blocks, (nb + w) * g,
                                                  x_BHRCK.shape[-1])

    kw_BHNWK, vw_BHNWK = window(k_BHRCK), window(v_BHRCK)
    q_BHRCK = jnp.pad(q_BHRCK, ((0, 0), (0, 0), (0, g_pad - g), (0, 0), (0, 0)))
    q_BHNQK = q_BHRCK.reshape(b, h, n_blocks, nb * g, kd)
    out_BHNQK = _text_and_local_attend(q_BHNQK, k_BHTK, v_BHTK, kw_BHNWK, vw_BHNWK, band_NQW)
    return out_BHNQK.reshape(b, h, g_pad, g, v_BHTK.shape[-1])[:, :, :g]


def _column_attend(q_BHRCK: jax.Array, k_BHTK: jax.Array, v_BHTK: jax.Array,
                   k_BHRCK: jax.Array, v_BHRCK: jax.Array, col_CRS: np.ndarray) -> jax.Array:
    """Image queries over all text keys plus the cells above them in their column."""
    # Column-major grid view: each (b, h, c) is a causal sequence of G cells.
    q_BHCRK, k_BHCRK, v_BHCRK = (jnp.swapaxes(x, 2, 3) for x in (q_BHRCK, k_BHRCK, v_BHRCK))
    out_BHCRK = _text_and_local_attend(q_BHCRK, k_BHTK, v_BHTK, k_BHCRK, v_BHCRK, col_CRS)
    return jnp.swapaxes(out_BHCRK, 2, 3)


def attend_structured(q_BLHK: jax.Array, k_BLHK: jax.Array, v_BLHK: jax.Array, *,
                      kind: str, text_len: int, grid: int,
                      kernel: int = masks.PAPER_CONV_KERNEL,
                      rows_per_block: int | None = None,
                      band_max_ratio: float = BAND_MAX_RATIO) -> jax.Array:
    """Masked attention of mask ``kind`` over ``T`` text + ``G*G`` image slots, ``(B, L, H, K)``.

    Equal to ``dense_attend(q, k, v, masks.mask(text_len, grid, kind, kernel=kernel))`` up to
    float rounding, computing only the logits listed by `attention_cost` (see the module
    docstring). ``kind`` is one of `STRUCTURED_KINDS` or ``"conv"`` (= ``conv_raster``).
    ``rows_per_block`` (band kinds only) is how many image query rows share one key window;
    ``None`` picks the default, and values that would make the window cover the whole image
    are lowered. ``band_max_ratio``: a band kind whose structured logits exceed this
    fraction of the dense ``L x L`` runs the dense path (``1.0`` keeps every band that
    fits). Both change the cost, never the result.
    """
    t, g = text_len, grid
    b, n, h, kd = q_BLHK.shape
    if n != t + g * g or k_BLHK.shape != q_BLHK.shape or v_BLHK.shape[:3] != (b, n, h):
        raise ValueError(f"attend_structured expects q, k, v of shape (B, {t + g * g}, H, K) "
                         f"for text_len={t}, grid={g}; got {q_BLHK.shape}, {k_BLHK.shape}, "
                         f"{v_BLHK.shape}")
    lay = _layout(kind, t, g, kernel, rows_per_block, band_max_ratio)
    if lay.path == "dense":
        mask_LL = masks.mask(t, g, kind, kernel=kernel)
        return dense_attend(q_BLHK, k_BLHK, v_BLHK, jnp.asarray(mask_LL))

    # Head-major layout once, so every matmul below is a plain batched matmul.
    q_BHLK, k_BHLK, v_BHLK = (jnp.swapaxes(x, 1, 2) for x in (_scaled(q_BLHK), k_BLHK, v_BLHK))
    q_t, k_t, v_t = q_BHLK[:, :, :t], k_BHLK[:, :, :t], v_BHLK[:, :, :t]
    out_text_BHTK = _text_attend(q_t, k_t, v_t, lay.text_QS)

    def grid_view(x_BHLK: jax.Array) -> jax.Array:
        return x_BHLK[:, :, t:].reshape(b, h, g, g, x_BHLK.shape[-1])

    q_BHRCK, k_BHRCK, v_BHRCK = grid_view(q_BHLK), grid_view(k_BHLK), grid_view(v_BHLK)
    if lay.path == "band":
        out_BHRCK = _band_attend(q_BHRCK, k_t, v_t, k_BHRCK, v_BHRCK, lay.window,
                                 lay.rows_per_block, lay.image)
    else:
        out_BHRCK = _column_attend(q_BHRCK, k_t, v_t, k_BHRCK, v_BHRCK, lay.image)
    out_img_BHIK = out_BHRCK.reshape(b, h, g * g, v_BLHK.shape[-1])
    out_BHLK = jnp.concatenate([out_text_BHTK, out_img_BHIK.astype(v_BLHK.dtype)], axis=2)
    return _constrain(jnp.swapaxes(out_BHLK, 1, 2).astype(v_BLHK.dtype))
