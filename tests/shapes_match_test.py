"""Tests for the `shapes` caption-match checker (dalle_jax.evals.shapes_match)."""

import dataclasses
import json

import numpy as np
import pytest

from dalle_jax.data import shapes as S
from dalle_jax.evals import shapes_match as M

N_VALIDATION = 300
N_TEST = 100


def _examples():
    return ([("validation", i) for i in range(N_VALIDATION)]
            + [("test_compositional", i) for i in range(N_TEST)])


@pytest.fixture(scope="module")
def cases():
    """(scene, template index, image, detections) of 300 validation + 100 test examples."""
    out = []
    for split, i in _examples():
        scene, template = S.sample_scene_and_template(split, i)
        image = S.render(scene)
        out.append((scene, template, image, M.detect_objects(image)))
    return out


def _degrade(image, rng):
    """Decoder-like damage: 3x3 box blur, colour cast, pixel noise and 1% speckles."""
    x = image.astype(np.float32)
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    x = sum(p[i:i + 64, j:j + 64] for i in range(3) for j in range(3)) / 9
    x = x + rng.uniform(-20, 20, size=3) + rng.normal(0, 15, size=x.shape)
    speckle = rng.random(x.shape[:2]) < 0.01
    x[speckle] = rng.integers(0, 256, size=(int(speckle.sum()), 3))
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _caption(meaning, template):
    return S.captions_for(meaning)[template]


# ----------------------------------------------------------------------------- positives


def test_exact_renders_match_their_captions(cases):
    for scene, template, image, dets in cases:
        meaning = S.scene_meaning(scene)
        result = M.match(image, _caption(meaning, template))
        assert result.ok, (meaning, result.reason)
        assert result.category is None and result.reason == "match"
        assert result.meaning == meaning
        # Detections agree with the renderer object by object.
        assert len(dets) == len(scene.objects)
        for obj in scene.objects:
            d = next(d for d in dets if (d.color, d.shape) == (obj.color, obj.shape))
            mask = S.object_mask(obj)
            assert d.area == mask.sum()
            ys, xs = np.nonzero(mask)
            assert d.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert d.centroid == pytest.approx((xs.mean() + 0.5, ys.mean() + 0.5))
            assert d.shape_iou >= 0.95 and d.shape_margin >= 0.1


def test_cases_cover_every_kind_of_scene(cases):
    meanings = [S.scene_meaning(c[0]) for c in cases]
    assert {m.relation for m in meanings} == {"none", "horizontal", "vertical"}
    assert any(m.held_out for m in meanings)
    # Pairs sharing a colour must not be merged into one object.
    assert sum(len(m.objects) == 2 and m.objects[0][0] == m.objects[1][0]
               for m in meanings) >= 20


@pytest.mark.parametrize("size", [32, 128])
def test_other_image_sizes(size):
    for split, i in _examples()[::8]:
        ex = S.example(split, i, size)
        assert M.match(ex["image"], ex["caption"]).ok, ex["caption"]


def test_meaning_and_bytes_captions():
    ex = S.example("validation", 3)
    meaning = S.parse_caption(ex["caption"])
    assert M.match(ex["image"], meaning).ok
    assert M.match(ex["image"], ex["caption"].upper().encode() + b".").ok


# ----------------------------------------------------------------------------- negatives


def _other_color(color, keep):
    return next(c for c in S.COLOR_NAMES if c != color and c not in keep)


def _altered(meaning):
    """(expected category, altered meaning) for each single-attribute change."""
    objs = list(meaning.objects)
    out = []
    for k, (color, shape) in enumerate(objs):
        others = [o for j, o in enumerate(objs) if j != k]
        new_color = next(c for c in S.COLOR_NAMES if c != color and (c, shape) not in others)
        new_shape = next(s for s in S.SHAPES if s != shape and (color, s) not in others)
        for category, obj in (("wrong_color", (new_color, shape)),
                              ("wrong_shape", (color, new_shape))):
            changed = list(objs)
            changed[k] = obj
            out.append((category, S.Meaning(tuple(changed), meaning.relation)))
    if meaning.relation == "none":
        extra = next(o for o in S.ALL_OBJECTS if o != objs[0])
        out.append(("missing_object", S.Meaning((objs[0], extra), "horizontal")))
        out.append(("missing_object", S.Meaning((extra, objs[0]), "vertical")))
    else:
        out.append(("relation", S.Meaning(tuple(objs[::-1]), meaning.relation)))
        out.append(("extra_object", S.Meaning((objs[0],), "none")))
        out.append(("extra_object", S.Meaning((objs[1],), "none")))
    return out


