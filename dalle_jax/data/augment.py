"""Image augmentations for dVAE and transformer training, in pure NumPy.

The two random augmentations follow the DALL·E 1 paper's Listing 1 (dVAE) and Listing 2
(transformer), parameterised by the target resolution instead of a fixed 256. A deterministic centre-crop transform serves
validation and sampling.

Every function takes a uint8 ``(H, W, 3)`` image and an explicit
``np.random.Generator`` (no global RNG state), and returns a uint8
``(target, target, 3)`` image. Greyscale ``(H, W)``/``(H, W, 1)`` and RGBA inputs are
converted to RGB first.

Resizing is separable and done with two matrix products per channel:

- **Downscaling** (output smaller than input along an axis) is an exact *area*
  (box-filter) average: output pixel ``i`` covers the input interval
  ``[i * s, (i + 1) * s)`` with ``s = in / out``, and every input pixel contributes
  in proportion to its overlap with that interval. This works for non-integer ratios;
  for an integer ratio it is the plain block mean. TF1's ``align_corners=True`` flag
  in the listings is not reproduced: pixel-area averaging is what AREA resampling
  means, and it is what the listings rely on (they only ever shrink).
- **Upscaling** only happens for images whose short side is below the target, which
  the listings do not anticipate. Area averaging would degenerate to blocky
  pixel replication there, so upscaling uses bilinear interpolation with half-pixel
  centres and clamped edges.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Augmentation = Callable[[np.ndarray, np.random.Generator | None, int], np.ndarray]


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """Returns ``image`` as a uint8 ``(H, W, 3)`` array (greyscale and RGBA converted)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"expected a non-empty (H, W, C) image, got shape {image.shape}")
    channels = image.shape[2]
    if channels == 1:
        return np.repeat(image, 3, axis=2)
    if channels == 4:
        # Alpha is dropped rather than composited: training images are photographs,
        # and any fixed background colour would be an arbitrary choice.
        return image[:, :, :3]
    if channels != 3:
        raise ValueError(f"expected 1, 3 or 4 channels, got shape {image.shape}")
    return image


def _area_weights(in_size: int, out_size: int) -> np.ndarray:
    """Returns the ``(out_size, in_size)`` box-filter matrix for shrinking an axis."""
    scale = in_size / out_size
    lo_O = np.arange(out_size, dtype=np.float64)[:, None] * scale
    hi_O = lo_O + scale
    left_I = np.arange(in_size, dtype=np.float64)[None, :]
    overlap_OI = np.minimum(hi_O, left_I + 1.0) - np.maximum(lo_O, left_I)
    return np.clip(overlap_OI, 0.0, None) / scale


def _bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """Returns the ``(out_size, in_size)`` bilinear matrix (half-pixel centres)."""
    src_O = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    src_O = np.clip(src_O, 0.0, in_size - 1.0)
    j0_O = np.floor(src_O).astype(np.int64)
    j1_O = np.minimum(j0_O + 1, in_size - 1)
    frac_O = src_O - j0_O
    weights_OI = np.zeros((out_size, in_size), dtype=np.float64)
    rows_O = np.arange(out_size)
    # np.add.at accumulates, so a clamped edge (j0 == j1) still sums to weight 1.
    np.add.at(weights_OI, (rows_O, j0_O), 1.0 - frac_O)
    np.add.at(weights_OI, (rows_O, j1_O), frac_O)
    return weights_OI


def _axis_weights(in_size: int, out_size: int) -> np.ndarray | None:
    """Returns the resampling matrix for one axis, or None when the size is unchanged."""
    if out_size <= 0:
        raise ValueError(f"output size must be positive, got {out_size}")
    if out_size == in_size:
        return None
    if out_size < in_size:
        return _area_weights(in_size, out_size).astype(np.float32)
    return _bilinear_weights(in_size, out_size).astype(np.float32)


