"""Hard negative captions for `shapes`: captions whose meaning differs minimally from a true one.

A contrastive scorer trained only against the other captions of its batch can get far by
recognising which colours and shapes are present: two random captions rarely agree on
both objects, so the spatial relation, which object has which colour, and how many
objects there are, barely matter to the loss. Reranking samples needs exactly those
distinctions, so training (and evaluation) add, for every image, captions that say
*almost* what the true caption says:

=================  ==========================================================================
kind               from "a red square to the left of a blue circle" (or "a red square")
=================  ==========================================================================
``swap_relation``  the objects swapped: "a blue circle to the left of a red square"
``swap_colors``    the colours swapped between the objects: "a blue square ... a red circle"
``swap_shapes``    the shapes swapped between the objects: "a red circle ... a blue square"
``change_color``   one object's colour changed: "a red square ... a green circle";
                   a single object: "a green square"
``change_shape``   one object's shape changed: "a red triangle ... a blue circle";
                   a single object: "a red circle"
``change_axis``    the other axis, same order: "a red square above a blue circle"
``drop_object``    a pair's caption reduced to one of its objects: "a blue circle"
``add_object``     a single object's caption with a second object next to it
=================  ==========================================================================

Every negative is a valid caption meaning (`shapes.Meaning`) that differs from the true
one, built only from the objects the split allows (`allowed_objects`: the training and
validation splits never name a held-out object, so training never sees one), and written
with a randomly chosen caption template (`shapes.captions_for`) so that the wording does
not give it away. Everything is a pure function of the caption, the object set and the
NumPy generator passed in, so a seeded generator gives the same negatives anywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from dalle_jax.data import shapes
from dalle_jax.data.shapes import Meaning

KINDS: tuple[str, ...] = ("swap_relation", "swap_colors", "swap_shapes", "change_color",
                          "change_shape", "change_axis", "drop_object", "add_object")
# Kinds that apply to a single object / to a pair.
SINGLE_KINDS: tuple[str, ...] = ("change_color", "change_shape", "add_object")
PAIR_KINDS: tuple[str, ...] = ("swap_relation", "swap_colors", "swap_shapes", "change_color",
                               "change_shape", "change_axis", "drop_object")

# The kinds in-batch negatives almost never supply: the same two objects in another
# arrangement, or with their colours or shapes exchanged.
STRUCTURAL_KINDS: tuple[str, ...] = ("swap_relation", "change_axis", "swap_colors", "swap_shapes")

Obj = tuple[str, str]


def allowed_objects(split: str) -> tuple[Obj, ...]:
    """The objects negatives of ``split`` may name: the in-distribution objects for
    ``train`` and ``validation``, every object for ``test_compositional`` (whose captions
    pair held-out objects with in-distribution ones)."""
    if split not in shapes.SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; expected one of {shapes.SPLITS}")
    return shapes.ALL_OBJECTS if split == "test_compositional" else shapes.IN_DISTRIBUTION_OBJECTS


def _valid(meaning: Meaning, objects: frozenset[Obj]) -> bool:
    if any(o not in objects for o in meaning.objects):
        return False
    return len(meaning.objects) == 1 or meaning.objects[0] != meaning.objects[1]


@functools.lru_cache(maxsize=8192)
def _candidates(meaning: Meaning, objects: frozenset[Obj]
                ) -> tuple[tuple[str, tuple[Meaning, ...]], ...]:
    """Every negative meaning of ``meaning`` by kind (kinds without one are left out)."""
    out: dict[str, list[Meaning]] = {k: [] for k in KINDS}
    colors, shape_names = shapes.COLOR_NAMES, shapes.SHAPES
    if meaning.relation == "none":
        ((c, s),) = meaning.objects
        out["change_color"] = [Meaning(((c2, s),), "none") for c2 in colors if c2 != c]
        out["change_shape"] = [Meaning(((c, s2),), "none") for s2 in shape_names if s2 != s]
        for other in sorted(objects):
            for relation in ("horizontal", "vertical"):
                out["add_object"] += [Meaning(((c, s), other), relation),
                                      Meaning((other, (c, s)), relation)]
    else:
        (ca, sa), (cb, sb) = meaning.objects
        rel = meaning.relation
        out["swap_relation"] = [Meaning(((cb, sb), (ca, sa)), rel)]
        out["swap_colors"] = [Meaning(((cb, sa), (ca, sb)), rel)]
        out["swap_shapes"] = [Meaning(((ca, sb), (cb, sa)), rel)]
        for k in range(2):
            c, s = meaning.objects[k]
            for c2 in colors:
                if c2 != c:
                    objs = list(meaning.objects)
                    objs[k] = (c2, s)
                    out["change_color"].append(Meaning(tuple(objs), rel))
            for s2 in shape_names:
                if s2 != s:
                    objs = list(meaning.objects)
                    objs[k] = (c, s2)
                    out["change_shape"].append(Meaning(tuple(objs), rel))
        other_axis = "vertical" if rel == "horizontal" else "horizontal"
        out["change_axis"] = [Meaning(meaning.objects, other_axis)]
        out["drop_object"] = [Meaning((o,), "none") for o in meaning.objects]
    result = []
    for kind in KINDS:
        seen: list[Meaning] = []
        for m in out[kind]:
            if m != meaning and _valid(m, objects) and m not in seen:
                seen.append(m)
        if seen:
            result.append((kind, tuple(seen)))
    return tuple(result)


def negative_meanings(meaning: Meaning, *, objects: Sequence[Obj] | None = None
                      ) -> dict[str, tuple[Meaning, ...]]:
    """Every hard negative of ``meaning`` by kind, over ``objects`` (default: every
    object; kinds with no valid negative are absent). None equals ``meaning``."""
    objs = frozenset(shapes.ALL_OBJECTS if objects is None else objects)
    return dict(_candidates(meaning, objs))


@functools.lru_cache(maxsize=65536)
def _parse(caption: str) -> Meaning:
    meaning = shapes.parse_caption(caption)
    if meaning is None:
        raise ValueError(f"not a shapes caption: {caption!r}")
    return meaning


def sample_negatives(caption: str | bytes, k: int, rng: np.random.Generator, *,
                     split: str = "train", objects: Sequence[Obj] | None = None,
                     first: Sequence[str] = (), return_kinds: bool = False):
    """``k`` hard negative captions of ``caption``, drawn with ``rng``.

    The kinds that apply are visited in a random order (those of ``first`` before the
    others), round robin, and each visit draws
    one negative of that kind not drawn yet (a kind whose negatives are all drawn is
    skipped), so ``k`` at least the number of applicable kinds (7 for a pair, 3 for a
    single object) covers every kind, and no meaning repeats until every candidate has
    been drawn (only for very large ``k``); drawing then starts over.

    Args:
      caption: a `shapes` caption (any template, str or UTF-8 bytes).
      k: how many negatives.
      rng: the generator every choice (kinds, negatives, templates) is drawn from.
      split: negatives name only the objects of `allowed_objects(split)`.
      objects: overrides ``split``'s object set.
      first: kinds to visit before all others (those that apply, in random order): with
        ``k`` smaller than the number of kinds, the negatives are then of these kinds.
      return_kinds: also return each negative's kind.

    Returns:
      ``k`` caption strings (and, with ``return_kinds``, their ``k`` kinds).

    Raises:
      ValueError: ``caption`` is not a `shapes` caption, or it names an object outside the
        allowed set (so the negatives would not be of the same split).
    """
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8")
    meaning = _parse(str(caption))
    objs = frozenset(allowed_objects(split) if objects is None else objects)
    if any(o not in objs for o in meaning.objects):
        raise ValueError(f"caption {caption!r} names an object outside the allowed set of "
                         f"split {split!r}")
    candidates = _candidates(meaning, objs)
    if not candidates:  # cannot happen with >= 2 colours and shapes; kept for safety
        raise ValueError(f"no hard negative exists for {caption!r} over these objects")
    # The applicable kinds of ``first`` in random order, then the others in random order.
    ranks = [0 if kind in first else 1 for kind, _ in candidates]
    shuffled = [int(j) for j in rng.permutation(len(candidates))]
    order = sorted(shuffled, key=lambda j: ranks[j])
    remaining = [list(range(len(c[1]))) for c in candidates]
    captions, kinds = [], []
    turn = 0
    for _ in range(int(k)):
        if not any(remaining):
            remaining = [list(range(len(c[1]))) for c in candidates]
        while not remaining[order[turn % len(order)]]:  # skip kinds used up
            turn += 1
        j = order[turn % len(order)]
        turn += 1
        kind, pool = candidates[j]
        pick = remaining[j].pop(int(rng.integers(len(remaining[j]))))
        texts = shapes.captions_for(pool[pick])
        captions.append(texts[int(rng.integers(len(texts)))])
        kinds.append(kind)
    return (captions, kinds) if return_kinds else captions


def paraphrase(caption: str | bytes, rng: np.random.Generator) -> str:
    """Another wording of ``caption``: the same meaning written with one of the other
    templates, drawn with ``rng``."""
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8")
    texts = shapes.captions_for(_parse(str(caption)))
    own = shapes._normalise(str(caption))
    others = [t for t in texts if t != own]
    return others[int(rng.integers(len(others)))]


def canonical_caption(meaning: Meaning) -> str:
    """The first template's caption of ``meaning`` (what retrieval evaluations rank)."""
    return shapes.captions_for(meaning)[0]
