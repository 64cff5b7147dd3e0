"""Best-of-N reranking: draw N candidates per caption, keep the k a scorer likes best.

The paper samples 512 images per caption and keeps the best by a contrastive model's
score. Here the N candidates are drawn in chunks of ``chunk`` per caption (the sampler
draws exactly the tokens of the full draw, see `Sampler.tokens`), each chunk is decoded
and scored, and only the running top ``keep`` images survive it, so memory is bounded by
one chunk whatever N is. Captions are taken in groups small enough that a group's chunk
holds at most ``max_images`` images.

Candidate ``j`` of caption ``i`` is global sample ``first_sample_index + i * N + j``, as
in plain sampling: the reranked images are a subset of the images plain sampling with the
same seed draws.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np


@dataclasses.dataclass
class Reranked:
    """What reranking kept.

    Attributes:
        tokens: ``(num_captions, keep, G, G)`` image tokens of the kept candidates, best first.
        images: ``(num_captions, keep, H, W, 3)`` uint8 images.
        scores: ``(num_captions, keep)`` their scores.
        candidates: ``(num_captions, keep)`` candidate index ``j`` of each kept image.
        sample_index: ``(num_captions, keep)`` global sample index (the RNG stream).
        all_scores: ``(num_captions, N)`` the score of every candidate.
    """

    tokens: np.ndarray
    images: np.ndarray
    scores: np.ndarray
    candidates: np.ndarray
    sample_index: np.ndarray
    all_scores: np.ndarray


def top_k(scores_NC: np.ndarray, keep: int) -> np.ndarray:
    """Indices ``(N, keep)`` of the ``keep`` highest scores of each row, best first; ties
    go to the lower index (so reranking is deterministic)."""
    scores_NC = np.asarray(scores_NC)
    if not 1 <= keep <= scores_NC.shape[-1]:
        raise ValueError(f"keep must be in [1, {scores_NC.shape[-1]}], got {keep}")
    if np.isnan(scores_NC).any():
        raise ValueError("a scorer returned NaN scores")
    return np.argsort(-scores_NC, axis=-1, kind="stable")[..., :keep]


def best_of(sampler, scorer, captions: Sequence[str], *, num_candidates: int, keep: int = 1,
            seed: int = 0, chunk: int = 64, batch_size: int = 64, first_sample_index: int = 0,
            prefix: np.ndarray | None = None, max_images: int = 1024,
            progress: Callable[[int], None] | None = None) -> Reranked:
    """Draws ``num_candidates`` images per caption and keeps the ``keep`` best by ``scorer``.

    Args:
        sampler: a `dalle_jax.sample.sampler.Sampler` with its dVAE (images are scored).
        scorer: a `dalle_jax.rerank.scorer.Scorer`.
        captions: the prompts.
        num_candidates: N, candidates per caption (the paper: 512).
        keep: k, images kept per caption.
        seed: the sampling seed.
        chunk: candidates per caption drawn, decoded and scored at a time.
        batch_size: sequences per sampling call.
        first_sample_index: global index of caption 0's candidate 0.
        prefix: ``(num_captions, P)`` image tokens to keep (image completion).
        max_images: at most this many images are held at once (one group's chunk).
        progress: called with the number of sequences drawn after each sampling call.
    """
    n = len(captions)
    if n == 0:
        raise ValueError("no captions to sample for")
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    if not 1 <= keep <= num_candidates:
        raise ValueError(f"keep must be in [1, num_candidates={num_candidates}], got {keep}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    chunk = min(chunk, num_candidates)
    group = max(1, max_images // chunk)
    g = sampler.config.grid
    out_tokens = np.zeros((n, keep, g, g), np.int32)
    out_images = None
    out_scores = np.zeros((n, keep), np.float32)
    out_cands = np.zeros((n, keep), np.int64)
    all_scores = np.zeros((n, num_candidates), np.float32)
    for c0 in range(0, n, group):
        c1 = min(c0 + group, n)
        caps = list(captions[c0:c1])
        best_tok = best_img = None
        best_score = np.full((c1 - c0, 0), -np.inf, np.float32)
        best_cand = np.zeros((c1 - c0, 0), np.int64)
        for lo in range(0, num_candidates, chunk):
            hi = min(lo + chunk, num_candidates)
            toks = sampler.tokens(caps, num_candidates=num_candidates, seed=seed,
                                  batch_size=batch_size,
                                  first_sample_index=first_sample_index + c0 * num_candidates,
                                  prefix=None if prefix is None else prefix[c0:c1],
                                  candidates=(lo, hi), progress=progress)
            imgs = sampler.images(toks, batch_size=batch_size)
            m = hi - lo
            scores = scorer.score(imgs.reshape((-1,) + imgs.shape[2:]),
                                  [c for c in caps for _ in range(m)])
            scores = np.asarray(scores, np.float32).reshape(len(caps), m)
            all_scores[c0:c1, lo:hi] = scores
            # Merge this chunk into the running best (earlier candidates first, so ties
            # keep the lower candidate index).
            cand = np.broadcast_to(np.arange(lo, hi), scores.shape)
            pool_score = np.concatenate([best_score, scores], axis=1)
            pool_cand = np.concatenate([best_cand, cand], axis=1)
            pool_tok = toks if best_tok is None else np.concatenate([best_tok, toks], axis=1)
            pool_img = imgs if best_img is None else np.concatenate([best_img, imgs], axis=1)
            idx = top_k(pool_score, min(keep, pool_score.shape[1]))
            take = lambda a, idx=idx: np.take_along_axis(  # noqa: E731
                a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)
            best_score, best_cand = take(pool_score), take(pool_cand)
            best_tok, best_img = take(pool_tok), take(pool_img)
        out_tokens[c0:c1], out_scores[c0:c1], out_cands[c0:c1] = best_tok, best_score, best_cand
        if out_images is None:
            out_images = np.zeros((n,) + best_img.shape[1:], np.uint8)
        out_images[c0:c1] = best_img
    sample_index = (first_sample_index + np.arange(n)[:, None] * num_candidates + out_cands)
    return Reranked(tokens=out_tokens, images=out_images, scores=out_scores,
                    candidates=out_cands, sample_index=sample_index, all_scores=all_scores)