def test_single_attribute_changes_do_not_match(cases):
    seen = set()
    for scene, template, image, dets in cases:
        for category, meaning in _altered(S.scene_meaning(scene)):
            result = M.match_detections(dets, meaning)
            assert not result.ok, (S.scene_meaning(scene), meaning)
            assert result.category == category, (meaning, result.reason)
            seen.add(category)
        # The same through captions and `match`, for one change per image.
        category, meaning = _altered(S.scene_meaning(scene))[0]
        assert M.match(image, _caption(meaning, template)).category == category
    assert seen == {"wrong_color", "wrong_shape", "missing_object", "extra_object",
                    "relation"}


def test_swapped_axis_matches_only_where_the_geometry_allows(cases):
    """'left of' vs 'above': the data constrains only one axis, so both can hold."""
    refuted = 0
    for scene, template, image, dets in cases:
        if scene.relation == "none":
            continue
        other = "vertical" if scene.relation == "horizontal" else "horizontal"
        axis = 1 if other == "vertical" else 0
        (a, b) = scene.objects
        gap = b.box[axis] - (a.box[axis] + a.box[2])  # In 64 units = pixels at 64x64.
        result = M.match_detections(dets, S.Meaning(S.scene_meaning(scene).objects, other))
        if gap >= 0:  # Separated in the same order along the other axis too.
            assert result.ok, (scene, result.reason)
        elif gap < -(M.RELATION_MAX_OVERLAP_PX + 1):  # + 1: a triangle's empty top row.
            assert result.category == "relation", (scene, result.reason)
            assert "not satisfied" in result.reason
            refuted += 1
    assert refuted > 100


def test_blank_image_is_missing_everything():
    blank = np.zeros((64, 64, 3), np.uint8)
    assert M.detect_objects(blank) == []
    result = M.match(blank, "a red circle to the left of a blue square")
    assert not result.ok and result.category == "missing_object"
    assert result.reason == "missing red circle; missing blue square"
    assert M.match(blank, "a green triangle").reason == "missing green triangle"


def test_unparseable_caption():
    ex = S.example("validation", 0)
    result = M.match(ex["image"], "a purple hexagon")
    assert not result.ok and result.category == "unparseable_caption"
    assert result.meaning is None and len(result.detections) >= 1


def test_poor_and_ambiguous_shapes_fail():
    image = np.zeros((64, 64, 3), np.uint8)
    image[10:22, 10:40] = S.COLORS["red"]  # A 2.5:1 rectangle.
    (d,) = M.detect_objects(image)
    assert d.shape_iou < M.MIN_SHAPE_IOU
    result = M.match(image, S.Meaning((("red", d.shape),), "none"))
    assert result.category == "poor_shape" and "shape IoU" in result.reason
    # A superellipse halfway between a circle and a square.
    y, x = (np.mgrid[:64, :64] + 0.5 - 32) / 14
    image = np.zeros((64, 64, 3), np.uint8)
    image[np.abs(x) ** 4 + np.abs(y) ** 4 <= 1] = S.COLORS["blue"]
    (d,) = M.detect_objects(image)
    assert d.shape_margin < M.MIN_SHAPE_MARGIN
    result = M.match(image, S.Meaning((("blue", d.shape),), "none"))
    assert result.category == "poor_shape" and result.reason.startswith("ambiguous")


def _single_example():
    i = next(i for i in range(100) if S.sample_scene("validation", i)[0].relation == "none")
    return S.example("validation", i)


