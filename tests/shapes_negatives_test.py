"""Hard negative captions of `shapes`: always a different meaning, every kind, the split's
objects only, deterministic per seed."""

import numpy as np
import pytest

from dalle_jax.data import shapes
from dalle_jax.data import shapes_negatives as neg


def _captions(split, n):
    return [shapes.sample_scene(split, i)[1] for i in range(n)]


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_negatives_never_mean_the_caption_and_stay_in_the_split(split):
    allowed = set(neg.allowed_objects(split))
    for i, caption in enumerate(_captions(split, 150)):
        meaning = shapes.parse_caption(caption)
        negs, kinds = neg.sample_negatives(caption, 12, np.random.default_rng(i), split=split,
                                           return_kinds=True)
        assert len(negs) == len(kinds) == 12
        for text, kind in zip(negs, kinds):
            m = shapes.parse_caption(text)
            assert m is not None, text  # a real caption, written with some template
            assert m != meaning, (caption, text, kind)
            assert set(m.objects) <= allowed, (caption, text)
        if split != "test_compositional":
            assert not any(shapes.parse_caption(t).held_out for t in negs)


def test_training_negatives_never_name_a_held_out_object():
    # A swap of colours or shapes between two in-distribution objects can make a held-out
    # one ("yellow circle" + "magenta triangle" -> "yellow triangle"): it is left out.
    caption = "a yellow circle to the left of a magenta triangle"
    cands = neg.negative_meanings(shapes.parse_caption(caption),
                                  objects=neg.allowed_objects("train"))
    assert "swap_shapes" not in cands and "swap_colors" not in cands
    for pool in cands.values():
        assert not any(m.held_out for m in pool)
    every = neg.negative_meanings(shapes.parse_caption(caption))  # all objects allowed
    assert every["swap_shapes"] == (shapes.Meaning(
        (("yellow", "triangle"), ("magenta", "circle")), "horizontal"),)
    with pytest.raises(ValueError, match="outside the allowed set"):
        neg.sample_negatives("a cyan circle", 2, np.random.default_rng(0), split="train")


def test_each_kind_is_what_it_says():
    m = shapes.parse_caption("a red square to the left of a blue circle")
    c = neg.negative_meanings(m)
    H = "horizontal"
    assert c["swap_relation"] == (shapes.Meaning((("blue", "circle"), ("red", "square")), H),)
    assert c["swap_colors"] == (shapes.Meaning((("blue", "square"), ("red", "circle")), H),)
    assert c["swap_shapes"] == (shapes.Meaning((("red", "circle"), ("blue", "square")), H),)
    assert c["change_axis"] == (shapes.Meaning(m.objects, "vertical"),)
    assert set(c["drop_object"]) == {shapes.Meaning((o,), "none") for o in m.objects}
    assert len(c["change_color"]) == 2 * 5 and len(c["change_shape"]) == 2 * 2
    for x in c["change_color"]:
        assert sum(a != b for a, b in zip(x.objects, m.objects)) == 1
        assert [s for _, s in x.objects] == [s for _, s in m.objects]
    single = neg.negative_meanings(shapes.parse_caption("a red square"))
    assert set(single) == set(neg.SINGLE_KINDS)
    assert all(x.objects[0][1] == "square" for x in single["change_color"])
    assert all(len(x.objects) == 2 and ("red", "square") in x.objects
               for x in single["add_object"])
    # Same colour: no colour swap; same shape: no shape swap.
    same = neg.negative_meanings(shapes.parse_caption("a red square above a red circle"))
    assert "swap_colors" not in same and "swap_shapes" in same


def test_sampling_covers_every_kind_and_varies_the_wording():
    rng = np.random.default_rng(0)
    _, kinds = neg.sample_negatives("a red square above a blue circle", len(neg.PAIR_KINDS),
                                    rng, return_kinds=True)
    assert sorted(kinds) == sorted(neg.PAIR_KINDS)
    _, kinds = neg.sample_negatives("one green triangle", 3, rng, return_kinds=True)
    assert sorted(kinds) == sorted(neg.SINGLE_KINDS)
    seen_kinds, templates = set(), set()
    for i, caption in enumerate(_captions("train", 60)):
        negs, kinds = neg.sample_negatives(caption, 8, np.random.default_rng(i),
                                           return_kinds=True)
        seen_kinds.update(kinds)
        for t in negs:
            templates.add(shapes.captions_for(shapes.parse_caption(t)).index(t))
    assert seen_kinds == set(neg.KINDS)
    assert templates == set(range(shapes.NUM_TEMPLATES))
    # No repeats while there are unused candidates; repeats (not an error) after that.
    negs = neg.sample_negatives("a red square", 40, np.random.default_rng(1))
    meanings = [shapes.parse_caption(t) for t in negs]
    assert len(set(meanings)) == 40
    pool = neg.negative_meanings(shapes.parse_caption("red square left of blue circle"),
                                 objects=neg.allowed_objects("train"))
    n = sum(len(v) for v in pool.values())
    negs = neg.sample_negatives("red square left of blue circle", n + 5,
                                np.random.default_rng(1))
    meanings = [shapes.parse_caption(t) for t in negs]
    assert len(set(meanings[:n])) == n and len(set(meanings)) == n


def test_negatives_are_deterministic_per_seed():
    caption = b"at the top a green circle, at the bottom a red triangle"
    a = neg.sample_negatives(caption, 9, np.random.default_rng([3, 7]))
    b = neg.sample_negatives(caption, 9, np.random.default_rng([3, 7]))
    c = neg.sample_negatives(caption, 9, np.random.default_rng([3, 8]))
    assert a == b and a != c


def test_a_caption_that_does_not_parse_is_an_error():
    with pytest.raises(ValueError, match="not a shapes caption"):
        neg.sample_negatives("a photo of a dog", 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown shapes split"):
        neg.allowed_objects("test")


def test_structural_kinds_come_first_when_asked():
    caption = "a red square to the left of a blue circle"
    for seed in range(5):
        _, kinds = neg.sample_negatives(caption, 4, np.random.default_rng(seed),
                                        first=neg.STRUCTURAL_KINDS, return_kinds=True)
        assert sorted(kinds) == sorted(neg.STRUCTURAL_KINDS)
    # Same colour: no colour swap, so the fourth negative is of another kind.
    _, kinds = neg.sample_negatives("a red square above a red circle", 4,
                                    np.random.default_rng(0), first=neg.STRUCTURAL_KINDS,
                                    return_kinds=True)
    assert set(kinds[:3]) == {"swap_relation", "change_axis", "swap_shapes"}
    assert kinds[3] not in neg.STRUCTURAL_KINDS
    # Singles have none of them: the usual round robin.
    _, kinds = neg.sample_negatives("a red square", 3, np.random.default_rng(0),
                                    first=neg.STRUCTURAL_KINDS, return_kinds=True)
    assert sorted(kinds) == sorted(neg.SINGLE_KINDS)


def test_paraphrase_is_another_wording_of_the_same_meaning():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        p = neg.paraphrase(b"A red square to the left of a blue circle.", rng)
        assert shapes.parse_caption(p) == shapes.parse_caption("red square left of blue circle")
        assert p != "a red square to the left of a blue circle"
        seen.add(p)
    assert len(seen) == shapes.NUM_TEMPLATES - 1
