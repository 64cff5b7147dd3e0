"""The built-in `shapes` dataset: scene sampling, rendering, captions and their meanings.

This module owns everything about `shapes` that does not need TFDS: the palette and shape
vocabulary, the held-out objects, the per-(split, index) scene sampler, the exact pixel
renderer, the caption templates, the structured caption meanings and the caption parser.
It is pure NumPy so evaluations can render, caption and parse without any data pipeline;
`shapes_tfds.py` wraps it into a TFDS builder.

Geometry. Scenes live in a 64-unit frame; a box is `(x0, y0, side)` in integer units with
x to the right and y downwards. On an S×S canvas a box covers the pixel columns
`[px(x0), px(x0 + side))` and rows `[px(y0), px(y0 + side))`, where
`px(v) = floor(v * S / 64 + 1/2)` (round half up). Both corners are rounded, so at sizes
that are not multiples of 64 a box may be one pixel wider than tall or vice versa; the
shapes are defined relative to the pixel box of width w and height h. A pixel (i, j) of
the box (local column i, row j) is tested at its centre (i + 1/2, j + 1/2), and every
test is inclusive (a centre exactly on the boundary belongs to the shape):

- `square`: every pixel of the box.
- `circle`: the ellipse inscribed in the box, i.e. the disc of radius side/2 around the
  box centre whenever w == h (always at S = 64k):
  `((x - w/2) / (w/2))² + ((y - h/2) / (h/2))² <= 1`.
- `triangle`: isosceles, apex at the top-centre `(w/2, 0)`, base along the bottom edge
  `y = h`: `|x - w/2| <= (w/2) * (y / h)`. At an even pixel width the one-pixel-wide top
  row has no centre inside the apex, so the first painted row is the second one.

All three tests are evaluated in exact integer arithmetic. There is no anti-aliasing:
every pixel is either background (0, 0, 0) or exactly one palette colour.

Sampling. Example `i` of a split is a pure function of `(split, i)`: it draws from
`np.random.Generator(PCG64(SeedSequence((SPLIT_SEEDS[split], i))))` in a fixed order
(kind, object(s), relation, sides, positions, caption template). Image size only affects
rendering. With probability 1/3 a scene holds one object, otherwise an ordered pair of
distinct objects (they differ in colour or shape). `train` and `validation` draw objects
uniformly from the 15 in-distribution objects (and pairs uniformly from the 210 ordered
pairs of distinct in-distribution objects). `test_compositional` draws from the same
process over all 18 objects *conditioned on at least one held-out object*: singles are
uniform over the 3 held-out objects and pairs uniform over the 96 ordered pairs of distinct
objects containing at least one held-out object. Conditioning by enumeration (rather than
rejection) keeps the number of random draws per example fixed.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("yellow", "triangle"), ("cyan", "circle"), ("magenta", "square")}
)
SPLITS: tuple[str, ...] = ("train", "validation", "test_compositional")
# Label-space relation names, indexed by the integer `relation` label.
RELATIONS: tuple[str, ...] = ("none", "horizontal", "vertical")
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
FRAME = 64
MAX_OBJECTS = 2

# Fixed per-split seeds; changing one changes every example of that split.
SPLIT_SEEDS: dict[str, int] = {
    "train": 0x5A11_0001,
    "validation": 0x5A11_0002,
    "test_compositional": 0x5A11_0003,
}

# Geometry of the sampler, in the 64-unit frame.
SINGLE_SIDE = (20, 36)  # inclusive range of a single object's box side
PAIR_SIDE = (14, 26)  # inclusive range of each pair object's box side
CANVAS_BAND = (2, 62)  # every box lies inside this interval on both axes
NEAR_BAND = (2, 30)  # the left (or top) object of a pair lies inside this band
FAR_BAND = (34, 62)  # the right (or bottom) object of a pair lies inside this band
SINGLE_PROB_DENOM = 3  # a scene is single with probability 1 / 3
SAMPLED_RELATIONS = ("left", "right", "above", "below")

# Caption templates. Fields {c1} {s1} name the single object or the left/top object of a
# pair, {c2} {s2} the right/bottom object; some templates name the second one first.
CAPTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "none": (
        "a {c1} {s1}",
        "one {c1} {s1}",
        "a {c1} {s1} on a black background",
        "a {s1} that is {c1}",
    ),
    "horizontal": (
        "a {c1} {s1} to the left of a {c2} {s2}",
        "a {c2} {s2} to the right of a {c1} {s1}",
        "{c1} {s1} left of {c2} {s2}",
        "on the left a {c1} {s1}, on the right a {c2} {s2}",
    ),
    "vertical": (
        "a {c1} {s1} above a {c2} {s2}",
        "a {c2} {s2} below a {c1} {s1}",
        "{c1} {s1} on top of {c2} {s2}",
        "at the top a {c1} {s1}, at the bottom a {c2} {s2}",
    ),
}
NUM_TEMPLATES = 4


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One object: palette colour name, shape name and box `(x0, y0, side)` in 64 units."""

    color: str
    shape: str
    box: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Scene:
    """A scene: objects (left/top first) and relation 'none', 'horizontal' or 'vertical'."""

    objects: tuple[ShapeObject, ...]
    relation: str


