"""Attention masks: the index formulas (docs/design.md, section 4), density counts and
structural properties."""

import numpy as np
import pytest

from dalle_jax.models import masks


def _reference(text_len: int, grid: int, h: int = 5) -> dict[str, np.ndarray]:
    """The masks' index formulas written out independently in NumPy, for general (T, G, h)."""
    n = text_len + grid * grid
    q = np.arange(n)[:, None]
    k = np.arange(n)[None, :]
    d = q - k
    causal = d >= 0
    img = (q >= text_len) & (k >= text_len)
    rq, cq = (q - text_len) // grid, (q - text_len) % grid
    rk, ck = (k - text_len) // grid, (k - text_len) % grid
    offsets = {dr * grid + dc for dr in range(1, h + 1) for dc in range(-h, h + 1)}
    offsets |= set(range(h + 1))
    return {
        "dense": causal,
        "row": causal & ~(img & (d > grid)),
        "column": causal & ~(img & (d % grid != 0)),
        "conv_2d": causal & ~(img & ~((abs(rq - rk) <= h) & (abs(cq - ck) <= h))),
        "conv_raster": causal & ~(img & ~np.isin(d, list(offsets))),
    }


ALL_KINDS = ("dense", "row", "column", "column_transposed", "conv_raster", "conv_2d")


@pytest.mark.parametrize("text_len,grid,kernel", [(3, 4, 3), (5, 3, 3), (4, 6, 5), (2, 8, 11)])
def test_matches_reference_formulas(text_len, grid, kernel):
    ref = _reference(text_len, grid, kernel // 2)
    for kind, want in ref.items():
        got = masks.mask(text_len, grid, kind, kernel=kernel)
        assert got.dtype == bool and got.shape == want.shape, kind
        np.testing.assert_array_equal(got, want, err_msg=kind)
    np.testing.assert_array_equal(masks.mask(text_len, grid, "conv", kernel=kernel),
                                  ref["conv_raster"])


def test_paper_size_densities():
    # Allowed entries at the paper's size, T=256, G=32 (L=1280).
    want = {"dense": 819_840, "row": 328_304, "column": 311_936,
            "conv_2d": 347_394, "conv_raster": 352_209}
    for kind, count in want.items():
        assert int(masks.mask(256, 32, kind).sum()) == count, kind
    assert int(masks.mask(256, 32, "column_transposed").sum()) == want["column"]


def test_image_keys_per_query_at_paper_size():
    t, g = 256, 32
    row = masks.mask(t, g, "row")[t:, t:].sum(-1)
    col = masks.mask(t, g, "column")[t:, t:].sum(-1)
    conv = masks.mask(t, g, "conv")[t:, t:].sum(-1)
    assert row.max() == 33 and row[g:].min() == 33
    assert col.max() == 32
    # Reading (B): a constant 61 keys once the window is fully inside the sequence.
    h = 5
    assert conv.max() == 61 and conv[h * g + h:].min() == 61


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_common_structure(kind):
    t, g = 4, 5
    m = masks.mask(t, g, kind, kernel=3)
    n = t + g * g
    assert m.shape == (n, n)
    assert not np.triu(m, 1).any(), "a key after the query is visible"
    assert m.diagonal().all(), "a query does not see itself"
    assert not m[:t, t:].any(), "text attends to image"
    np.testing.assert_array_equal(m[:t, :t], np.tril(np.ones((t, t), bool)))
    assert m[t:, :t].all(), "an image query misses a text key"


def test_column_transposed_is_column_in_transposed_order():
    t, g = 3, 4
    perm = masks.transpose_permutation(t, g)
    assert sorted(perm) == list(range(t + g * g))
    np.testing.assert_array_equal(perm[:t], np.arange(t))
    col_t = masks.mask(t, g, "column_transposed")
    inv = np.argsort(perm)
    np.testing.assert_array_equal(col_t[inv][:, inv], masks.mask(t, g, "column"))
    # Fig. 11c: in transposed order the image part is block-diagonal, lower-triangular blocks.
    block = np.tril(np.ones((g, g), bool))
    np.testing.assert_array_equal(col_t[t:, t:], np.kron(np.eye(g, dtype=bool), block))


def test_row_mask_sees_cell_above():
    t, g = 2, 4
    m = masks.mask(t, g, "row")
    k = 2 * g + 1  # cell (2, 1)
    visible = set(np.flatnonzero(m[t + k, t:]))
    # (2, 0..1) and (1, 1..3): the row so far plus the previous row from the cell above.
    assert visible == {2 * g, 2 * g + 1, g + 1, g + 2, g + 3}


def test_layer_pattern():
    kinds = masks.layer_kinds(64)
    assert kinds[:4] == ("row", "column", "row", "row")
    assert kinds[-1] == "conv" and kinds.count("conv") == 1
    assert kinds.count("column") == 16 and kinds.count("row") == 47
    assert masks.layer_kinds(4) == ("row", "column", "row", "conv")
    assert masks.layer_kinds(3, "dense") == ("dense",) * 3
    assert masks.layer_kinds(2, "row, conv_2d") == ("row", "conv_2d")


@pytest.mark.parametrize("args,err", [
    ((2, "row"), "names 1 layers"),
    ((1, "diagonal"), "unknown kinds"),
    ((1, "column_transposed"), "unknown kinds"),
    ((0, "paper"), "n_layers"),
])
def test_layer_pattern_errors(args, err):
    with pytest.raises(ValueError, match=err):
        masks.layer_kinds(*args)


def test_mask_errors():
    with pytest.raises(ValueError, match="unknown mask kind"):
        masks.mask(2, 2, "axial")
    with pytest.raises(ValueError, match="odd"):
        masks.mask(2, 2, "conv", kernel=4)
