"""Tests for the built-in `shapes` dataset: sampler, renderer, captions and TFDS builder."""

import itertools

import numpy as np
import pytest

from dalle_jax.data import shapes as S

PALETTE = np.array([S.BACKGROUND, *S.COLORS.values()], dtype=np.int64)
PALETTE_CODES = PALETTE @ np.array([1 << 16, 1 << 8, 1])


def _scenes(split, n, start=0):
    return [S.sample_scene_and_template(split, i) for i in range(start, start + n)]


@pytest.fixture(scope="module")
def train_scenes():
    return _scenes("train", 3000)


# ----------------------------------------------------------------------------- renderer


@pytest.mark.parametrize("size", [32, 64, 256])
def test_render_palette_exact_and_masks(size):
    n = 40 if size == 256 else 150
    for split in S.SPLITS:
        for i in range(n):
            scene, _ = S.sample_scene(split, i)
            img = S.render(scene, size)
            assert img.shape == (size, size, 3) and img.dtype == np.uint8
            # Every pixel is the background or exactly one palette colour.
            codes = img.reshape(-1, 3).astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
            assert np.isin(codes, PALETTE_CODES).all()
            painted = np.zeros((size, size), dtype=bool)
            for obj in scene.objects:
                mask = S.object_mask(obj, size)
                assert mask.any()
                assert not (mask & painted).any(), "objects overlap"
                painted |= mask
                assert (img[mask] == S.COLORS[obj.color]).all()
            assert (img[~painted] == 0).all()


def test_square_fills_box_and_masks_are_tight():
    for size in (32, 64, 128, 256):
        for x0, y0, side in [(2, 2, 14), (3, 7, 21), (33, 40, 22), (5, 11, 36)]:
            px0, py0, px1, py1 = S.pixel_box((x0, y0, side), size)
            for shape in S.SHAPES:
                mask = S.object_mask(S.ShapeObject("red", shape, (x0, y0, side)), size)
                ys, xs = np.nonzero(mask)
                # Every shape touches the left, right and bottom box edges and stays inside.
                assert xs.min() == px0 and xs.max() == px1 - 1 and ys.max() == py1 - 1
                if shape == "square":
                    expect = np.zeros_like(mask)
                    expect[py0:py1, px0:px1] = True
                    np.testing.assert_array_equal(mask, expect)
                elif shape == "circle":
                    assert ys.min() == py0
                else:
                    assert ys.min() - py0 in (0, 1)


@pytest.mark.parametrize("shape,area", [("circle", np.pi / 4), ("triangle", 0.5)])
def test_pixel_counts_near_analytic_area(shape, area):
    for w in range(6, 150):
        for h in (w - 1, w, w + 1):
            count = S.local_mask(shape, w, h).sum()
            exact = area * w * h
            assert abs(count - exact) <= 0.5 * (w + h), (w, h, count, exact)
            if w >= 64:
                assert abs(count - exact) / exact < 0.02


@pytest.mark.parametrize("shape", S.SHAPES)
def test_masks_are_mirror_symmetric(shape):
    for w, h in [(14, 14), (15, 15), (21, 20), (36, 36), (144, 144)]:
        mask = S.local_mask(shape, w, h)
        np.testing.assert_array_equal(mask, mask[:, ::-1])
        if shape != "triangle":
            np.testing.assert_array_equal(mask, mask[::-1, :])


def test_triangle_apex_top_centre_and_base_full():
    for w in range(6, 80):
        mask = S.local_mask("triangle", w, w)
        rows = np.nonzero(mask.any(1))[0]
        top = rows[0]
        # The apex row is the first row (odd width) or the second (even width, see docs).
        assert top == (0 if w % 2 else 1)
        cols = np.nonzero(mask[top])[0]
        assert (cols.min() + cols.max() + 1) / 2 == w / 2
        assert len(cols) <= 2
        assert mask[-1].all()
        # Row widths never shrink going down.
        widths = mask.sum(1)
        assert (np.diff(widths) >= 0).all()


def test_scale_invariance_of_boxes():
    for v in range(0, 65):
        assert S.to_pixels(v, 64) == v
        assert S.to_pixels(v, 128) == 2 * v
        assert S.to_pixels(v, 256) == 4 * v
        assert abs(S.to_pixels(v, 32) - v / 2) <= 0.5
    scene, _ = S.sample_scene("train", 1)
    small, large = S.render(scene, 64), S.render(scene, 128)
    # Squares scale exactly; every object's box scales by exactly 2.
    for obj in scene.objects:
        b64, b128 = S.pixel_box(obj.box, 64), S.pixel_box(obj.box, 128)
        assert tuple(2 * v for v in b64) == b128
    # Nearest-neighbour downsampling keeps the colours at each object's centre.
    for obj in scene.objects:
        x0, y0, side = obj.box
        cx, cy = x0 + side // 2, y0 + 3 * side // 4
        assert (small[cy, cx] == large[2 * cy, 2 * cx]).all()


# ----------------------------------------------------------------------------- sampling


