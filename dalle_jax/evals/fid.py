"""Fréchet Inception Distance and Inception Score from Inception features (numpy, float64).

FID compares two sets of images through Gaussians fitted to their Inception ``pool``
features (see `dalle_jax.evals.inception`):

    FID = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

The statistics are float64 (`gaussian_stats`, or `StatsAccumulator` over batches) with
the unbiased covariance (divided by n - 1), as ``np.cov`` gives and as pytorch-fid and
torch-fidelity use.

The matrix square root is the numerically delicate part. ``S1 S2`` is not symmetric, and a
general ``sqrtm`` of it (Schur-based, or a Newton iteration) can return complex values,
NaNs or large errors when the covariances are near-singular (fewer images than feature
dimensions, which is common: 2048 dims). Only the trace of the root is needed, and it
equals the sum of the square roots of the eigenvalues of ``S1 S2``. Those are also the
eigenvalues of the *symmetric* positive semi-definite matrix ``A S2 A`` with
``A = S1^(1/2)`` (``A (A S2)`` and ``(A S2) A`` share their non-zero eigenvalues), so
`frechet_distance` takes ``A`` from a symmetric eigendecomposition of ``S1`` and the
eigenvalues of ``A S2 A`` from another one: both are backward-stable, the eigenvalues come
out real (no imaginary parts to drop), and the ±1e-16-sized ones that rounding produces
for the zero eigenvalues of singular matrices are set to zero (instead of becoming NaN
square roots, or adding ~1e-8 each to the trace). Should a
decomposition still fail (non-finite result), the computation is repeated with ``eps`` added
to both diagonals, the fallback pytorch-fid uses.

Many FIDs against one reference (the MS-COCO evaluation compares every reranking size
with the same real images) use `FrechetReference`, which factorises the reference once
and gives the same value as `frechet_distance`, more cheaply.

The Inception Score (`inception_score`) follows torch-fidelity exactly: the samples are
shuffled with a fixed seed, split into ``splits`` contiguous parts, and in each part
``exp(mean_x KL(p(y|x) || p(y)))`` is computed in float64 from a softmax over all 1008
classes (no class is dropped); the result is the mean and the population standard
deviation over the parts. Give it the *unbiased* logits (``logits_unbiased``, the fc
without its bias), which is what the original IS code and torch-fidelity use.

Statistics files (`save_stats` / `load_stats`, ``.npz`` with ``mu`` and ``sigma`` like
pytorch-fid's, plus a JSON ``meta`` record) carry the feature extractor, the resize mode
and the image count, because FIDs computed with another resize or network are not
comparable; `load_stats` refuses a file whose record does not match what the caller uses.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from dalle_jax.evals.inception import EXTRACTOR_NAME


# --------------------------------------------------------------------------- statistics


def _as_features(features) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    return x


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (float64) of ``(N, D)`` features."""
    x = _as_features(features)
    if x.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {x.shape[0]}")
    mu = x.mean(axis=0)
    xc = x - mu
    return mu, (xc.T @ xc) / (x.shape[0] - 1)


class StatsAccumulator:
    """`gaussian_stats` over batches, without keeping the features.

    Each batch's mean and centred sum of outer products are computed in float64 and
    merged with the running ones by the pairwise update of Chan, Golub and LeVeque
    (``M2 = M2_a + M2_b + δδᵀ n_a n_b / n``), which avoids the cancellation of the
    "sum of x xᵀ minus n μ μᵀ" formula when the mean is large compared with the spread.
    `merge` combines accumulators (e.g. of several processes) the same way.
    """

    def __init__(self):
        self.count = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None

    def _add(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        if n == 0:
            return
        if self.count == 0:
            self.count, self._mean, self._m2 = n, mean.copy(), m2.copy()
            return
        if mean.shape != self._mean.shape:
            raise ValueError(f"feature dimension {mean.shape[0]} does not match the "
                             f"accumulated {self._mean.shape[0]}")
        total = self.count + n
        delta = mean - self._mean
        self._mean = self._mean + delta * (n / total)
        self._m2 = self._m2 + m2 + np.outer(delta, delta) * (self.count * n / total)
        self.count = total

    def update(self, features_batch) -> "StatsAccumulator":
        """Adds an ``(n, D)`` batch; returns self."""
        x = _as_features(features_batch)
        if x.shape[0]:
            mean = x.mean(axis=0)
            xc = x - mean
            self._add(x.shape[0], mean, xc.T @ xc)
        return self

    def merge(self, other: "StatsAccumulator") -> "StatsAccumulator":
        """Adds everything ``other`` has seen; returns self."""
        if other.count:
            self._add(other.count, other._mean, other._m2)
        return self

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu, sigma)`` of all rows so far, as `gaussian_stats` of their concatenation."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        return self._mean.copy(), self._m2 / (self.count - 1)


# --------------------------------------------------------------------------- FID


