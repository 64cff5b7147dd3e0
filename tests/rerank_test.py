"""Best-of-N reranking: streaming in chunks keeps exactly what scoring everything keeps."""

import numpy as np
import pytest

from dalle_jax.rerank import best_of as best_of_lib
from dalle_jax.rerank import scorer as scorer_lib
from dalle_jax.sample import sampler as smp

from sampler_test import GRID, TINY, _FakeTextTokenizer, _params

pytestmark = pytest.mark.usefixtures("fast_compile")


class _FakeDVAE:
    """Decodes a token grid into a 2x-upsampled grey image whose pixels are the tokens."""

    vocab_size = TINY.image_vocab
    grid = GRID

    def decode(self, tokens):
        t = np.asarray(tokens, np.float32) / (self.vocab_size - 1)
        img = np.repeat(np.repeat(t, 2, axis=1), 2, axis=2)
        return np.repeat(img[..., None], 3, axis=-1)


class _BrightnessScorer:
    """Scores an image by its mean brightness, plus a caption-dependent offset."""

    name = "brightness"

    def __init__(self):
        self.calls = []

    def score(self, images, captions):
        self.calls.append(len(images))
        return (np.asarray(images, np.float32).mean(axis=(1, 2, 3))
                + np.asarray([len(c) for c in captions], np.float32))

    def identity(self):
        return {"kind": "brightness"}


def _sampler():
    return smp.Sampler(TINY, _params(TINY), _FakeTextTokenizer(), _FakeDVAE())


def test_streamed_reranking_keeps_the_best_of_all_candidates():
    s = _sampler()
    caps = ["c1", "c2", "c3"]
    n, keep = 7, 3
    tokens = s.tokens(caps, num_candidates=n, seed=1, batch_size=8)
    images = s.images(tokens)
    scores = _BrightnessScorer().score(images.reshape((-1,) + images.shape[2:]),
                                       [c for c in caps for _ in range(n)]).reshape(3, n)
    want = np.argsort(-scores, axis=1, kind="stable")[:, :keep]

    scorer = _BrightnessScorer()
    drawn = []
    # Chunks of 3 candidates, and groups of at most 2 captions (max_images=6).
    got = best_of_lib.best_of(s, scorer, caps, num_candidates=n, keep=keep, seed=1, chunk=3,
                              batch_size=8, max_images=6, progress=drawn.append)
    np.testing.assert_array_equal(got.candidates, want)
    np.testing.assert_allclose(got.all_scores, scores, rtol=1e-6)
    np.testing.assert_allclose(got.scores, np.take_along_axis(scores, want, 1), rtol=1e-6)
    np.testing.assert_array_equal(got.tokens, np.take_along_axis(
        tokens, want[..., None, None], axis=1))
    np.testing.assert_array_equal(got.images, np.take_along_axis(
        images, want[..., None, None, None], axis=1))
    np.testing.assert_array_equal(got.sample_index, np.arange(3)[:, None] * n + want)
    assert sum(drawn) == 3 * n
    assert max(scorer.calls) <= 6  # bounded: one group's chunk at a time
    # Scores are non-increasing from the first kept image on.
    assert np.all(np.diff(got.scores, axis=1) <= 0)


def test_top_k_breaks_ties_towards_the_earlier_candidate():
    np.testing.assert_array_equal(best_of_lib.top_k(np.asarray([[1.0, 2.0, 2.0, 0.0]]), 2),
                                  [[1, 2]])
    with pytest.raises(ValueError, match="keep"):
        best_of_lib.top_k(np.zeros((1, 3)), 4)
    with pytest.raises(ValueError, match="NaN"):
        best_of_lib.top_k(np.asarray([[np.nan, 1.0]]), 1)


@pytest.mark.parametrize("kw,err", [
    (dict(num_candidates=0), "num_candidates"),
    (dict(num_candidates=2, keep=3), "keep"),
    (dict(num_candidates=2, keep=0), "keep"),
    (dict(num_candidates=2, chunk=0), "chunk"),
])
def test_bad_reranking_arguments_are_named(kw, err):
    with pytest.raises(ValueError, match=err):
        best_of_lib.best_of(_sampler(), _BrightnessScorer(), ["c1"], **kw)
    with pytest.raises(ValueError, match="no captions"):
        best_of_lib.best_of(_sampler(), _BrightnessScorer(), [], num_candidates=2)


