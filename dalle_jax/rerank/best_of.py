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

`best_of_each_size` answers "what would reranking k candidates have kept?" for several k
at once (the paper's FID against the reranking size): one pass over N candidates, drawn
in ranges that end at every size (`chunk_bounds`), keeps the best of the first k for
each k.
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


def chunk_bounds(num: int, sizes: Sequence[int], chunk: int) -> list[tuple[int, int]]:
    """Consecutive candidate ranges ``[lo, hi)`` covering ``0..num-1``: every size ends a
    range and no range is longer than ``chunk``."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    stops = sorted({k for k in sizes if 0 < k <= num} | set(range(chunk, num, chunk)) | {num})
    bounds, lo = [], 0
    for hi in stops:
        while hi - lo > chunk:  # sizes closer than chunk never get here
            bounds.append((lo, lo + chunk))
            lo += chunk
        bounds.append((lo, hi))
        lo = hi
    return bounds


def best_of_each_size(sampler, scorer, captions: Sequence[str], *, num_candidates: int,
                     sizes: Sequence[int], seed: int = 0, first_caption: int = 0,
                     batch_size: int = 64, chunk: int = 64,
                     progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """For each caption and each reranking size k, the best of its first k candidates.

    Candidate j of caption ``first_caption + i`` is global sample
    ``(first_caption + i) * num_candidates + j``; candidates ``0 .. max(sizes)-1`` are
    drawn in `chunk_bounds` ranges, decoded, scored (when ``scorer`` is given; without it
    only size 1 exists) and folded into a running best (a strictly higher score replaces
    it, so ties keep the earlier candidate), whose value is recorded whenever a size is
    reached. Returns arrays (``K = len(sizes)``):

    * ``sizes`` (K,), ``candidate`` / ``sample_index`` (n, K) int64, ``score`` (n, K)
      float32 (NaN without a scorer), ``tokens`` (n, K, G, G) int32;
    * ``images`` (M, H, W, 3) uint8: the distinct picked images (a caption whose best
      candidate is the same for several sizes stores it once), ``image_index`` (n, K) into
      them, ``image_caption`` (M,) the caption row of each;
    * ``all_scores`` (n, max(sizes)) every candidate's score (NaN without a scorer).
    """
    sizes = sorted(int(k) for k in sizes)
    n, top = len(captions), sizes[-1]
    if n == 0:
        raise ValueError("no captions to sample for")
    if sizes[0] < 1 or top > num_candidates:
        raise ValueError(f"sizes {sizes} must lie in [1, num_candidates={num_candidates}]")
    if scorer is None and top > 1:
        raise ValueError(f"reranking {top} candidates needs a scorer")
    rows = np.arange(n)
    best: dict[str, np.ndarray] | None = None
    kept: dict[int, dict[str, np.ndarray]] = {}
    all_scores = np.full((n, top), np.nan, np.float32)
    for lo, hi in chunk_bounds(top, sizes, chunk):
        toks = sampler.tokens(list(captions), num_candidates=num_candidates, seed=seed,
                              batch_size=batch_size,
                              first_sample_index=first_caption * num_candidates,
                              candidates=(lo, hi), progress=progress)
        imgs = sampler.images(toks, batch_size=batch_size)
        m = hi - lo
        if scorer is not None:
            flat = imgs.reshape((-1,) + imgs.shape[2:])
            scores = np.asarray(scorer.score(flat, [c for c in captions for _ in range(m)]),
                                np.float32).reshape(n, m)
            if not np.isfinite(scores).all():
                raise ValueError("the scorer returned non-finite scores")
            all_scores[:, lo:hi] = scores
            j = np.argmax(scores, axis=1)  # the first of equal maxima
        else:
            scores = np.full((n, m), np.nan, np.float32)
            j = np.zeros(n, np.int64)
        pick = {"candidate": lo + j, "score": scores[rows, j], "tokens": toks[rows, j],
                "image": imgs[rows, j]}
        if best is None:
            best = pick
        else:
            better = pick["score"] > best["score"]
            best = {k: np.where(better.reshape((-1,) + (1,) * (v.ndim - 1)), pick[k], v)
                    for k, v in best.items()}
        if hi in sizes:
            kept[hi] = {k: v.copy() for k, v in best.items()}
    cand = np.stack([kept[k]["candidate"] for k in sizes], axis=1).astype(np.int64)
    images, owner = [], []
    index = np.zeros((n, len(sizes)), np.int64)
    for i in range(n):
        seen: dict[int, int] = {}
        for ki, k in enumerate(sizes):
            c = int(cand[i, ki])
            if c not in seen:
                seen[c] = len(images)
                images.append(kept[k]["image"][i])
                owner.append(i)
            index[i, ki] = seen[c]
    return {
        "sizes": np.asarray(sizes, np.int64),
        "candidate": cand,
        "sample_index": (first_caption + rows)[:, None].astype(np.int64) * num_candidates + cand,
        "score": np.stack([kept[k]["score"] for k in sizes], axis=1).astype(np.float32),
        "tokens": np.stack([kept[k]["tokens"] for k in sizes], axis=1).astype(np.int32),
        "images": np.stack(images).astype(np.uint8),
        "image_index": index,
        "image_caption": np.asarray(owner, np.int64),
        "all_scores": all_scores,
    }
