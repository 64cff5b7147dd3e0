"""Caption-match checker for images of the synthetic `shapes` dataset.

Judges whether an image, typically a text-to-image sample decoded by the dVAE, shows
exactly what its caption says, so a sampler can be summarised as "x% of sampled images
match their caption" (separately for in-distribution captions and for captions naming a
held-out object). Generated images are not exact renders: colours are near but not on
the palette, edges are blurred, shapes are imperfect and there may be speckle noise. The
checker is built from a few explicit rules, each with its threshold as a module constant
(stated for the 64-pixel frame; lengths scale with the image side, areas with its
square), chosen so that every exact render matches its own caption, a caption differing
in any single attribute does not, and decoder-like degradation (3x3 blur, pixel noise,
a colour cast, speckles) leaves the verdict unchanged.

1. Pixel colours (`classify_pixels`). A pixel is background when its brightest channel is
   below `MIN_BRIGHTNESS`, half of full scale: the background is black and every palette
   colour has a channel at 255, so a blurred edge pixel counts when at least half covered
   (what the renderer does at pixel centres) and dimmed colours still count. Otherwise
   each channel is read relative to the brightest one: "on" at `ON_RATIO` or more, "off"
   at `OFF_RATIO` or less. The palette is exactly the six corners of the RGB cube that
   are neither black nor white, so the on/off pattern names the colour (red = on/off/off,
   yellow = on/on/off, ...). Pixels with an in-between channel (e.g. orange, between red
   and yellow) or all channels on (white, grey) name no palette colour and count as
   background. Reading channels relative to the brightest makes the rule indifferent to
   brightness and robust to a colour cast.
2. Objects (`detect_objects`). Each colour's pixels are split into 8-connected
   components. Fragments of one colour at most `MERGE_GAP_PX` apart are one object,
   since decoders may break thin parts or cut an object with a line of noise; objects of
   a pair are at least 4 pixels apart in the data (the near band ends at 30, the far band
   starts at 34), so merging cannot fuse two real objects even if both bleed a pixel.
   Holes are filled (no shape has one). Components smaller than
   `MIN_OBJECT_AREA_FRACTION` of the smallest object the dataset draws (a triangle of the
   smallest pair side, `SMALLEST_OBJECT_AREA`) are noise and are dropped.
3. Shapes. For each candidate shape, the ideal shape with the component's area and
   centroid is placed (`fit_box`; the renderer's geometry, boxes always square) and
   compared with the component by IoU (`ideal_mask`); the best is the component's shape.
   Fitting by area and centroid rather than by bounding box makes the reading insensitive
   to what blur does to boxes (lost corners and triangle apexes, one-pixel protrusions),
   and penalises elongation, since every ideal box is square. Exact ideal shapes fitted
   to one another reach IoU 0.84 (circle against square) and 0.71 (triangle against
   either), so a reading is trusted only with IoU >= `MIN_SHAPE_IOU` (which rejects
   irregular blobs, and rectangles or ellipses longer than about 1.3-1.4 : 1) and a lead
   of at least `MIN_SHAPE_MARGIN` over the second-best shape (which rejects shapes
   halfway between a circle and a square). Otherwise the object is "poorly drawn".
4. Objects against the caption (`match`). The detected (colour, shape) multiset must
   equal the caption's objects: a missing object, an extra object (any kept component
   the caption does not name) or an object of the wrong colour or shape fails. Equality,
   not inclusion, is what makes the check strict: a sample that paints several candidate
   objects must not pass.
5. Relation. A pair's meaning lists the left (or top) object first; the generator puts it
   inside x (or y) in [2, 30] and the other inside [34, 62], so their extents along the
   relation's axis never overlap. The rule mirrors that: the first object's centroid must
   come first along the axis, and the two bounding boxes may overlap along it by at most
   `RELATION_MAX_OVERLAP_PX` (blurred edges). Nothing is required along the other axis,
   as in the data; so a pair can satisfy both relations (one object up-left of the
   other), just as a scene of the data can.

A result names every failure it found in `MatchResult.reason` (e.g. "missing red
circle") and its primary failure in `MatchResult.category`, the first that applies of
`FAILURE_CATEGORIES` (listed in priority order); `score` counts the categories.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from dalle_jax.data import shapes

# ----------------------------------------------------------------------------- thresholds

# Image side the thresholds below are stated for; lengths scale with size / 64, areas
# with its square.
REFERENCE_SIZE = shapes.FRAME
# Brightest-channel value below which a pixel is background: half of full scale, so a
# blurred edge pixel belongs to the object when at least half covered, and background
# noise of sigma 15 is more than 8 sigma away.
MIN_BRIGHTNESS = 128
# A channel is "on" at >= ON_RATIO and "off" at <= OFF_RATIO of the brightest channel;
# in between, the pixel's colour is ambiguous and it counts as background.
ON_RATIO = 0.6
OFF_RATIO = 0.4
# Same-colour fragments at most this many pixels apart (Chebyshev gap) are one object.
MERGE_GAP_PX = 1
# Area (pixels at 64x64) of the smallest object the dataset draws: the smallest-area
# shape at the smallest pair side (a triangle of side 14: 98 pixels).
SMALLEST_OBJECT_AREA = min(
    int(shapes.local_mask(s, shapes.PAIR_SIDE[0], shapes.PAIR_SIDE[0]).sum())
    for s in shapes.SHAPES
)
# Components below this fraction of SMALLEST_OBJECT_AREA are noise (24.5 px at 64x64).
MIN_OBJECT_AREA_FRACTION = 0.25
# Minimum IoU of an object with its fitted ideal shape. At 64x64, exact renders score
# >= 0.98 and renders under a 3x3 blur, noise of sigma 15-25, a +-20-30 colour cast and 5%
# speckles >= 0.85 (exact 32x32 renders >= 0.85); ideal shapes fitted to each other reach
# 0.84 (circle vs square); rectangles longer than about 1.3:1 and ellipses longer than
# about 1.4:1 fall below 0.8.
MIN_SHAPE_IOU = 0.8
# Minimum lead of the best shape's IoU over the second best. Exact renders lead by >= 0.14
# at 64x64 (>= 0.06 at 32x32), the degraded renders above by >= 0.06; the superellipse
# |x|^4 + |y|^4 <= 1, halfway between a circle and a square, leads by 0.004.
MIN_SHAPE_MARGIN = 0.03
# How far (pixels) the two bounding boxes of a pair may overlap along the relation axis.
RELATION_MAX_OVERLAP_PX = 2.0

# Failure categories, in priority order: a result's `category` is the first that applies.
FAILURE_CATEGORIES: tuple[str, ...] = (
    "unparseable_caption",
    "wrong_color",
    "wrong_shape",
    "missing_object",
    "extra_object",
    "poor_shape",
    "relation",
)

# Pixel class of background (and of pixels that name no palette colour).
BACKGROUND = -1

# On/off code (bit 2: red, bit 1: green, bit 0: blue) -> index into shapes.COLOR_NAMES.
_CODE_TO_COLOR = np.full((8,), BACKGROUND, dtype=np.int64)
for _k, _rgb in enumerate(shapes.COLORS.values()):
    _CODE_TO_COLOR[sum(int(v > 0) << (2 - c) for c, v in enumerate(_rgb))] = _k
del _k, _rgb

# Per shape: area per squared box side, and depth of the centroid below the box top per
# unit of side (the triangle's apex is at the top, so its centroid is 2/3 down).
_SHAPE_GEOMETRY: dict[str, tuple[float, float]] = {
    "square": (1.0, 0.5),
    "circle": (float(np.pi) / 4, 0.5),
    "triangle": (0.5, 2 / 3),
}


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class Detection:
    """One object found in an image.

    Attributes:
        color: palette colour name.
        shape: best-fitting shape name.
        bbox: `(x0, y0, x1, y1)` half-open pixel bounding box.
        centroid: `(x, y)` in pixels (a pixel's centre is at its index + 1/2).
        area: number of pixels (holes filled).
        shape_iou: IoU with the fitted ideal `shape`.
        shape_ious: IoU with each fitted ideal shape of `shapes.SHAPES`, in that order.
    """

    color: str
    shape: str
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    area: int
    shape_iou: float
    shape_ious: tuple[float, ...]

    @property
    def name(self) -> str:
        """`"<colour> <shape>"`, as captions name objects."""
        return f"{self.color} {self.shape}"

    @property
    def shape_margin(self) -> float:
        """Lead of the best shape's IoU over the second best."""
        best, second = sorted(self.shape_ious)[:-3:-1]
        return best - second


@dataclasses.dataclass(frozen=True)
class MatchResult:
    """Verdict of `match`.

    Attributes:
        ok: whether the image shows exactly what the caption says.
        reason: "match", or every failure found, joined by "; " (e.g. "missing red circle").
        category: None when `ok`, else the first applicable of `FAILURE_CATEGORIES`.
        meaning: the caption's meaning (None when the caption does not parse).
        detections: the objects found in the image.
    """

    ok: bool
    reason: str
    category: str | None
    meaning: shapes.Meaning | None
    detections: tuple[Detection, ...]


# ----------------------------------------------------------------------------- detection


def _check_image(image: Any) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image with values in [0, 255], got dtype "
                         f"{image.dtype}")
    if image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square image (the shapes frame is square), got "
                         f"shape {image.shape}")
    if image.shape[0] < 16:
        raise ValueError(f"image side {image.shape[0]} is too small to judge; need >= 16")
    return image


