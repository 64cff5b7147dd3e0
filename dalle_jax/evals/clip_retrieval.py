"""How well a contrastive scorer tells `shapes` captions apart (``type="clip"``, subject:
the scorer).

The reranker is only as good as its ranking of captions that differ in one colour, one
shape or the arrangement of two objects. For the first ``num_examples`` images of each
split in ``splits`` (centre crops, in dataset order) this reports:

* ``{split}/hard_negative_accuracy``: the image's own caption scores above all
  ``negatives`` hard negatives of it (`dalle_jax.data.shapes_negatives`: relation
  reversed, colours or shapes swapped, one attribute changed, an object dropped or
  added), drawn once with ``seed``, the same at every evaluation;
* ``{split}/negatives/{kind}``: the own caption beats a negative of that kind, over all
  such pairs;
* ``{split}/retrieval_top1``: among the canonical captions of every meaning of the split
  (`dalle_jax.data.shapes.meanings_for_split`), the best-scoring one is the image's
  meaning; ``{split}/retrieval_top1_pairs``: the same over the two-object scenes only;
* ``{split}/num_examples``.

It runs in ``--job=train_clip`` (every ``every`` steps and at the end; the final result
goes into the export's ``meta.json`` as ``retrieval``) and in ``--job=evaluate`` on any
scorer export, trained or imported (OpenAI CLIP included), with the config's ``data``
section naming the prepared `shapes` dataset.

Settings: ``splits`` (comma-separated `shapes` splits), ``num_examples`` (per split; 0
disables it), ``negatives`` (hard negatives per image, >= 1), ``batch_size`` (images or
captions embedded per call), ``seed``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dalle_jax import configlib, sharding
from dalle_jax.data import augment, shapes, sources
from dalle_jax.data import shapes_negatives as negatives_lib
from dalle_jax.evals import registry

PyTree = Any

# Seeds the evaluation negatives' generators (with the section's seed and the image index).
_EVAL_STREAM = 0xE7A1


def section_problems(section: Any, *, prefix: str = "evals.clip") -> list[str]:
    """What is wrong with a ``clip`` section's settings, one message per setting (naming
    it under ``prefix``); empty when nothing is."""
    get = section.get if hasattr(section, "get") else (lambda k, d=None: d)
    problems = []
    if int(get("negatives", 8)) < 1:
        problems.append(f"{prefix}.negatives must be >= 1, got {get('negatives', 8)}")
    if int(get("num_examples", 500)) < 0:
        problems.append(f"{prefix}.num_examples must be >= 0, got {get('num_examples', 500)}")
    for split in configlib.comma_list(get("splits", "validation")):
        if split not in shapes.SPLITS:
            problems.append(f"{prefix}.splits names {split!r}, not a shapes split "
                            f"{shapes.SPLITS}")
    return problems


def _text(value: Any) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


@dataclasses.dataclass
class _EvalSplit:
    pixels: np.ndarray  # (M, H, W, 3) float32, preprocessed
    captions: list[str]  # (M,)
    negatives: list[list[str]]  # (M, K)
    kinds: list[list[str]]  # (M, K)
    target: np.ndarray  # (M,) index of each image's meaning among `candidates`
    is_pair: np.ndarray  # (M,) bool
    candidates: list[str]  # canonical caption of every meaning of the split


@registry.register("clip", subject="scorer")
class ClipRetrieval(registry.Evaluator):
    """Hard-negative accuracy and caption retrieval of a scorer on `shapes` (module doc).

    Needs ``ctx.model`` (the `dalle_jax.models.clip.CLIP` towers) and
    ``ctx.text_tokenizer`` (anything with ``encode_batch(texts, context_length)``, as the
    scorer exports' tokenizers have). The last result is kept in ``last``, with its
    ``step``.
    """

    def __init__(self, name: str, section: Any, ctx: registry.EvalContext):
        super().__init__(name, section, ctx)
        problems = section_problems(section, prefix=f"evals.{name}")
        if problems:
            raise ValueError("invalid evaluation settings:\n  " + "\n  ".join(problems))
        if ctx.model is None or ctx.text_tokenizer is None:
            raise ValueError(f"evals.{name} needs the scorer's towers and tokenizer")
        self.splits = configlib.comma_list(self.setting("splits", "validation"))
        self.num_examples = int(self.setting("num_examples", 500))
        self.negatives = int(self.setting("negatives", 8))
        self.batch_size = max(1, int(self.setting("batch_size", 250)))
        self.seed = int(self.setting("seed", 0))
        self.enabled = self.num_examples > 0 and bool(self.splits)
        self.config = ctx.model.config
        self.tokenizer = ctx.text_tokenizer
        self._data: dict[str, _EvalSplit] = {}
        self.last: dict | None = None

    def _load(self, split: str) -> _EvalSplit:
        from dalle_jax.models import clip

        if split in self._data:
            return self._data[split]
        cfg = self.ctx.cfg
        source = sources.load_split(cfg.data, split)
        m = min(self.num_examples, len(source))
        size = int(cfg.data.image_size)
        images, captions = [], []
        for i in range(m):
            record = source[i]
            images.append(augment.center_crop_resize(np.asarray(record["image"]), None, size))
            captions.append(_text(record["caption"]))
        objects = negatives_lib.allowed_objects(split)
        negs, kinds = [], []
        for i, caption in enumerate(captions):
            rng = np.random.default_rng([_EVAL_STREAM, self.seed, i])
            n, kd = negatives_lib.sample_negatives(caption, self.negatives, rng, objects=objects,
                                                   return_kinds=True)
            negs.append(n)
            kinds.append(kd)
        meanings = shapes.meanings_for_split(split)
        where = {mn: j for j, mn in enumerate(meanings)}
        parsed = [shapes.parse_caption(c) for c in captions]
        data = _EvalSplit(
            pixels=np.asarray(clip.preprocess(np.stack(images), self.config), np.float32),
            captions=captions, negatives=negs, kinds=kinds,
            target=np.asarray([where[p] for p in parsed], np.int64),
            is_pair=np.asarray([len(p.objects) == 2 for p in parsed]),
            candidates=[negatives_lib.canonical_caption(mn) for mn in meanings])
        self._data[split] = data
        return data

    def __call__(self, params: PyTree, step: int) -> dict[str, float]:
        from dalle_jax.rerank.scorer import ClipScorer

        # The reranker over these params: the embeddings reranking computes, in batches
        # split over the run's mesh.
        cfg = self.ctx.cfg
        scorer = ClipScorer(self.config, params, self.tokenizer,
                            mesh=sharding.make_mesh(cfg.mesh), rules=cfg.sharding_rules,
                            batch_size=self.batch_size)
        result: dict[str, float] = {}
        for split in self.splits:
            d = self._load(split)
            img = scorer.embed_pixels(d.pixels)
            unique = sorted(set(d.captions + [t for row in d.negatives for t in row]
                                + d.candidates))
            emb = dict(zip(unique, scorer.embed_captions(unique)))
            true = np.sum(img * np.stack([emb[c] for c in d.captions]), axis=-1)
            neg = np.einsum("me,mke->mk", img,
                            np.stack([np.stack([emb[t] for t in row]) for row in d.negatives]))
            result[f"{split}/hard_negative_accuracy"] = float(np.mean(true > neg.max(axis=1)))
            beats = true[:, None] > neg
            kinds = np.asarray(d.kinds)
            for kind in negatives_lib.KINDS:
                sel = kinds == kind
                if sel.any():
                    result[f"{split}/negatives/{kind}"] = float(beats[sel].mean())
            cand = np.stack([emb[c] for c in d.candidates])
            top1 = np.argmax(img @ cand.T, axis=1) == d.target
            result[f"{split}/retrieval_top1"] = float(top1.mean())
            if d.is_pair.any():
                result[f"{split}/retrieval_top1_pairs"] = float(top1[d.is_pair].mean())
            result[f"{split}/num_examples"] = float(len(d.captions))
        self.last = dict(result, step=int(step))
        return result