def test_examples_are_deterministic_and_distinct():
    a = [S.example("train", i) for i in range(40)]
    b = [S.example("train", i) for i in range(40)]
    for x, y in zip(a, b):
        assert x["caption"] == y["caption"]
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    images = {x["image"].tobytes() for x in a}
    assert len(images) == len(a)
    # Splits are independent streams.
    v = [S.example("validation", i) for i in range(40)]
    assert sum(x["image"].tobytes() == y["image"].tobytes() for x, y in zip(a, v)) == 0


def test_image_size_does_not_change_scene():
    for split in S.SPLITS:
        for i in range(30):
            e32, e256 = S.example(split, i, 32), S.example(split, i, 256)
            assert e32["caption"] == e256["caption"]
            for k in ("num_objects", "colors", "shapes", "boxes", "relation"):
                np.testing.assert_array_equal(e32[k], e256[k])


def test_golden_examples():
    # Pins the sampler so a change to the draw order (which would silently change every
    # stored dataset) fails loudly.
    scene, caption = S.sample_scene("train", 0)
    assert scene == S.Scene((S.ShapeObject("red", "triangle", (22, 24, 33)),), "none")
    assert caption == "one red triangle"
    scene, caption = S.sample_scene("train", 3)
    assert scene == S.Scene(
        (S.ShapeObject("yellow", "circle", (3, 28, 19)),
         S.ShapeObject("red", "circle", (40, 45, 14))),
        "horizontal",
    )
    assert caption == "a yellow circle to the left of a red circle"


def test_invalid_arguments():
    with pytest.raises(ValueError):
        S.sample_scene("test", 0)
    with pytest.raises(ValueError):
        S.sample_scene("train", -1)


def test_held_out_objects_split_cleanly(train_scenes):
    seen = set()
    for scenes in (train_scenes, _scenes("validation", 3000)):
        for scene, _ in scenes:
            objs = {(o.color, o.shape) for o in scene.objects}
            assert not objs & S.HELD_OUT
            seen |= objs
    assert seen == set(S.IN_DISTRIBUTION_OBJECTS)
    seen = set()
    for scene, _ in _scenes("test_compositional", 1500):
        objs = {(o.color, o.shape) for o in scene.objects}
        assert objs & S.HELD_OUT
        seen |= objs
    # Held-out objects also meet every other object in pairs.
    assert seen == set(S.ALL_OBJECTS)


def _inside(box, xband, yband):
    x0, y0, side = box
    return (xband[0] <= x0 and x0 + side <= xband[1]
            and yband[0] <= y0 and y0 + side <= yband[1])


@pytest.mark.parametrize("split", S.SPLITS)
def test_layout_constraints(split, train_scenes):
    scenes = train_scenes if split == "train" else _scenes(split, 1500)
    counts = {r: 0 for r in S.RELATIONS}
    sides = {r: set() for r in S.RELATIONS}
    for scene, _ in scenes:
        counts[scene.relation] += 1
        for o in scene.objects:
            sides[scene.relation].add(o.box[2])
        if scene.relation == "none":
            (obj,) = scene.objects
            assert _inside(obj.box, S.CANVAS_BAND, S.CANVAS_BAND)
            continue
        a, b = scene.objects
        assert (a.color, a.shape) != (b.color, b.shape)
        if scene.relation == "horizontal":
            assert _inside(a.box, S.NEAR_BAND, S.CANVAS_BAND)
            assert _inside(b.box, S.FAR_BAND, S.CANVAS_BAND)
        else:
            assert _inside(a.box, S.CANVAS_BAND, S.NEAR_BAND)
            assert _inside(b.box, S.CANVAS_BAND, S.FAR_BAND)
    assert sides["none"] == set(range(S.SINGLE_SIDE[0], S.SINGLE_SIDE[1] + 1))
    assert sides["horizontal"] | sides["vertical"] == set(
        range(S.PAIR_SIDE[0], S.PAIR_SIDE[1] + 1))
    n = len(scenes)
    # 1/3 single, 1/3 horizontal, 1/3 vertical (5-sigma-ish bounds).
    for r in S.RELATIONS:
        assert abs(counts[r] / n - 1 / 3) < 0.06, counts


def test_labels_round_trip_through_renderer():
    for split in S.SPLITS:
        for i in range(20):
            e = S.example(split, i, 48)
            assert e["colors"].dtype == np.int32 and e["boxes"].shape == (2, 3)
            if e["num_objects"] == 1:
                assert (e["colors"][1], e["shapes"][1]) == (-1, -1)
                assert (e["boxes"][1] == -1).all()
            scene = S.scene_from_labels(**{k: e[k] for k in
                                           ("num_objects", "colors", "shapes", "boxes",
                                            "relation")})
            np.testing.assert_array_equal(S.render(scene, 48), e["image"])


# ----------------------------------------------------------------------------- captions