def _scale(size: int) -> float:
    return size / REFERENCE_SIZE


def classify_pixels(image_HW3: np.ndarray) -> np.ndarray:
    """Palette-colour index (into `shapes.COLOR_NAMES`) of each pixel, or `BACKGROUND`.

    Rule 1 of the module docstring.

    Args:
        image_HW3: uint8 (S, S, 3) RGB image.

    Returns:
        int64 (S, S) array.

    Raises:
        ValueError: if the image is not a square uint8 RGB image of side >= 16.
    """
    image = _check_image(image_HW3).astype(np.float32)
    bright = image.max(axis=-1)
    ratio = image / np.maximum(bright, 1.0)[..., None]
    on = ratio >= ON_RATIO
    ambiguous = ((ratio > OFF_RATIO) & ~on).any(axis=-1)
    code = (on[..., 0].astype(np.int64) << 2) | (on[..., 1] << 1) | on[..., 2]
    out = _CODE_TO_COLOR[code]
    out[(bright < MIN_BRIGHTNESS) | ambiguous] = BACKGROUND
    return out


def min_object_area(size: int = REFERENCE_SIZE) -> float:
    """Smallest component area (pixels) kept as an object at image side `size`."""
    return MIN_OBJECT_AREA_FRACTION * SMALLEST_OBJECT_AREA * _scale(size) ** 2