def test_scorers_check_their_pairs():
    checker = scorer_lib.ShapesCheckerScorer()
    assert isinstance(checker, scorer_lib.Scorer)
    with pytest.raises(ValueError, match="one caption per image"):
        checker.score(np.zeros((2, 8, 8, 3), np.uint8), ["a red circle"])
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        checker.score(np.zeros((2, 8, 8), np.uint8), ["a", "b"])
    from dalle_jax.data import shapes

    scene, caption = shapes.sample_scene("validation", 0)
    image = shapes.render(scene, 64)
    _, other = shapes.sample_scene("validation", 1)
    got = checker.score(np.stack([image, image]), [caption, other])
    assert got[0] == 1.0


def test_reported_caption_match_refuses_the_checker_as_its_own_reranker():
    from dalle_jax.evals import caption_match

    with pytest.raises(ValueError, match="needs a learned scorer"):
        caption_match.evaluate_split(_sampler(), [{"caption": "c1", "image_tokens": None}],
                                     seed=0, batch_size=4, grid=GRID,
                                     scorer=scorer_lib.ShapesCheckerScorer(), rerank_n=4)


def test_caption_match_reranks_the_candidates_of_its_rerank_sampler():
    import dataclasses

    from dalle_jax.evals import caption_match

    class BigDVAE(_FakeDVAE):  # the checker needs images of at least 16 pixels a side
        def decode(self, tokens):
            img = super().decode(tokens)
            return np.repeat(np.repeat(img, 8, axis=1), 8, axis=2)

    s = smp.Sampler(TINY, _params(TINY), _FakeTextTokenizer(), BigDVAE())
    guided = s.with_sampling(dataclasses.replace(s.sampling, guidance=2.0))
    caps = ["c1", "c2"]
    examples = [{"caption": c, "image_tokens": np.zeros((GRID * GRID,), np.int32)} for c in caps]

    def reranked(**kw):
        summary, _ = caption_match.evaluate_split(s, examples, seed=3, batch_size=8, grid=GRID,
                                                  scorer=_BrightnessScorer(), rerank_n=4, **kw)
        return summary["reranked"]

    def best_score(sampler):
        kept = best_of_lib.best_of(sampler, _BrightnessScorer(), caps, num_candidates=4,
                                   keep=1, seed=3, batch_size=8)
        return float(kept.scores.mean())

    plain, from_guided = reranked(), reranked(rerank_sampler=guided)
    assert plain["guidance"] == 1.0 and from_guided["guidance"] == 2.0
    assert plain["mean_score"] == pytest.approx(best_score(s))
    assert from_guided["mean_score"] == pytest.approx(best_score(guided))
    assert best_score(s) != pytest.approx(best_score(guided))  # the draws differ


def test_sample_jobs_caption_match_draws_single_samples_unguided(monkeypatch):
    import dataclasses

    import ml_collections as mlc

    from dalle_jax.evals import caption_match
    from dalle_jax.sample import job as sample_job

    seen = {}

    def fake_run_splits(sampler, tokens_dir, splits, **kw):
        seen.update(kw, guidance_of_single=sampler.sampling.guidance)
        return {}

    monkeypatch.setattr(caption_match, "run_splits", fake_run_splits)
    cfg = mlc.ConfigDict(dict(
        data=dict(tokens_dir="unused"),
        sample=dict(eval_splits="validation", eval_captions=3, eval_rerank=0,
                    eval_guidance=2.0, eval_rerank_guidance=3.0)))
    s = _sampler()
    guided = s.with_sampling(dataclasses.replace(s.sampling, guidance=2.5))  # sample.guidance
    sample_job._caption_match(cfg, guided, None, 0, 4)
    assert seen["guidance_of_single"] == 1.0
    assert seen["guidance"] == 2.0 and seen["rerank_guidance"] == 3.0
