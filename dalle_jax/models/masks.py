"""Attention masks of the stage-2 transformer (paper §2.2, App. B.1, Fig. 11), as NumPy data.

Sequence layout (see `dalle_jax.models.transformer`): ``T`` text slots, then ``I = G*G`` image slots. Image slot
``T + k`` holds ``[BOI, z_0, ..., z_{I-2}][k]``, predicts ``z_k`` and carries the row/column
embedding of cell ``k``, so every image rule below is written on slot indices: for an image
query ``k`` and image key ``k'`` (both counted from the first image slot), ``d = k - k'``.

Rules shared by every kind (paper §2.2): a text query ``q`` sees text keys ``j <= q``; an
image query sees every text slot (pads included, they are never masked) plus the image keys
its kind allows. Every mask is causal in slot order (``j <= q``) and every query sees itself.

Kinds (``allowed[q, j]`` is true when query ``q`` may attend to key ``j``):

* ``dense``: plain causal attention.
* ``row`` (Fig. 11a): ``0 <= d <= G``, the current row up to the query plus the tail of the
  previous row, down to the cell right above (G + 1 keys, wrapping across the row boundary).
* ``column`` (Fig. 11b): ``d >= 0`` and ``d % G == 0``, the cells above in the same column.
* ``column_transposed`` (Fig. 11c): the column mask in *transposed* image order (cell
  ``(r, c)`` moved to position ``c*G + r``), where it becomes block-diagonal and
  lower-triangular. The paper uses it for GPU efficiency; `transpose_permutation` maps slots.
* ``conv_raster`` / ``conv_2d`` (Fig. 11d): the causal half of a centred ``kernel x kernel``
  window (default 11, the paper's size). See `mask` for the two readings; ``conv`` is
  ``conv_raster``.
"""

from __future__ import annotations

import numpy as np

KINDS = ("dense", "row", "column", "column_transposed", "conv_raster", "conv_2d")
# "conv" is the paper's convolutional mask under our default reading (see `mask`).
ALIASES = {"conv": "conv_raster"}
# Kinds a layer pattern may name. The model attends in raster order, so the transposed
# column mask is not among them; "conv" is resolved with the model's conv_kind setting.
LAYER_KINDS = ("dense", "row", "column", "conv", "conv_raster", "conv_2d")

PAPER_CONV_KERNEL = 11  # paper Fig. 11 caption: "a mask corresponding to an 11x11 kernel"


def _check(text_len: int, grid: int, kernel: int) -> None:
    if text_len < 1 or grid < 1:
        raise ValueError(f"need text_len >= 1 and grid >= 1, got text_len={text_len}, grid={grid}")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"conv kernel must be a positive odd number, got {kernel}")


def conv_raster_offsets(grid: int, kernel: int = PAPER_CONV_KERNEL) -> np.ndarray:
    """Allowed raster offsets ``d`` of the causal half of a centred ``kernel x kernel`` window.

    ``{dr*G + dc : 1 <= dr <= h, -h <= dc <= h} | {0, ..., h}`` with ``h = kernel // 2``:
    ``h`` full rows above the query plus the query's own row up to itself.
    """
    h = kernel // 2
    above = [dr * grid + dc for dr in range(1, h + 1) for dc in range(-h, h + 1)]
    return np.unique(np.asarray(above + list(range(h + 1)), np.int64))


def mask(text_len: int, grid: int, kind: str, *, kernel: int = PAPER_CONV_KERNEL) -> np.ndarray:
    """The ``(L, L)`` boolean mask ``allowed[q, j]`` of one attention kind, ``L = T + G*G``.

    Convolutional kinds, both the causal half of a centred ``kernel x kernel`` window on the
    G x G grid (the paper says only "a causal convolutional attention pattern with
    wraparound behavior ... 11x11 kernel", which admits two readings):

    * ``conv_raster`` (reading B, the default ``conv``): the window's offsets applied to the
      flat raster index, so a window that runs off the right edge continues at the start of
      the next row. Chosen because the paper describes the pattern as having "wraparound
      behavior (similar to the row attention)", and the row mask wraps in exactly this raster
      sense; it also gives every query past the first ``h*G + h`` cells the same key count
      and a clean diagonal band.
    * ``conv_2d`` (reading A): the same window on 2-D coordinates, ``|r - r'| <= h`` and
      ``|c - c'| <= h``, clipped at the borders, no wrap.

    For ``column_transposed`` the rows and columns are in transposed slot order (see
    `transpose_permutation`); every other kind uses raster slot order.
    """
    _check(text_len, grid, kernel)
    kind = ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; choose one of {KINDS + tuple(ALIASES)}")
    n = text_len + grid * grid
    q = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    causal = j <= q
    if kind == "dense":
        return causal
    img = (q >= text_len) & (j >= text_len)
    if kind == "column_transposed":
        # Transposed order: same column <=> same block of G consecutive image slots, and
        # "row above" <=> earlier inside the block, so the image part is block-diagonal.
        same_block = (q - text_len) // grid == (j - text_len) // grid
        return causal & ~(img & ~same_block)
    d = q - j
    if kind == "row":
        image_ok = d <= grid
    elif kind == "column":
        image_ok = d % grid == 0
    elif kind == "conv_raster":
        image_ok = np.isin(d, conv_raster_offsets(grid, kernel))
    else:  # conv_2d
        h = kernel // 2
        rq, cq = np.divmod(q - text_len, grid)
        rk, ck = np.divmod(j - text_len, grid)
        image_ok = (np.abs(rq - rk) <= h) & (np.abs(cq - ck) <= h)
    # Text queries and image->text pairs keep plain causality; only image->image is thinned.
    return causal & ~(img & ~image_ok)


def transpose_permutation(text_len: int, grid: int) -> np.ndarray:
    """Slot permutation ``perm`` into transposed image order: ``x_t = x[perm]``.

    Text slots stay in place; transposed image position ``c*G + r`` takes raster cell
    ``r*G + c``. Hence ``mask(T, G, "column")[perm][:, perm] == mask(T, G,
    "column_transposed")``.
    """
    _check(text_len, grid, 1)
    r, c = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    # Position p = c*G + r of the transposed order holds raster cell r*G + c.
    image = (r * grid + c).T.reshape(-1)
    return np.concatenate([np.arange(text_len), text_len + image])


def layer_kinds(n_layers: int, pattern: str = "paper") -> tuple[str, ...]:
    """The mask kind of each layer, 0-indexed.

    ``pattern``:

    * ``"paper"`` (App. B.1): conv for the last layer; otherwise column when
      ``l % 4 == 1`` and row elsewhere, so layers start "row, column, row, row" (the paper's
      1-indexed rule "column if i - 2 mod 4 = 0").
    * ``"dense"``: every layer plain causal.
    * an explicit comma list with one kind per layer, e.g. ``"row,column,row,conv"``.
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    if pattern == "paper":
        return tuple("conv" if l == n_layers - 1 else "column" if l % 4 == 1 else "row"
                      for l in range(n_layers))
    if pattern == "dense":
        return ("dense",) * n_layers
    kinds = tuple(k.strip() for k in pattern.split(","))
    bad = [k for k in kinds if k not in LAYER_KINDS]
    if bad:
        raise ValueError(f"attention pattern {pattern!r} has unknown kinds {bad}; use 'paper', "
                         f"'dense' or a comma list of {LAYER_KINDS}")
    if len(kinds) != n_layers:
        raise ValueError(f"attention pattern {pattern!r} names {len(kinds)} layers, "
                         f"the model has {n_layers}")
    return kinds