@dataclasses.dataclass(frozen=True)
class Meaning:
    """What a caption says: `(colour, shape)` per object (left/top first) and the relation."""

    objects: tuple[tuple[str, str], ...]
    relation: str

    @property
    def held_out(self) -> bool:
        """Whether the meaning names at least one held-out object."""
        return any(o in HELD_OUT for o in self.objects)


# ----------------------------------------------------------------------------- objects

ALL_OBJECTS: tuple[tuple[str, str], ...] = tuple(itertools.product(COLOR_NAMES, SHAPES))
IN_DISTRIBUTION_OBJECTS: tuple[tuple[str, str], ...] = tuple(
    o for o in ALL_OBJECTS if o not in HELD_OUT
)
HELD_OUT_OBJECTS: tuple[tuple[str, str], ...] = tuple(o for o in ALL_OBJECTS if o in HELD_OUT)


def _ordered_pairs(objs: Sequence[tuple[str, str]]) -> list[tuple[tuple[str, str], ...]]:
    return [(a, b) for a in objs for b in objs if a != b]


_IN_PAIRS = _ordered_pairs(IN_DISTRIBUTION_OBJECTS)
_HELD_PAIRS = [p for p in _ordered_pairs(ALL_OBJECTS) if p[0] in HELD_OUT or p[1] in HELD_OUT]
# Per split: (pool of single objects, pool of ordered pairs) drawn from uniformly.
_POOLS: dict[str, tuple[Sequence[Any], Sequence[Any]]] = {
    "train": (IN_DISTRIBUTION_OBJECTS, _IN_PAIRS),
    "validation": (IN_DISTRIBUTION_OBJECTS, _IN_PAIRS),
    "test_compositional": (HELD_OUT_OBJECTS, _HELD_PAIRS),
}


# ----------------------------------------------------------------------------- sampling


def _check_split(split: str) -> None:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown shapes split {split!r}; expected one of {SPLITS}")


def _rng(split: str, index: int) -> np.random.Generator:
    _check_split(split)
    index = int(index)
    if index < 0:
        raise ValueError(f"example index must be >= 0, got {index}")
    return np.random.default_rng(np.random.SeedSequence((SPLIT_SEEDS[split], index)))


def _randint(rng: np.random.Generator, lo: int, hi: int) -> int:
    """Uniform integer in the inclusive range [lo, hi]."""
    return int(rng.integers(lo, hi + 1))


def _box_in(rng: np.random.Generator, side: int, xband: tuple[int, int],
            yband: tuple[int, int]) -> tuple[int, int, int]:
    """A box of the given side placed uniformly with its whole extent inside the bands."""
    x0 = _randint(rng, xband[0], xband[1] - side)
    y0 = _randint(rng, yband[0], yband[1] - side)
    return (x0, y0, side)


def sample_scene_and_template(split: str, index: int) -> tuple[Scene, int]:
    """Samples example `index` of `split`.

    Returns:
        The scene and the index of its caption template within
        `CAPTION_TEMPLATES[scene.relation]`.
    """
    rng = _rng(split, index)
    singles, pairs = _POOLS[split]
    if _randint(rng, 0, SINGLE_PROB_DENOM - 1) == 0:
        color, shape = singles[_randint(rng, 0, len(singles) - 1)]
        side = _randint(rng, *SINGLE_SIDE)
        box = _box_in(rng, side, CANVAS_BAND, CANVAS_BAND)
        scene = Scene((ShapeObject(color, shape, box),), "none")
    else:
        first, second = pairs[_randint(rng, 0, len(pairs) - 1)]
        rel = SAMPLED_RELATIONS[_randint(rng, 0, len(SAMPLED_RELATIONS) - 1)]
        side_first = _randint(rng, *PAIR_SIDE)
        side_second = _randint(rng, *PAIR_SIDE)
        # "left"/"above" put the first sampled object in the near band; "right"/"below"
        # put it in the far band. Labels always list the near (left/top) object first.
        if rel in ("left", "above"):
            near, far = (first, side_first), (second, side_second)
        else:
            near, far = (second, side_second), (first, side_first)
        if rel in ("left", "right"):
            relation = "horizontal"
            box_near = _box_in(rng, near[1], NEAR_BAND, CANVAS_BAND)
            box_far = _box_in(rng, far[1], FAR_BAND, CANVAS_BAND)
        else:
            relation = "vertical"
            box_near = _box_in(rng, near[1], CANVAS_BAND, NEAR_BAND)
            box_far = _box_in(rng, far[1], CANVAS_BAND, FAR_BAND)
        scene = Scene(
            (ShapeObject(*near[0], box_near), ShapeObject(*far[0], box_far)), relation
        )
    template = _randint(rng, 0, NUM_TEMPLATES - 1)
    return scene, template


