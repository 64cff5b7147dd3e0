"""Scorers: how well does each image match its caption? Higher is better.

A `Scorer` maps ``(images, captions)`` pairs to one score each. Reranking
(`dalle_jax.rerank.best_of`) keeps the best-scoring candidates of every caption, as the
paper does with a contrastive model (CLIP) over 512 samples per caption.

* `ClipScorer`: a contrastive image/text model (`dalle_jax.models.clip`), either trained
  here (``--job=train_clip``) or imported from OpenAI's CLIP release
  (``--job=import_clip``). Its export is self-contained: parameters, the model config, and
  the text tokenizer's file, all checked when loaded. The score is the cosine similarity
  of the two embeddings.
* `ShapesCheckerScorer`: the `shapes` caption checker (1 for a match, 0 otherwise). It
  grades the samples, so it must never pick them in a reported result; it exists to test
  the reranking plumbing with a scorer whose answer is known.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding

from dalle_jax import sharding

PyTree = Any


@runtime_checkable
class Scorer(Protocol):
    """Scores image/caption pairs.

    Attributes:
        name: a short name for reports ("clip", "shapes_checker").
    """

    name: str

    def score(self, images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        """``(N,)`` float32 scores of ``images[i]`` (uint8 ``(N, H, W, 3)``) against
        ``captions[i]``; higher means a better match."""
        ...

    def identity(self) -> dict:
        """What a report records to say which scorer ranked its images."""
        ...


def _check_pairs(images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3), got shape {images.shape}")
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images for {len(captions)} captions: a score needs "
                         "one caption per image")
    return images


class ShapesCheckerScorer:
    """The `shapes` caption checker as a scorer (1.0 match, 0.0 no match).

    For tests of the reranking machinery only: reported reranking results use a learned
    scorer, since this one is also the judge.
    """

    name = "shapes_checker"

    def score(self, images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        from dalle_jax.evals import shapes_match

        images = _check_pairs(images, captions)
        return np.asarray([float(shapes_match.match(im, c).ok)
                           for im, c in zip(images, captions)], np.float32)

    def identity(self) -> dict:
        return {"kind": "shapes_checker"}


def encode_images(params, pixels, *, model):
    """Unit-norm image embeddings of preprocessed pixels (jittable with ``model`` bound)."""
    from dalle_jax.models import clip

    return clip.normalize(model.apply({"params": params}, pixels, method=model.encode_image))


def encode_texts(params, tokens, eot, *, model):
    """Unit-norm caption embeddings of tokens pooled at ``eot`` (jittable)."""
    from dalle_jax.models import clip

    return clip.normalize(model.apply({"params": params}, tokens, eot,
                                      method=model.encode_text))


class ClipScorer:
    """Cosine similarity of a contrastive model's image and text embeddings.

    Args:
        config: the `ClipConfig` of the towers.
        params: their parameters.
        tokenizer: turns captions into ``(tokens, eot_index, truncated)`` for the text
            tower (`encode_batch`); its ``vocab_size`` must fit the text tower.
        meta: the export's metadata (recorded in reports as the scorer's identity).
        mesh: embed on this mesh (parameters replicated, batches split over its batch
            axes with the logical-axis ``rules``); None: the default device.
        batch_size: images (and captions) embedded per call.

    Images of another size than the model's are resized (and centre-cropped) by the
    model's preprocessing; captions longer than its text slots are truncated with a
    warning naming them. Caption embeddings are cached, since reranking scores many
    candidates against the same caption.
    """

    name = "clip"

    def __init__(self, config, params: PyTree, tokenizer: Any, *, meta: dict | None = None,
                 mesh=None, rules=None, batch_size: int = 64):
        from dalle_jax.models import clip

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"the scorer's tokenizer has {tokenizer.vocab_size} ids but its "
                             f"text tower embeds only {config.vocab_size}: they do not belong "
                             "together")
        self.config = config
        self.tokenizer = tokenizer
        self.meta = dict(meta or {})
        self.batch_size = int(batch_size)
        self._model = clip.CLIP(config)
        self._text_cache: dict[str, np.ndarray] = {}
        self._warned: set[str] = set()
        image_fn = functools.partial(encode_images, model=self._model)
        text_fn = functools.partial(encode_texts, model=self._model)
        self.mesh = mesh
        if mesh is None:
            self.params = params
            self._images, self._texts = jax.jit(image_fn), jax.jit(text_fn)
            self._shards = 1
            return
        rules = sharding.get_rules(rules if rules is not None else "dp")
        rep = sharding.replicated(mesh)
        self.params = jax.device_put(params, rep)
        self._shards = sharding.batch_shards(dict(mesh.shape), rules)
        self._row_sharding = {n: NamedSharding(mesh, sharding.batch_spec(mesh, rules, n))
                              for n in (1, 2, 4)}
        self._images = jax.jit(image_fn, out_shardings=self._row_sharding[2])
        self._texts = jax.jit(text_fn, out_shardings=self._row_sharding[2])

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, export_dir: str, *, mesh=None, rules=None, batch_size: int = 64
             ) -> ClipScorer:
        """A scorer from a CLIP export (``--job=train_clip`` or ``--job=import_clip``):
        parameters, model config and tokenizer file, checked against each other."""
        from dalle_jax import exports
        from dalle_jax.models import clip

        if not export_dir or not os.path.isdir(export_dir):
            raise FileNotFoundError(f"no scorer export at {export_dir!r}: train one with "
                                    "--job=train_clip or import OpenAI CLIP with "
                                    "--job=import_clip")
        meta = dict(exports.read_meta(export_dir), export_dir=os.path.abspath(export_dir))
        ident = exports.identity_of(meta, "clip", export_dir)
        config = clip.ClipConfig(**ident["model"])
        tokenizer = load_tokenizer(export_dir, ident.get("tokenizer", {}))
        params, _ = exports.load(export_dir)
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32)
                              if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
        return cls(config, params, tokenizer, meta=meta, mesh=mesh, rules=rules,
                   batch_size=batch_size)

    def identity(self) -> dict:
        ident = dict(self.meta.get("identity", {}))
        ident.pop("model", None)
        return {"kind": "clip", "source": self.meta.get("source"),
                "step": self.meta.get("step"), "export": self.meta.get("export_dir"),
                "tokenizer": ident.get("tokenizer"),
                "model": dataclasses.asdict(self.config)}

    # ------------------------------------------------------------------ embeddings

    def _run(self, fn, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """``fn(params, *arrays)`` in batches of ``batch_size`` (the last one padded)."""
        n = len(arrays[0])
        size = -(-min(self.batch_size, n) // self._shards) * self._shards
        out = []
        for lo in range(0, n, size):
            hi = min(lo + size, n)
            rows = [np.concatenate([a[lo:hi], np.repeat(a[hi - 1:hi], size - (hi - lo), 0)])
                    for a in arrays]
            if self.mesh is not None:
                rows = [jax.make_array_from_callback(
                    r.shape, self._row_sharding[r.ndim], lambda idx, r=r: r[idx]) for r in rows]
            emb = fn(self.params, *rows)
            if not emb.is_fully_addressable:
                from jax.experimental import multihost_utils

                emb = multihost_utils.process_allgather(emb, tiled=True)
            out.append(np.asarray(emb)[: hi - lo])
        return np.concatenate(out)

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """Unit-norm image embeddings ``(N, E)`` of uint8 images ``(N, H, W, 3)``."""
        from dalle_jax.models import clip

        return self.embed_pixels(np.asarray(clip.preprocess(np.asarray(images), self.config),
                                            np.float32))

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Unit-norm image embeddings ``(N, E)`` of images already preprocessed for the
        towers (`dalle_jax.models.clip.preprocess`), e.g. an evaluation set kept that way."""
        return self._run(self._images, [pixels])

    def embed_captions(self, captions: Sequence[str]) -> np.ndarray:
        """Unit-norm caption embeddings ``(N, E)`` (cached per caption)."""
        todo = sorted({c for c in captions if c not in self._text_cache})
        if todo:
            tokens, eot, truncated = self.tokenizer.encode_batch(
                todo, context_length=self.config.context_length)
            for c, t in zip(todo, truncated):
                if t and c not in self._warned:
                    self._warned.add(c)
                    logging.warning("caption longer than the scorer's %d text slots, "
                                    "truncated: %r", self.config.context_length, c)
            emb = self._run(self._texts, [np.asarray(tokens, np.int32),
                                          np.asarray(eot, np.int32)])
            self._text_cache.update(zip(todo, emb))
        return np.stack([self._text_cache[c] for c in captions])

    def score(self, images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        images = _check_pairs(images, captions)
        if len(images) == 0:
            return np.zeros((0,), np.float32)
        img = self.embed_images(images)
        txt = self.embed_captions(list(captions))
        return np.sum(img * txt, axis=-1).astype(np.float32)


def load_tokenizer(export_dir: str, ident: dict) -> Any:
    """The text tokenizer a CLIP export names, from the file the export carries."""
    from dalle_jax import exports

    kind = ident.get("type")
    path = exports.tokenizer_path(export_dir, ident)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the scorer export {export_dir!r} lacks its tokenizer file "
                                f"{path!r}")
    if kind == "openai_clip_bpe":
        from dalle_jax.rerank import clip_tokenizer

        tok = clip_tokenizer.ClipTokenizer(path, num_merges=ident.get("num_merges"))
    elif kind in ("sentencepiece", "sentencepiece-bpe"):
        from dalle_jax.train import clip_task

        tok = clip_task.BpeClipTokenizer(path)
    else:
        raise ValueError(f"the scorer export {export_dir!r} names an unknown tokenizer type "
                         f"{kind!r}")
    if "sha256" in ident and tok.identity().get("sha256") != ident["sha256"]:
        raise ValueError(f"the tokenizer file {path!r} is not the one the scorer was trained "
                         "with (sha256 differs)")
    return tok


def load_scorer(path: str, *, mesh=None, rules=None, batch_size: int = 64) -> Scorer:
    """The scorer of an export directory (see `ClipScorer.load`)."""
    return ClipScorer.load(path, mesh=mesh, rules=rules, batch_size=batch_size)