def fit_box(shape: str, area: float,
            centroid: tuple[float, float]) -> tuple[float, float, float]:
    """The square box `(x0, y0, side)`, in pixels, of the ideal `shape` with this area and
    centroid."""
    if shape not in _SHAPE_GEOMETRY:
        raise ValueError(f"unknown shape {shape!r}; expected one of {shapes.SHAPES}")
    factor, depth = _SHAPE_GEOMETRY[shape]
    side = float(np.sqrt(area / factor))
    return (centroid[0] - side / 2, centroid[1] - depth * side, side)


def ideal_mask(shape: str, box: tuple[float, float, float], size: int) -> np.ndarray:
    """Boolean (size, size) mask of `shape` in the real-valued pixel box `(x0, y0, side)`.

    The renderer's definitions (`shapes` module docstring) in real coordinates: a pixel
    belongs to the shape when its centre does, boundaries included.
    """
    x0, y0, side = box
    half = side / 2
    x = np.arange(size, dtype=np.float64)[None, :] + 0.5 - (x0 + half)  # From the axis.
    y = np.arange(size, dtype=np.float64)[:, None] + 0.5 - y0  # Down from the box top.
    if shape == "square":
        return (np.abs(x) <= half) & (y >= 0) & (y <= side)
    if shape == "circle":
        return x * x + (y - half) ** 2 <= half * half
    if shape == "triangle":
        return (y <= side) & (np.abs(x) <= half * y / side)
    raise ValueError(f"unknown shape {shape!r}; expected one of {shapes.SHAPES}")


def _shape_ious(mask: np.ndarray, centroid: tuple[float, float]) -> tuple[float, ...]:
    area = int(mask.sum())
    ious = []
    for s in shapes.SHAPES:
        ideal = ideal_mask(s, fit_box(s, area, centroid), mask.shape[0])
        inter = int(np.count_nonzero(mask & ideal))
        ious.append(inter / (area + int(ideal.sum()) - inter))
    return tuple(ious)