def test_every_template_appears_and_parses_back(train_scenes):
    used = set()
    for i, (scene, template) in enumerate(train_scenes[:1000]):
        caption = S.sample_scene("train", i)[1]
        assert caption == caption.lower()
        used.add((scene.relation, template))
        assert S.parse_caption(caption) == S.scene_meaning(scene)
    assert used == {(r, t) for r in S.RELATIONS for t in range(S.NUM_TEMPLATES)}


def test_all_meanings_and_caption_round_trip():
    meanings = S.all_meanings()
    ind, held = meanings["in_distribution"], meanings["held_out"]
    assert len(ind) == 15 + 2 * 15 * 14 and len(held) == 3 + 2 * 96
    assert len(set(ind) | set(held)) == len(ind) + len(held)
    assert not any(m.held_out for m in ind) and all(m.held_out for m in held)
    for m in itertools.chain(ind, held):
        captions = S.captions_for(m)
        assert len(captions) == S.NUM_TEMPLATES == len(set(captions))
        for c in captions:
            assert S.parse_caption(c) == m
    assert S.meanings_for_split("validation") == ind
    assert S.meanings_for_split("test_compositional") == held
    for split in S.SPLITS:
        allowed = set(S.meanings_for_split(split))
        for scene, _ in _scenes(split, 200):
            assert S.scene_meaning(scene) in allowed


def test_captions_match_spec_wording():
    m = S.Meaning((("red", "circle"), ("blue", "square")), "horizontal")
    assert S.captions_for(m) == (
        "a red circle to the left of a blue square",
        "a blue square to the right of a red circle",
        "red circle left of blue square",
        "on the left a red circle, on the right a blue square",
    )
    m = S.Meaning((("green", "triangle"), ("cyan", "square")), "vertical")
    assert S.captions_for(m) == (
        "a green triangle above a cyan square",
        "a cyan square below a green triangle",
        "green triangle on top of cyan square",
        "at the top a green triangle, at the bottom a cyan square",
    )
    m = S.Meaning((("yellow", "circle"),), "none")
    assert S.captions_for(m) == (
        "a yellow circle", "one yellow circle", "a yellow circle on a black background",
        "a circle that is yellow",
    )
    with pytest.raises(ValueError):
        S.captions_for(S.Meaning((("red", "circle"), ("red", "circle")), "vertical"))


def test_parse_caption_normalises_and_rejects():
    want = S.Meaning((("red", "circle"), ("blue", "square")), "horizontal")
    assert S.parse_caption("  A Red circle  to the LEFT of a blue square. ") == want
    assert S.parse_caption(b"on the left a red circle , on the right a blue square") == want
    for bad in ["", "a purple circle", "a red hexagon", "two red circles",
                "a red circle to the left of a red circle", "a red circle above"]:
        assert S.parse_caption(bad) is None


# ----------------------------------------------------------------------------- TFDS builder


@pytest.fixture(scope="module")
def tiny_builder(tmp_path_factory):
    from dalle_jax.data import shapes_tfds

    data_dir = tmp_path_factory.mktemp("shapes_tfds")
    builder = shapes_tfds.shapes_builder(
        str(data_dir), image_size=32, num_train=12, num_validation=4, num_test=5)
    builder.download_and_prepare()
    return builder


def test_builder_round_trip(tiny_builder):
    sources = tiny_builder.as_data_source()
    sizes = {"train": 12, "validation": 4, "test_compositional": 5}
    assert {k: len(v) for k, v in sources.items()} == sizes
    assert tiny_builder.info.file_format.value == "array_record"
    for split, n in sizes.items():
        for i in range(n):
            rec, ref = sources[split][i], S.example(split, i, 32)
            assert rec["image"].dtype == np.uint8 and rec["image"].shape == (32, 32, 3)
            assert rec["image"].tobytes() == ref["image"].tobytes()
            assert rec["caption"].decode() == ref["caption"]
            assert int(rec["index"]) == i
            for k in ("num_objects", "relation"):
                assert int(rec[k]) == int(ref[k])
            for k in ("colors", "shapes", "boxes"):
                assert rec[k].dtype == np.int32
                np.testing.assert_array_equal(rec[k], ref[k])
    assert tiny_builder.info.features["relation"].names == list(S.RELATIONS)


def test_builder_by_name_and_distinct_configs(tiny_builder, tmp_path):
    import tensorflow_datasets as tfds

    from dalle_jax.data import shapes_tfds

    name = tiny_builder.builder_config.name
    assert name == "s32_12_4_5"
    src = tfds.data_source(f"shapes/{name}", data_dir=tiny_builder.data_dir_root,
                           split="validation")
    assert src[2]["caption"].decode() == S.example("validation", 2)["caption"]

    names = {shapes_tfds.config_name(*p) for p in
             itertools.product((32, 64), (10, 11), (3, 4), (3, 4))}
    assert len(names) == 16
    default = shapes_tfds.shapes_builder(str(tmp_path))
    other = shapes_tfds.shapes_builder(str(tmp_path), image_size=32)
    assert default.builder_config.name == "s64_100000_5000_5000"
    assert other.builder_config.image_size == 32
    assert default.data_dir != other.data_dir