def _resolved(w: np.ndarray, dim: int | None = None) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with those below its rounding level
    (``dim * eps * max``; ``dim`` the matrix size, by default ``len(w)``, given when ``w``
    holds only some of a larger matrix's eigenvalues) set to zero.

    A symmetric eigensolver finds each eigenvalue only to within about ``eps * max``; for
    a singular covariance the zero eigenvalues come out as ±1e-16-sized noise, and their
    square roots (~1e-8 each, hundreds of them) would add a visible error to the trace.
    Eigenvalues that small are not resolved anyway, so zero is as good a value as any.
    """
    dim = w.shape[0] if dim is None else dim
    top = float(np.max(w, initial=0.0))
    return np.where(w > dim * np.finfo(np.float64).eps * top, w, 0.0)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(_resolved(w))) @ v.T


def trace_sqrt_product(sigma1, sigma2) -> float:
    """``tr((S1 S2)^(1/2))`` for symmetric PSD ``S1``, ``S2``, as the sum of the square roots
    of the eigenvalues of the symmetric ``S1^(1/2) S2 S1^(1/2)`` (see the module doc)."""
    a = _psd_sqrt(sigma1)
    m = a @ sigma2 @ a
    m = 0.5 * (m + m.T)
    return float(np.sqrt(_resolved(np.linalg.eigvalsh(m))).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (float64).

    Robust to singular and near-singular covariances (no NaN when there are fewer samples
    than dimensions); a tiny negative result from rounding (identical statistics) is
    returned as 0. ``eps``: the diagonal offset of the fallback used only if the
    eigendecompositions give a non-finite result.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    s1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means must be vectors of one length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}), got {s1.shape} and {s2.shape}")
    for name, a in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has non-finite values")
    s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)
    try:
        tr_covmean = trace_sqrt_product(s1, s2)
    except np.linalg.LinAlgError:
        tr_covmean = float("nan")
    if not np.isfinite(tr_covmean):
        offset = eps * np.eye(d)
        tr_covmean = trace_sqrt_product(s1 + offset, s2 + offset)
    diff = mu1 - mu2
    fid = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(fid, 0.0)


def fid_from_features(features1, features2) -> float:
    """FID of two ``(N, D)`` feature sets."""
    return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2))


# --------------------------------------------------------------------------- IS


def inception_score(logits, splits: int = 10, *, shuffle: bool = True, seed: int = 2020
                    ) -> tuple[float, float]:
    """Inception Score ``(mean, std)`` of ``(N, C)`` logits, as torch-fidelity computes it.

    Args:
      logits: the Inception's ``logits_unbiased`` (N, 1008) for numbers comparable to
        torch-fidelity and the original code.
      splits: number of parts (sizes ``(i+1) N // splits - i N // splits``).
      shuffle, seed: rows are permuted with ``np.random.RandomState(seed).permutation``
        first (torch-fidelity's defaults: on, 2020).
    """
    x = _as_features(logits)
    n = x.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be in [1, {n}] for {n} samples, got {splits}")
    if shuffle:
        x = x[np.random.RandomState(seed).permutation(n)]
    shifted = x - x.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        pc, log_pc = p[lo:hi], log_p[lo:hi]
        q = pc.mean(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(pc > 0, pc * (log_pc - np.log(q)), 0.0)
        scores.append(float(np.exp(terms.sum(axis=1).mean())))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------- files


def save_stats(path: str | os.PathLike, mu, sigma, *, count: int, resize: str,
               extractor: str = EXTRACTOR_NAME, feature: str = "pool", **meta: Any) -> None:
    """Writes ``mu``, ``sigma`` (float64) and a JSON ``meta`` record to an ``.npz`` at
    ``path`` (exactly that name; written to a temporary file first, then renamed).

    The record holds ``extractor`` (the network, by default the FID Inception), ``resize``
    (the input resize mode), ``feature`` (the layer), ``count`` (images) and any other
    JSON-serialisable ``meta`` (e.g. the dataset and split).
    """
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    record = dict(meta, extractor=str(extractor), resize=str(resize), feature=str(feature),
                  count=int(count))
    text = json.dumps(record, sort_keys=True)
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, meta=np.array(text))
    os.replace(tmp, path)


def load_stats(path: str | os.PathLike, *, resize: str | None = None,
               extractor: str | None = EXTRACTOR_NAME, feature: str | None = "pool",
               allow_unlabelled: bool = False) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Reads ``(mu, sigma, meta)`` from a `save_stats` file.

    Refuses (ValueError naming both sides) a file whose ``extractor``, ``resize`` or
    ``feature`` differs from the given one (None skips that check): FIDs of statistics
    made with another network, layer or input resize are not comparable. A file without
    a record (e.g. pytorch-fid's own ``.npz``, which has only ``mu`` and ``sigma``) is
    refused unless ``allow_unlabelled``, since its preprocessing is unknown.
    """
    path = os.fspath(path)
    with np.load(path, allow_pickle=False) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path}: not a statistics file (no 'mu' and 'sigma' arrays; "
                             f"has {sorted(data.files)})")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        text = str(data["meta"]) if "meta" in data else None
    if text is None:
        if not allow_unlabelled:
            raise ValueError(f"{path}: statistics without a record of the feature extractor "
                             "and resize that made them, so a FID against them may compare "
                             "different preprocessing; pass allow_unlabelled=True to use "
                             "them anyway")
        meta: dict[str, Any] = {}
    else:
        meta = json.loads(text)
        for key, want in (("extractor", extractor), ("resize", resize), ("feature", feature)):
            if want is not None and meta.get(key) != want:
                raise ValueError(
                    f"{path}: statistics made with {key}={meta.get(key)!r}, but this "
                    f"evaluation uses {key}={want!r}; FIDs across different {key}s are not "
                    "comparable: recompute the reference statistics with the same settings")
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
    return mu, sigma, meta


class FrechetReference:
    """The reference side of many FIDs (the real images at one blur radius).

    `dalle_jax.evals.fid.frechet_distance` takes ``tr((S1 S2)^(1/2))`` as the sum of the
    square roots of the eigenvalues of ``A S2 A`` with ``A = S1^(1/2)``. Every reranking
    size is compared with the same real images, so ``A``, the mean and ``tr(S1)`` are
    computed once here, and `distance` of a generated set costs one symmetric eigenvalue
    problem. When the set has fewer rows than feature dimensions (n - 1 < D), its
    covariance is ``Xc^T Xc / (n-1)`` of the centred rows ``Xc``, and the non-zero
    eigenvalues of ``A S2 A = (Xc A)^T (Xc A) / (n-1)`` are those of the small
    ``(Xc A)(Xc A)^T / (n-1)``, an ``n x n`` problem instead of ``D x D``. The result is
    the same FID (float64; tested against ``frechet_distance``), cheaper.
    """

    def __init__(self, mu: np.ndarray, sigma: np.ndarray, sqrt_sigma: np.ndarray):
        self.mu, self.sigma, self.sqrt_sigma = mu, sigma, sqrt_sigma
        self.trace = float(np.trace(sigma))
        self.dim = mu.shape[0]

    @classmethod
    def from_stats(cls, mu, sigma, count: int | None = None) -> FrechetReference:
        """From a mean and covariance; ``count``, the number of samples behind them, lets
        a covariance of fewer samples than dimensions (rank <= count - 1) be
        factorised in its range only: a fixed Gaussian sketch ``sigma @ G`` with a few
        more columns than the rank spans that range exactly (up to rounding), and the
        eigendecomposition of ``sigma`` restricted to it is a small one."""
        mu = np.asarray(mu, np.float64)
        sigma = np.asarray(sigma, np.float64)
        sigma = 0.5 * (sigma + sigma.T)
        d = mu.shape[0]
        if count is not None and count - 1 + 16 < d // 2:
            g = np.random.default_rng(0).standard_normal((d, count - 1 + 16))
            q, _ = np.linalg.qr(sigma @ g)
            w, u = np.linalg.eigh(q.T @ sigma @ q)
            v = q @ u
        else:
            w, v = np.linalg.eigh(sigma)
        return cls(mu, sigma, (v * np.sqrt(_resolved(w, d))) @ v.T)

    @classmethod
    def from_features(cls, features) -> FrechetReference:
        x = np.asarray(features, np.float64)
        n, d = x.shape
        if n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {n}")
        mu = x.mean(axis=0)
        xc = x - mu
        sigma = xc.T @ xc / (n - 1)
        if n - 1 >= d:
            return cls.from_stats(mu, sigma)
        # sigma = V diag(s^2 / (n-1)) V^T from the thin SVD of the centred rows.
        _, sv, vt = np.linalg.svd(xc, full_matrices=False)
        w = _resolved(sv ** 2 / (n - 1), d)
        return cls(mu, sigma, (vt.T * np.sqrt(w)) @ vt)

    def distance(self, features) -> float:
        """FID between these statistics and the ``(n, D)`` features of a generated set."""
        x = np.asarray(features, np.float64)
        n = x.shape[0]
        if x.ndim != 2 or x.shape[1] != self.dim or n < 2:
            raise ValueError(f"need (n >= 2, {self.dim}) features, got {x.shape}")
        mu2 = x.mean(axis=0)
        xc = x - mu2
        if n - 1 < self.dim:
            m = xc @ self.sqrt_sigma
            eig = np.linalg.eigvalsh(m @ m.T / (n - 1))
        else:
            m = self.sqrt_sigma @ (xc.T @ xc / (n - 1)) @ self.sqrt_sigma
            eig = np.linalg.eigvalsh(0.5 * (m + m.T))
        tr_covmean = float(np.sqrt(_resolved(eig, self.dim)).sum())
        if not np.isfinite(tr_covmean):  # fid's fallback (diagonal offset)
            return frechet_distance(self.mu, self.sigma, mu2, xc.T @ xc / (n - 1))
        diff = self.mu - mu2
        value = diff @ diff + self.trace + float((xc ** 2).sum()) / (n - 1) - 2.0 * tr_covmean
        return max(float(value), 0.0)