def resize(image_HWC: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resizes an image: area averaging where it shrinks, bilinear where it grows.

    Args:
        image_HWC: ``(H, W, C)`` array of any real dtype.
        height: output height.
        width: output width.

    Returns:
        float32 ``(height, width, C)`` array, not rounded, so callers can check the
        exact averages; use ``to_uint8`` to get pixels back.
    """
    in_h, in_w, _ = image_HWC.shape
    weights_h = _axis_weights(in_h, height)
    weights_w = _axis_weights(in_w, width)
    # Channels-first makes each axis a batched 2-D matmul, which goes through BLAS.
    x_CHW = np.ascontiguousarray(np.transpose(image_HWC, (2, 0, 1)), dtype=np.float32)
    if weights_h is not None:
        x_CHW = weights_h @ x_CHW
    if weights_w is not None:
        x_CHW = x_CHW @ weights_w.T
    return np.ascontiguousarray(np.transpose(x_CHW, (1, 2, 0)))


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Rounds to the nearest integer and clips to [0, 255], as the listings do."""
    return np.rint(np.clip(image, 0.0, 255.0)).astype(np.uint8)


def random_crop(image_HWC: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Returns a uniformly placed ``size`` × ``size`` crop (offsets inclusive of the edge)."""
    h, w, _ = image_HWC.shape
    if size > h or size > w:
        raise ValueError(f"crop {size} does not fit an image of shape {image_HWC.shape}")
    off_h = int(rng.integers(0, h - size + 1))
    off_w = int(rng.integers(0, w - size + 1))
    return image_HWC[off_h : off_h + size, off_w : off_w + size]


def near_center_offset_range(extent: int, crop: int) -> tuple[int, int]:
    """Returns the half-open offset range ``[lo, hi)`` of Listing 2's near-centre crop.

    The offset lies in the middle quarter of the slack ``extent - crop``
    (``[3/8, 5/8)`` of it); ``hi`` is at least ``lo + 1`` so the range is never empty.
    """
    slack = extent - crop
    lo = 3 * slack // 8
    return lo, max(lo + 1, 5 * slack // 8)


def _resize_square_uint8(image_HWC: np.ndarray, size: int) -> np.ndarray:
    """Resizes a square uint8 image to ``size`` × ``size`` and rounds back to uint8."""
    if image_HWC.shape[0] == size and image_HWC.shape[1] == size:
        return image_HWC
    return to_uint8(resize(image_HWC, size, size))


def dvae_augment(
    image_HWC: np.ndarray, rng: np.random.Generator, target: int
) -> np.ndarray:
    """Listing 1 (dVAE): random square crop, random rescale, random crop, random flip.

    The square side ``s_min = min(H, W)`` is cropped at a uniform offset, resized to a
    uniform ``t`` in ``[min(s_min, round(9/8·target)), min(s_min, round(12/8·target))]``,
    randomly cropped to ``target`` and flipped left-right with probability 1/2. When
    ``s_min < target`` the square is upscaled to ``target`` instead (``t = target``).
    """
    image_HWC = _as_rgb(image_HWC)
    s_min = min(image_HWC.shape[:2])
    square = random_crop(image_HWC, s_min, rng)
    t_min = min(s_min, round(9 / 8 * target))
    t_max = min(s_min, round(12 / 8 * target))
    t = max(int(rng.integers(t_min, t_max + 1)), target)
    scaled = _resize_square_uint8(square, t)
    out = random_crop(scaled, target, rng)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def transformer_augment(
    image_HWC: np.ndarray, rng: np.random.Generator, target: int
) -> np.ndarray:
    """Listing 2 (transformer): near-centre square crop, random rescale, random crop.

    The ``s_min`` square is placed with offsets from ``near_center_offset_range`` on
    each axis, resized to a uniform ``t`` in ``[target, min(s_min, round(9/8·target))]``
    and randomly cropped to ``target``. No flip: captions may describe text or
    left/right relations in the image. When ``s_min < target`` the square is upscaled
    to ``target``.
    """
    image_HWC = _as_rgb(image_HWC)
    h, w, _ = image_HWC.shape
    s_min = min(h, w)
    off_h = int(rng.integers(*near_center_offset_range(h, s_min)))
    off_w = int(rng.integers(*near_center_offset_range(w, s_min)))
    square = image_HWC[off_h : off_h + s_min, off_w : off_w + s_min]
    t_max = max(target, min(s_min, round(9 / 8 * target)))
    t = int(rng.integers(target, t_max + 1))
    scaled = _resize_square_uint8(square, t)
    return np.ascontiguousarray(random_crop(scaled, target, rng))


def center_crop_resize(
    image_HWC: np.ndarray, rng: np.random.Generator | None, target: int
) -> np.ndarray:
    """Deterministic transform: centre square crop, then resize to ``target``.

    ``rng`` is ignored (it may be None); it is accepted so that every entry of
    ``AUGMENTATIONS`` has the same signature.
    """
    del rng
    image_HWC = _as_rgb(image_HWC)
    h, w, _ = image_HWC.shape
    s_min = min(h, w)
    off_h, off_w = (h - s_min) // 2, (w - s_min) // 2
    square = image_HWC[off_h : off_h + s_min, off_w : off_w + s_min]
    return np.ascontiguousarray(_resize_square_uint8(square, target))


AUGMENTATIONS: dict[str, Augmentation] = {
    "dvae": dvae_augment,
    "transformer": transformer_augment,
    "none": center_crop_resize,
}
