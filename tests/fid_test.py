"""Tests of the FID / IS math (dalle_jax.evals.fid).

References: closed forms (diagonal, commuting, 2×2 covariances), the nuclear norm
``tr((S1 S2)^(1/2)) = ||L1ᵀ L2||_*`` for ``S = L Lᵀ`` (a singular-value computation, well
conditioned even when the covariances are singular), scipy's ``sqrtm`` in float64, and
torch-fidelity's own FID / IS functions.
"""

import json

import numpy as np
import pytest

from dalle_jax.evals import fid
from dalle_jax.evals.inception import EXTRACTOR_NAME
from inception_test import load_torch_fidelity


def _rng(seed=0):
    return np.random.default_rng(seed)


def _random_cov(d, rng, rank=None):
    a = rng.standard_normal((d, rank or d)) / np.sqrt(d)
    return a @ a.T, a


# --------------------------------------------------------------------------- statistics


def test_gaussian_stats_matches_numpy():
    x = _rng().standard_normal((50, 7)).astype(np.float32) * 3 + 1
    mu, sigma = fid.gaussian_stats(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        fid.gaussian_stats(x[:1])


def test_accumulator_matches_batch_and_is_stable():
    rng = _rng(1)
    x = rng.standard_normal((103, 5))
    acc = fid.StatsAccumulator()
    for lo, hi in [(0, 1), (1, 40), (40, 40), (40, 103)]:
        acc.update(x[lo:hi])
    mu, sigma = acc.result()
    mu_ref, sigma_ref = fid.gaussian_stats(x)
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-10, atol=1e-14)
    # merge() of two halves is the same.
    a, b = fid.StatsAccumulator().update(x[:50]), fid.StatsAccumulator().update(x[50:])
    np.testing.assert_allclose(a.merge(b).result()[1], sigma_ref, rtol=1e-10, atol=1e-14)
    assert a.count == 103
    # A mean far larger than the spread: E[x xᵀ] - μ μᵀ would lose every digit in float64.
    y = 1e8 + rng.standard_normal((1000, 3))
    acc = fid.StatsAccumulator()
    for chunk in np.array_split(y, 7):
        acc.update(chunk)
    centred = y - 1e8
    np.testing.assert_allclose(acc.result()[1], np.cov(centred, rowvar=False), rtol=1e-6)
    with pytest.raises(ValueError, match="dimension"):
        acc.update(np.zeros((2, 4)))


# --------------------------------------------------------------------------- FID


def test_fid_diagonal_closed_form():
    rng = _rng(2)
    d1, d2 = rng.uniform(0.1, 3, 20), rng.uniform(0.1, 3, 20)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    got = fid.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2))
    assert got == pytest.approx(expected, rel=1e-12)


def test_fid_commuting_closed_form():
    """Covariances with the same eigenvectors (a random rotation of diagonal ones)."""
    rng = _rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    d1, d2 = rng.uniform(0.0, 2, 30), rng.uniform(0.01, 2, 30)
    d1[:5] = 0.0  # singular
    s1, s2 = q @ np.diag(d1) @ q.T, q @ np.diag(d2) @ q.T
    mu = rng.standard_normal(30)
    expected = np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert fid.frechet_distance(mu, s1, mu, s2) == pytest.approx(expected, rel=1e-10)


def test_fid_2x2_non_commuting_closed_form():
    """For 2×2 M = S1 S2 with eigenvalues λ1, λ2 ≥ 0: tr √M = √(tr M + 2 √det M)."""
    rng = _rng(4)
    for _ in range(20):
        s1, _ = _random_cov(2, rng)
        s2, _ = _random_cov(2, rng)
        m = s1 @ s2
        tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
        expected = np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        assert fid.frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(
            expected, rel=1e-10, abs=1e-13)