def test_extra_object_and_noise_threshold():
    ex = _single_example()
    image = ex["image"]
    # A corner at least 4 pixels away from the object; there a 6x6 blob (36 px) is an
    # object and a 4x4 one (16 px) is noise.
    y, x = next((y, x) for y in (2, 50) for x in (2, 50)
                if not image[y - 2:y + 12, x - 2:x + 12].any())
    noisy = image.copy()
    noisy[y:y + 4, x:x + 4] = S.COLORS["green"]
    assert M.match(noisy, ex["caption"]).ok
    extra = image.copy()
    extra[y:y + 6, x:x + 6] = S.COLORS["green"]
    result = M.match(extra, ex["caption"])
    assert result.category == "extra_object" and result.reason == "extra green square"


def test_broken_object_is_merged():
    ex = _single_example()
    image = ex["image"].copy()
    (d,) = M.detect_objects(image)
    cy = int(d.centroid[1])
    image[cy] = 0  # A one-pixel black line through the object.
    (broken,) = M.detect_objects(image)
    assert (broken.color, broken.shape) == (d.color, d.shape)
    assert M.match(image, ex["caption"]).ok


def test_pixel_classes():
    pixels = np.array([[[0, 0, 0], [120, 0, 0], [200, 10, 20], [210, 200, 30],
                        [255, 255, 255], [255, 128, 0], [140, 140, 140], [30, 40, 230]]],
                      np.uint8)
    pixels = np.tile(pixels, (16, 2, 1))
    names = [S.COLOR_NAMES[k] if k >= 0 else None for k in M.classify_pixels(pixels)[0, :8]]
    assert names == [None, None, "red", "yellow", None, None, None, "blue"]


# ----------------------------------------------------------------------------- robustness


def test_degraded_renders_still_match(cases):
    rng = np.random.default_rng(0)
    images = np.stack([_degrade(c[2], rng) for c in cases])
    captions = [_caption(S.scene_meaning(c[0]), c[1]) for c in cases]
    summary = M.score(images, captions)
    assert summary["count"] == len(cases)
    assert summary["fraction"] >= 0.95, summary
    # Degradation must not make wrong captions match either.
    for image, (scene, _, _, _) in zip(images[:100], cases[:100]):
        for _, meaning in _altered(S.scene_meaning(scene)):
            assert not M.match(image, meaning).ok


# ----------------------------------------------------------------------------- summary


def test_score_summary_is_json():
    images, captions = [], []
    for i in range(6):
        ex = S.example("validation", i)
        images.append(ex["image"])
        captions.append(ex["caption"])
    captions[0] = "not a caption"
    images[1] = np.zeros_like(images[1])
    summary = M.score(np.stack(images), captions)
    assert json.loads(json.dumps(summary)) == summary
    assert summary["count"] == 6 and summary["matched"] == 4
    assert summary["fraction"] == pytest.approx(4 / 6)
    assert list(summary["failures"]) == list(M.FAILURE_CATEGORIES)
    assert summary["failures"]["unparseable_caption"] == 1
    assert summary["failures"]["missing_object"] == 1
    assert sum(summary["failures"].values()) == 2
    assert M.score([], [])["fraction"] is None


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("image, message", [
    (np.zeros((64, 64), np.uint8), "shape"),
    (np.zeros((64, 64, 4), np.uint8), "shape"),
    (np.zeros((64, 64, 3), np.float32), "dtype"),
    (np.zeros((64, 48, 3), np.uint8), "square"),
    (np.zeros((8, 8, 3), np.uint8), "small"),
])
def test_bad_images_raise(image, message):
    with pytest.raises(ValueError, match=message):
        M.match(image, "a red circle")
    with pytest.raises(ValueError, match=message):
        M.detect_objects(image)


def test_bad_arguments_raise():
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="images but"):
        M.score(np.stack([image, image]), ["a red circle"])
    with pytest.raises(ValueError, match="shape"):
        M.score(image, ["a red circle"])
    with pytest.raises(TypeError):
        M.match(image, 3)
    with pytest.raises(ValueError):
        M.match(image, S.Meaning((("red", "circle"), ("red", "circle")), "horizontal"))
    with pytest.raises(ValueError):
        M.relation_holds(*[M.Detection("red", "circle", (0, 0, 1, 1), (0.5, 0.5), 1, 1.0,
                                       (1.0, 0.0, 0.0))] * 2, "none")


def test_results_are_frozen():
    result = M.match(np.zeros((64, 64, 3), np.uint8), "a red circle")
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.ok = True