def sample_scene(split: str, index: int) -> tuple[Scene, str]:
    """Samples example `index` of `split` (a pure function of both).

    Returns:
        The scene and its caption.
    """
    scene, template = sample_scene_and_template(split, index)
    return scene, captions_for(scene_meaning(scene))[template]


# ----------------------------------------------------------------------------- rendering


def to_pixels(v: int, size: int) -> int:
    """Maps a 64-unit coordinate to pixels at canvas `size`: round half up of v*size/64."""
    return (2 * int(v) * size + FRAME) // (2 * FRAME)


def pixel_box(box: Sequence[int], size: int) -> tuple[int, int, int, int]:
    """Pixel extent `(px0, py0, px1, py1)` (half-open) of a 64-unit box at canvas `size`."""
    x0, y0, side = (int(v) for v in box)
    return (to_pixels(x0, size), to_pixels(y0, size),
            to_pixels(x0 + side, size), to_pixels(y0 + side, size))


@functools.lru_cache(maxsize=4096)
def local_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Boolean (height, width) mask of `shape` inside a pixel box (see module docstring).

    The result is cached and read-only.
    """
    w, h = int(width), int(height)
    # Twice the pixel-centre coordinates, so every test below is exact integer arithmetic.
    x2 = 2 * np.arange(w, dtype=np.int64)[None, :] + 1
    y2 = 2 * np.arange(h, dtype=np.int64)[:, None] + 1
    if shape == "square":
        mask = np.ones((h, w), dtype=bool)
    elif shape == "circle":
        mask = (x2 - w) ** 2 * h * h + (y2 - h) ** 2 * w * w <= w * w * h * h
    elif shape == "triangle":
        # |x - w/2| <= (w/2) (y/h)  <=>  |2x - w| * 2h <= w * 2y.
        mask = np.abs(x2 - w) * (2 * h) <= w * y2
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    mask = np.broadcast_to(mask, (h, w)).copy()
    mask.setflags(write=False)
    return mask


def object_mask(obj: ShapeObject, size: int = 64) -> np.ndarray:
    """Boolean (size, size) mask of the pixels `obj` paints on a canvas of `size`."""
    px0, py0, px1, py1 = pixel_box(obj.box, size)
    out = np.zeros((size, size), dtype=bool)
    out[py0:py1, px0:px1] = local_mask(obj.shape, px1 - px0, py1 - py0)
    return out


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """Renders `scene` as a uint8 (size, size, 3) image on a black background."""
    if int(size) < 1:
        raise ValueError(f"image size must be positive, got {size}")
    size = int(size)
    image = np.zeros((size, size, 3), dtype=np.uint8)
    for obj in scene.objects:
        px0, py0, px1, py1 = pixel_box(obj.box, size)
        mask = local_mask(obj.shape, px1 - px0, py1 - py0)
        image[py0:py1, px0:px1][mask] = COLORS[obj.color]
    return image


# ----------------------------------------------------------------------------- labels


def scene_labels(scene: Scene) -> dict[str, np.ndarray]:
    """Fixed-shape integer labels of a scene (absent objects are -1).

    Returns:
        `num_objects` int32 scalar, `colors` int32[2] (index into `COLOR_NAMES`),
        `shapes` int32[2] (index into `SHAPES`), `boxes` int32[2, 3] (`x0, y0, side` in
        64 units) and `relation` int32 scalar (index into `RELATIONS`).
    """
    colors = np.full((MAX_OBJECTS,), -1, dtype=np.int32)
    shapes = np.full((MAX_OBJECTS,), -1, dtype=np.int32)
    boxes = np.full((MAX_OBJECTS, 3), -1, dtype=np.int32)
    for k, obj in enumerate(scene.objects):
        colors[k] = COLOR_NAMES.index(obj.color)
        shapes[k] = SHAPES.index(obj.shape)
        boxes[k] = obj.box
    return {
        "num_objects": np.int32(len(scene.objects)),
        "colors": colors,
        "shapes": shapes,
        "boxes": boxes,
        "relation": np.int32(RELATIONS.index(scene.relation)),
    }


def scene_from_labels(num_objects: Any, colors: Any, shapes: Any, boxes: Any,
                      relation: Any) -> Scene:
    """Rebuilds a `Scene` from the integer labels written by `scene_labels`/`example`.

    Accepts NumPy arrays or Python ints (e.g. one record of the TFDS data source), so
    `render(scene_from_labels(**labels), size)` re-renders a stored example.
    """
    n = int(num_objects)
    colors, shapes = np.asarray(colors).reshape(-1), np.asarray(shapes).reshape(-1)
    boxes = np.asarray(boxes).reshape(-1, 3)
    objects = tuple(
        ShapeObject(COLOR_NAMES[int(colors[k])], SHAPES[int(shapes[k])],
                    tuple(int(v) for v in boxes[k]))
        for k in range(n)
    )
    rel = relation if isinstance(relation, str) else RELATIONS[int(relation)]
    return Scene(objects, rel)


def example(split: str, index: int, size: int = 64) -> dict[str, Any]:
    """Example `index` of `split` rendered at `size`.

    Returns:
        `image` uint8 (size, size, 3), `caption` str, `index` int64 and the labels of
        `scene_labels`.
    """
    scene, caption = sample_scene(split, index)
    return {
        "image": render(scene, size),
        "caption": caption,
        "index": np.int64(index),
        **scene_labels(scene),
    }


# ----------------------------------------------------------------------------- meanings


def scene_meaning(scene: Scene) -> Meaning:
    """The structured meaning of a scene (what any of its captions says)."""
    return Meaning(tuple((o.color, o.shape) for o in scene.objects), scene.relation)


def all_meanings() -> dict[str, tuple[Meaning, ...]]:
    """Every meaning a caption can have, split by whether it names a held-out object.

    Returns:
        `{"in_distribution": ..., "held_out": ...}`. Each lists the single objects (relation
        'none') then every ordered pair of distinct objects with relation 'horizontal', then
        'vertical'. In-distribution meanings are exactly those `train`/`validation` can
        produce (15 + 2 * 210); held-out ones exactly those of `test_compositional`
        (3 + 2 * 96).
    """
    out: dict[str, list[Meaning]] = {"in_distribution": [], "held_out": []}
    meanings = [Meaning((o,), "none") for o in ALL_OBJECTS]
    for relation in ("horizontal", "vertical"):
        meanings += [Meaning(p, relation) for p in _ordered_pairs(ALL_OBJECTS)]
    for m in meanings:
        out["held_out" if m.held_out else "in_distribution"].append(m)
    return {k: tuple(v) for k, v in out.items()}


def meanings_for_split(split: str) -> tuple[Meaning, ...]:
    """The meanings that examples of `split` can have."""
    _check_split(split)
    return all_meanings()["held_out" if split == "test_compositional" else "in_distribution"]


def _check_meaning(meaning: Meaning) -> None:
    expected = 1 if meaning.relation == "none" else 2
    if meaning.relation not in RELATIONS or len(meaning.objects) != expected:
        raise ValueError(f"invalid meaning {meaning!r}")
    for obj in meaning.objects:
        if obj not in ALL_OBJECTS:
            raise ValueError(f"unknown object {obj!r} in {meaning!r}")
    if expected == 2 and meaning.objects[0] == meaning.objects[1]:
        raise ValueError(f"pair objects must differ in colour or shape: {meaning!r}")


def captions_for(meaning: Meaning) -> tuple[str, ...]:
    """All caption strings for `meaning`, in template order."""
    _check_meaning(meaning)
    fields = {}
    for k, (color, shape) in enumerate(meaning.objects, start=1):
        fields[f"c{k}"], fields[f"s{k}"] = color, shape
    return tuple(t.format(**fields) for t in CAPTION_TEMPLATES[meaning.relation])


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    out = []
    for k, part in enumerate(parts):
        if k % 2 == 0:
            out.append(re.escape(part))
        else:
            words = COLOR_NAMES if part.startswith("c") else SHAPES
            out.append(f"(?P<{part}>{'|'.join(words)})")
    return re.compile("".join(out))


_PARSERS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (relation, _template_regex(t))
    for relation, templates in CAPTION_TEMPLATES.items()
    for t in templates
)


def _normalise(text: str) -> str:
    text = " ".join(str(text).lower().split())
    text = text.rstrip(".").strip()
    # Tolerate "x , y" spacing around the comma of the two-clause templates.
    return text.replace(" ,", ",")


def parse_caption(text: str | bytes) -> Meaning | None:
    """Parses a caption written with any template back into its meaning.

    Case, repeated whitespace and a trailing full stop are ignored. Returns None for text
    no template produces, including pairs naming the same object twice.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    text = _normalise(text)
    for relation, pattern in _PARSERS:
        match = pattern.fullmatch(text)
        if match is None:
            continue
        g = match.groupdict()
        objects = tuple((g[f"c{k}"], g[f"s{k}"]) for k in range(1, 3) if f"c{k}" in g)
        if len(objects) == 2 and objects[0] == objects[1]:
            return None
        return Meaning(objects, relation)
    return None