def detect_objects(image_HW3: np.ndarray) -> list[Detection]:
    """Finds the palette-coloured objects of an image (rules 1-3 of the module docstring).

    Args:
        image_HW3: uint8 (S, S, 3) RGB image, black background.

    Returns:
        The detections, in palette-colour order, then in raster order of each colour's
        components.

    Raises:
        ValueError: if the image is not a square uint8 RGB image of side >= 16.
    """
    classes = classify_pixels(image_HW3)
    size = classes.shape[0]
    gap = max(1, round(MERGE_GAP_PX * _scale(size)))
    # Dilating by a (gap + 1)-pixel square widens every fragment by `gap` pixels in total
    # along each axis, so it joins (8-connected) exactly the fragments whose Chebyshev gap
    # is <= `gap`; the labels are then read back on the original pixels.
    grow = np.ones((gap + 1, gap + 1), dtype=bool)
    eight = np.ones((3, 3), dtype=bool)
    min_area = min_object_area(size)
    out = []
    for k, color in enumerate(shapes.COLOR_NAMES):
        mask = classes == k
        if not mask.any():
            continue
        labels, _ = ndimage.label(ndimage.binary_dilation(mask, structure=grow),
                                  structure=eight)
        labels = np.where(mask, labels, 0)
        for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None:
                continue
            comp = ndimage.binary_fill_holes(labels[sl] == lab)
            area = int(comp.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(comp)
            y0, x0 = sl[0].start, sl[1].start
            centroid = (float(xs.mean()) + x0 + 0.5, float(ys.mean()) + y0 + 0.5)
            full = np.zeros((size, size), dtype=bool)
            full[sl] = comp
            ious = _shape_ious(full, centroid)
            best = int(np.argmax(ious))
            out.append(Detection(
                color=color,
                shape=shapes.SHAPES[best],
                bbox=(x0, y0, sl[1].stop, sl[0].stop),
                centroid=centroid,
                area=area,
                shape_iou=float(ious[best]),
                shape_ious=tuple(float(v) for v in ious),
            ))
    return out


# ----------------------------------------------------------------------------- matching


def _meaning_of(caption_or_meaning: str | bytes | shapes.Meaning) -> shapes.Meaning | None:
    if isinstance(caption_or_meaning, shapes.Meaning):
        shapes.captions_for(caption_or_meaning)  # Validates; raises ValueError.
        return caption_or_meaning
    if isinstance(caption_or_meaning, (str, bytes)):
        return shapes.parse_caption(caption_or_meaning)
    raise TypeError(f"expected a caption (str or bytes) or a shapes.Meaning, got "
                    f"{type(caption_or_meaning).__name__}")


# Relation -> (wording of "first is ... second", axis: 0 for x, 1 for y).
_RELATION_AXES: dict[str, tuple[str, int]] = {
    "horizontal": ("left of", 0),
    "vertical": ("above", 1),
}


def relation_holds(first: Detection, second: Detection, relation: str,
                   size: int = REFERENCE_SIZE) -> bool:
    """Whether `first` is left of ('horizontal') or above ('vertical') `second` (rule 5).

    Raises:
        ValueError: for any other relation.
    """
    if relation not in _RELATION_AXES:
        raise ValueError(f"relation must be 'horizontal' or 'vertical', got {relation!r}")
    axis = _RELATION_AXES[relation][1]
    overlap = first.bbox[2 + axis] - second.bbox[axis]
    return (first.centroid[axis] < second.centroid[axis]
            and overlap <= RELATION_MAX_OVERLAP_PX * _scale(size))


def match_detections(detections: Sequence[Detection], meaning: shapes.Meaning | None,
                     size: int = REFERENCE_SIZE) -> MatchResult:
    """Judges detected objects against a meaning (rules 3-5 of the module docstring).

    Lets one image be checked against several captions while detecting only once.

    Args:
        detections: `detect_objects` of the image.
        meaning: the caption's meaning, or None for an unparseable caption.
        size: side of the image the detections come from.
    """
    detections = tuple(detections)
    if meaning is None:
        return MatchResult(False, "unparseable caption", "unparseable_caption", None,
                           detections)
    problems: list[tuple[str, str]] = []
    remaining = list(detections)
    found: list[Detection] = []
    missing: list[tuple[str, str]] = []
    for color, shape in meaning.objects:
        hit = next((d for d in remaining if (d.color, d.shape) == (color, shape)), None)
        if hit is None:
            missing.append((color, shape))
        else:
            remaining.remove(hit)
            found.append(hit)
    for color, shape in missing:
        # An unexplained object that differs in just one attribute names that attribute.
        for category, same in (("wrong_shape", lambda d: d.color == color),
                               ("wrong_color", lambda d: d.shape == shape)):
            other = next((d for d in remaining if same(d)), None)
            if other is not None:
                remaining.remove(other)
                problems.append((category, f"{category.replace('_', ' ')}: "
                                           f"{other.name} instead of {color} {shape}"))
                break
        else:
            problems.append(("missing_object", f"missing {color} {shape}"))
    problems += [("extra_object", f"extra {d.name}") for d in remaining]
    for d in found:
        if d.shape_iou < MIN_SHAPE_IOU:
            problems.append(("poor_shape", f"poor {d.name}: shape IoU {d.shape_iou:.2f} "
                                           f"< {MIN_SHAPE_IOU}"))
        elif d.shape_margin < MIN_SHAPE_MARGIN:
            problems.append(("poor_shape", f"ambiguous {d.name}: shape IoU lead "
                                           f"{d.shape_margin:.3f} < {MIN_SHAPE_MARGIN}"))
    if not missing and meaning.relation != "none":
        first, second = found
        if not relation_holds(first, second, meaning.relation, size):
            word = _RELATION_AXES[meaning.relation][0]
            problems.append(("relation", f"relation {meaning.relation} not satisfied: "
                                         f"{first.name} is not {word} {second.name}"))
    if not problems:
        return MatchResult(True, "match", None, meaning, detections)
    category = min((c for c, _ in problems), key=FAILURE_CATEGORIES.index)
    return MatchResult(False, "; ".join(r for _, r in problems), category, meaning,
                       detections)


def match(image_HW3: np.ndarray,
          caption_or_meaning: str | bytes | shapes.Meaning) -> MatchResult:
    """Whether an image shows exactly what its caption says (see the module docstring).

    Args:
        image_HW3: uint8 (S, S, 3) RGB image, black background.
        caption_or_meaning: a caption in any template (str or UTF-8 bytes), or a meaning.

    Returns:
        The verdict; an unparseable caption is a failed match, not an error.

    Raises:
        ValueError: if the image is not a square uint8 RGB image of side >= 16, or the
            meaning is invalid.
        TypeError: if the caption is neither text nor a `shapes.Meaning`.
    """
    meaning = _meaning_of(caption_or_meaning)
    detections = detect_objects(image_HW3)
    return match_detections(detections, meaning, np.shape(image_HW3)[0])


def score(images_NHW3: np.ndarray | Sequence[np.ndarray],
          captions: Sequence[str | bytes | shapes.Meaning]) -> dict[str, Any]:
    """Matches images against their captions and summarises the verdicts.

    Args:
        images_NHW3: uint8 (N, S, S, 3) array, or a sequence of N (S, S, 3) images.
        captions: N captions or meanings, one per image.

    Returns:
        A JSON-serialisable dict: `count`, `matched`, `fraction` (None when count is 0)
        and `failures`, the number of failed images per primary category (every name of
        `FAILURE_CATEGORIES`, zeros included).

    Raises:
        ValueError: if the numbers of images and captions differ, or an image is invalid.
    """
    if isinstance(images_NHW3, np.ndarray) and images_NHW3.ndim != 4:
        raise ValueError(f"expected (N, H, W, 3) images, got shape {images_NHW3.shape}")
    if len(images_NHW3) != len(captions):
        raise ValueError(f"got {len(images_NHW3)} images but {len(captions)} captions")
    failures = collections.Counter({c: 0 for c in FAILURE_CATEGORIES})
    matched = 0
    for image, caption in zip(images_NHW3, captions):
        result = match(image, caption)
        if result.ok:
            matched += 1
        else:
            failures[result.category] += 1
    count = len(captions)
    return {
        "count": count,
        "matched": matched,
        "fraction": matched / count if count else None,
        "failures": {c: int(failures[c]) for c in FAILURE_CATEGORIES},
    }
