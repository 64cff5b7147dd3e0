"""Caption match on `shapes`: how often do sampled images show what their caption says?

Each image is judged by the `shapes` checker (`dalle_jax.eval.shapes_match`), which reads
colours, shapes and their relation off the pixels. Reported per split (``validation``:
in-distribution objects; ``test_compositional``: objects never seen in training):

* ``best_of_1``: one sample per caption, as drawn;
* ``reranked``: the best of N samples per caption by a *learned* scorer (a contrastive
  model, never the checker itself, which would grade its own choice);
* ``guided``: one classifier-free guided sample per caption;
* ``dvae_reconstruction``: the dVAE's reconstructions of the real images (their tokens,
  decoded), the ceiling the dVAE sets for any sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dalle_jax.eval import shapes_match

SUMMARY_KEYS = ("count", "matched", "fraction")


def _summary(images: np.ndarray, captions: Sequence[str]) -> dict[str, Any]:
    return shapes_match.score(images, captions)


def evaluate_split(sampler, examples: Sequence[dict], *, seed: int, batch_size: int,
                   grid: int, scorer=None, rerank_n: int = 0, rerank_chunk: int = 64,
                   guided_sampler=None, progress: Callable[[int], None] | None = None
                   ) -> tuple[dict[str, Any], np.ndarray]:
    """Caption match of ``examples`` (token-source rows with ``caption`` and
    ``image_tokens``) under each way of sampling that is configured.

    Args:
        sampler: the unguided `Sampler` (with its dVAE).
        examples: the split's first examples.
        seed: the sampling seed.
        batch_size: sequences per sampling call.
        grid: the token grid side of ``image_tokens``.
        scorer: a learned `Scorer` for ``reranked`` (None: not reported).
        rerank_n: candidates per caption for ``reranked`` (0: not reported).
        rerank_chunk: candidates per caption drawn and scored at a time.
        guided_sampler: a `Sampler` with guidance for ``guided`` (None: not reported).
        progress: called with the number of sequences drawn after each sampling call.

    Returns:
        ``(summary, best_of_1_images)``: the summary dict described in the module doc,
        and the best-of-1 images ``(N, H, W, 3)`` (for a grid).
    """
    from dalle_jax.rerank import best_of as best_of_lib

    if scorer is not None and getattr(scorer, "name", "") == "shapes_checker":
        raise ValueError("the caption checker grades the samples; reranking for a reported "
                         "result needs a learned scorer")
    caps = [str(ex["caption"]) for ex in examples]
    out: dict[str, Any] = {}
    toks = sampler.tokens(caps, num_candidates=1, seed=seed, batch_size=batch_size,
                          progress=progress)
    images = sampler.images(toks, batch_size=batch_size)[:, 0]
    out["best_of_1"] = _summary(images, caps)
    if scorer is not None and rerank_n > 0:
        kept = best_of_lib.best_of(sampler, scorer, caps, num_candidates=rerank_n, keep=1,
                                   seed=seed, chunk=rerank_chunk, batch_size=batch_size,
                                   progress=progress)
        out["reranked"] = dict(_summary(kept.images[:, 0], caps), n=rerank_n,
                               scorer=scorer.identity())
        out["reranked"]["mean_score"] = float(kept.scores.mean())
    if guided_sampler is not None:
        gtoks = guided_sampler.tokens(caps, num_candidates=1, seed=seed, batch_size=batch_size,
                                      progress=progress)
        gimages = guided_sampler.images(gtoks, batch_size=batch_size)[:, 0]
        out["guided"] = dict(_summary(gimages, caps),
                             scale=guided_sampler.sampling.guidance)
    real = np.stack([np.asarray(ex["image_tokens"]) for ex in examples])
    recon = _summary(sampler.images(real.reshape((len(examples), grid, grid)),
                                    batch_size=batch_size), caps)
    out["dvae_reconstruction"] = {k: recon[k] for k in SUMMARY_KEYS}
    return out, images


def headline(summary: dict[str, Any]) -> dict[str, float | None]:
    """``{"best_of_1": fraction, "reranked": ..., "guided": ..., "dvae_reconstruction": ...}``
    of one split's summary (the entries that were measured)."""
    return {k: v.get("fraction") for k, v in summary.items() if isinstance(v, dict)
            and "fraction" in v}