def test_fid_general_matches_references():
    """Full-rank non-commuting 64-dim covariances: the nuclear norm, scipy's sqrtm and
    torch-fidelity's formula agree with ours."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = _rng(5)
    s1, l1 = _random_cov(64, rng)
    s2, l2 = _random_cov(64, rng)
    mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
    tr_ref = np.linalg.svd(l1.T @ l2, compute_uv=False).sum()
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_ref
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(ref, rel=1e-10)
    assert fid.trace_sqrt_product(s1, s2) == pytest.approx(tr_ref, rel=1e-12)
    covmean = scipy_linalg.sqrtm(s1 @ s2)
    ref_scipy = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
    assert got == pytest.approx(ref_scipy, rel=1e-8)
    mf = load_torch_fidelity("metric_fid", stub_utils=True)
    theirs = mf.fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2},
                                         False)[mf.KEY_METRIC_FID]
    assert got == pytest.approx(theirs, rel=1e-8)
    # symmetric in its two arguments
    assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-12)


def test_fid_identical_is_zero():
    rng = _rng(6)
    x = rng.standard_normal((500, 40)) @ rng.standard_normal((40, 40))
    mu, sigma = fid.gaussian_stats(x)
    value = fid.frechet_distance(mu, sigma, mu, sigma)
    assert 0.0 <= value <= 1e-10 * np.trace(sigma)
    assert fid.fid_from_features(x, x) <= 1e-10 * np.trace(sigma)


def test_fid_rank_deficient_no_nan():
    """Fewer samples than dimensions (singular covariances): finite, non-negative, and
    equal to the nuclear-norm reference computed from the samples themselves."""
    rng = _rng(7)
    d, n = 256, 40
    x1 = rng.standard_normal((n, d)) + 0.5
    x2 = rng.standard_normal((n, d)) * 1.3
    (mu1, s1), (mu2, s2) = fid.gaussian_stats(x1), fid.gaussian_stats(x2)
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got) and got > 0
    c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
    tr_ref = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / (n - 1)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_ref
    assert got == pytest.approx(ref, rel=1e-9)
    # rank 1 against rank 0 (a constant set)
    s0 = np.zeros((d, d))
    assert fid.frechet_distance(mu1, s0, mu1, s0) == 0.0
    assert np.isfinite(fid.frechet_distance(mu1, np.outer(mu1, mu1), mu2, s0))


def test_fid_fallback_and_validation(monkeypatch):
    calls = []
    real = fid.trace_sqrt_product

    def flaky(a, b):
        calls.append(np.diag(a).copy())
        if len(calls) == 1:
            raise np.linalg.LinAlgError("no convergence")
        return real(a, b)

    monkeypatch.setattr(fid, "trace_sqrt_product", flaky)
    s = np.eye(3)
    value = fid.frechet_distance(np.zeros(3), s, np.zeros(3), s, eps=1e-6)
    assert value == pytest.approx(0, abs=1e-12)
    np.testing.assert_allclose(calls[1], 1 + 1e-6)  # retried with the eps offset
    monkeypatch.undo()
    with pytest.raises(ValueError, match="non-finite"):
        fid.frechet_distance(np.zeros(3), np.full((3, 3), np.nan), np.zeros(3), s)
    with pytest.raises(ValueError, match="covariances must be"):
        fid.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), s)


# --------------------------------------------------------------------------- IS


def _is_reference(logits, splits):
    x = np.asarray(logits, np.float64)
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for part in np.array_split(np.arange(len(x)), splits):
        pc = p[part]
        q = pc.mean(0)
        scores.append(np.exp(np.mean(np.sum(pc * (np.log(pc) - np.log(q)), axis=1))))
    return np.mean(scores), np.std(scores)


def test_inception_score_matches_references():
    torch = pytest.importorskip("torch")
    rng = _rng(8)
    logits = (rng.standard_normal((1000, 1008)) * 3).astype(np.float32)
    mean, std = fid.inception_score(logits, splits=10, shuffle=False)
    ref_mean, ref_std = _is_reference(logits, 10)
    assert mean == pytest.approx(ref_mean, rel=1e-12)
    assert std == pytest.approx(ref_std, rel=1e-9)
    mi = load_torch_fidelity("metric_isc", stub_utils=True)
    for n, splits in [(1000, 10), (997, 7)]:
        theirs = mi.isc_features_to_metric(torch.from_numpy(logits[:n]), splits=splits)
        ours = fid.inception_score(logits[:n], splits=splits)  # shuffled, seed 2020
        assert ours[0] == pytest.approx(theirs[mi.KEY_METRIC_ISC_MEAN], rel=1e-10)
        assert ours[1] == pytest.approx(theirs[mi.KEY_METRIC_ISC_STD], rel=1e-8, abs=1e-12)


def test_inception_score_known_cases():
    # Uniform predictions: p(y|x) = p(y), KL = 0, IS = 1.
    assert fid.inception_score(np.zeros((100, 1008))) == (1.0, 0.0)
    # Confident predictions spread evenly over K classes in every split: IS = K.
    k, splits = 16, 4
    labels = np.tile(np.arange(k), splits)
    logits = np.zeros((k * splits, 1008))
    logits[np.arange(k * splits), labels] = 60.0
    mean, std = fid.inception_score(logits, splits=splits, shuffle=False)
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0, abs=1e-9)
    # With probabilities that underflow to exactly 0, no NaN.
    logits[:, 0] = -1e4
    assert np.isfinite(fid.inception_score(logits, splits=splits, shuffle=False)[0])
    with pytest.raises(ValueError, match="splits"):
        fid.inception_score(np.zeros((5, 10)), splits=10)


# --------------------------------------------------------------------------- files


def test_stats_roundtrip_and_refusals(tmp_path):
    rng = _rng(9)
    mu, (sigma, _) = rng.standard_normal(8), _random_cov(8, rng)
    path = tmp_path / "ref.npz"
    fid.save_stats(path, mu, sigma, count=123, resize="tf1x", dataset="shapes", split="val")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]
    mu2, sigma2, meta = fid.load_stats(path, resize="tf1x")
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    assert meta == {"count": 123, "resize": "tf1x", "extractor": EXTRACTOR_NAME,
                    "feature": "pool", "dataset": "shapes", "split": "val"}
    with pytest.raises(ValueError, match=r"resize='tf1x', but this evaluation uses "
                                         r"resize='clean'"):
        fid.load_stats(path, resize="clean")
    other = tmp_path / "other.npz"
    fid.save_stats(other, mu, sigma, count=5, resize="tf1x", extractor="clip-vit-b32")
    with pytest.raises(ValueError, match="extractor='clip-vit-b32'"):
        fid.load_stats(other)
    assert fid.load_stats(other, extractor=None)[2]["extractor"] == "clip-vit-b32"
    # pytorch-fid's format: mu and sigma only.
    bare = tmp_path / "bare.npz"
    np.savez(bare, mu=mu, sigma=sigma)
    with pytest.raises(ValueError, match="allow_unlabelled"):
        fid.load_stats(bare)
    assert fid.load_stats(bare, allow_unlabelled=True)[2] == {}
    np.savez(tmp_path / "junk.npz", x=mu)
    with pytest.raises(ValueError, match="not a statistics file"):
        fid.load_stats(tmp_path / "junk.npz")
    with np.load(path) as data:
        assert json.loads(str(data["meta"]))["count"] == 123
