"""Sample-quality metrics on feature arrays (numpy): FID/sFID, Inception Score, improved
precision/recall, streaming feature statistics, and ADM-format reference batches.

Conventions follow ADM's ``evaluations/evaluator.py`` (the numbers DiT, SiT and TREAD report):
FID and sFID are Frechet distances between Gaussians fitted to Inception ``pool`` and
``spatial`` features; IS is the mean over splits of exp(E KL(p(y|x) || p(y))) on the softmax of
the unbiased 1008-way logits; precision/recall use k=3 nearest neighbours on pool features,
precision judged against the reference manifold, recall against the sample manifold.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Iterator, Mapping
from typing import IO

import numpy as np
from scipy import special
from threadpoolctl import threadpool_limits


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr (S1 S2)^(1/2) for symmetric positive semi-definite S1, S2, in float64.

    Evaluated as sum(sqrt(eigvalsh(R S2 R))) with R = S1^(1/2) from ``eigh``: S1 S2 = R (R S2)
    has the eigenvalues of the symmetric R S2 R, so two symmetric eigendecompositions replace
    the general matrix square root ``scipy.linalg.sqrtm(S1 @ S2)`` that pytorch-fid and ADM use
    (2048x2048 on this project's loaded 2-core CPU: 142 s for sqrtm, 5 s here). Rounding-level
    eigenvalues (as in a covariance that is singular, e.g. fewer samples than dimensions)
    are set to 0, so the result is always finite and real.
    """
    # One BLAS thread: OpenBLAS's threaded eigh was measured 9x slower (39 s instead of 4.6 s
    # at 2048) on a CPU shared with other jobs, and a single thread is only a little slower
    # on an idle one.
    with threadpool_limits(limits=1):
        eigvals, eigvecs = np.linalg.eigh(sigma1)
        root1 = (eigvecs * np.sqrt(_numerically_nonnegative(eigvals))) @ eigvecs.T
        inner = root1 @ sigma2 @ root1
        inner = (inner + inner.T) / 2  # exactly symmetric for eigvalsh (rounding breaks it)
        eigvals = np.linalg.eigvalsh(inner)
    return float(np.sqrt(_numerically_nonnegative(eigvals)).sum())


def _numerically_nonnegative(eigvals: np.ndarray) -> np.ndarray:
    """Eigenvalues below the rounding level (numpy's matrix_rank tolerance: n * eps * max) set
    to 0. Clipping only the negative ones would leave the null space of a singular covariance
    as thousands of ~1e-13 values whose square roots (~3e-7 each) add up to a visible bias."""
    tol = len(eigvals) * np.finfo(np.float64).eps * max(np.abs(eigvals).max(initial=0.0), 1e-300)
    return np.where(eigvals > tol, eigvals, 0.0)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

    The trace term comes from ``trace_sqrt_product`` (symmetric eigendecompositions), which
    equals the ``sqrtm`` formula of pytorch-fid and ADM to about 1e-10 relative on well
    conditioned covariances (tested against sqrtm). Near-singular covariances: pytorch-fid and
    ADM retry with 1e-6 added to both diagonals when sqrtm(S1 S2) comes out non-finite, and
    drop a small imaginary part of the result; here eigenvalues below rounding level are zeroed,
    which needs no retry and no offset. In the cases where they retry, their value therefore
    includes the offset's effect (about 2e-6 x dim on the traces) and ours does not.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    if sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"sigma {sigma1.shape} does not fit mu {mu1.shape}")
    if not (np.isfinite(sigma1).all() and np.isfinite(sigma2).all()):
        raise ValueError("FID: covariance matrices must be finite")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * trace_sqrt_product(sigma1, sigma2))


class FeatureStatistics:
    """Mean and covariance of a stream of feature batches, without keeping the features.

    Keeps the count, the float64 mean and the float64 sum of outer products of deviations from
    the mean, combined with Chan et al.'s pairwise update. This is the same information as a
    running sum plus a sum of outer products, but it does not cancel catastrophically when
    features have a large mean. Partial statistics (per host, or saved for a resumed
    evaluation) combine with ``merge``; ``state``/``from_state`` turn them into arrays.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0
        self._mean = np.zeros(dim, np.float64)
        self._m2 = np.zeros((dim, dim), np.float64)

    def update(self, features: np.ndarray) -> None:
        """Add a batch of features [B, dim]."""
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features [B, {self.dim}], got {features.shape}")
        if len(features) == 0:
            return
        batch = FeatureStatistics(self.dim)
        batch.count = len(features)
        batch._mean = features.mean(axis=0)
        centred = features - batch._mean
        batch._m2 = centred.T @ centred
        self._absorb(batch)

    def merge(self, other: FeatureStatistics) -> FeatureStatistics:
        """Statistics of the union of both streams (neither input changes)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dims {self.dim} and {other.dim}")
        out = FeatureStatistics.from_state(self.state())
        out._absorb(other)
        return out

    def _absorb(self, other: FeatureStatistics) -> None:
        n = self.count + other.count
        if other.count == 0:
            return
        delta = other._mean - self._mean
        self._m2 = self._m2 + other._m2 + np.outer(delta, delta) * (self.count * other.count / n)
        self._mean = self._mean + delta * (other.count / n)
        self.count = n

    @property
    def mean(self) -> np.ndarray:
        return self._mean.copy()

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased covariance (ddof=1), as ``np.cov(features, rowvar=False)``."""
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 samples, have {self.count}")
        return self._m2 / (self.count - 1)

    def state(self) -> dict[str, np.ndarray]:
        return {"count": np.asarray(self.count, np.int64), "mean": self._mean.copy(),
                "m2": self._m2.copy()}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> FeatureStatistics:
        mean = np.asarray(state["mean"], np.float64)
        out = cls(mean.shape[0])
        out.count = int(state["count"])
        out._mean = mean.copy()
        out._m2 = np.asarray(state["m2"], np.float64).copy()
        return out

    def frechet_distance(self, other: FeatureStatistics) -> float:
        return frechet_distance(self.mean, self.covariance, other.mean, other.covariance)


def inception_score(predictions: np.ndarray, *, splits: int = 10,
                    from_logits: bool = True) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits`` consecutive chunks).

    ``predictions``: [N, C] logits (default) or class probabilities (``from_logits=False``).
    For ADM-comparable numbers pass the Inception's ``logits_unbiased`` (all 1008 classes) of
    50K samples; 10 splits of 5000 are ADM's split_size=5000.
    """
    predictions = np.asarray(predictions, np.float64)
    if predictions.ndim != 2:
        raise ValueError(f"expected predictions [N, C], got {predictions.shape}")
    if not 1 <= splits <= len(predictions):
        raise ValueError(f"need 1 <= splits <= N, got splits={splits}, N={len(predictions)}")
    probs = special.softmax(predictions, axis=1) if from_logits else predictions
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        # KL(p(y|x) || p(y)) with 0 log 0 = 0 (xlogy), so one-hot predictions are exact.
        kl = (special.xlogy(part, part) - special.xlogy(part, marginal)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] - 2 * (a @ b.T) + (b * b).sum(1)[None, :]
    return np.maximum(sq, 0)


def _knn_radii(features: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Squared distance from each point to its k-th nearest other point."""
    radii = np.empty(len(features), features.dtype)
    for start in range(0, len(features), batch_size):
        d = _squared_distances(features[start:start + batch_size], features)
        # Index 0 of the partition is the point itself (distance 0).
        radii[start:start + batch_size] = np.partition(d, k, axis=1)[:, k]
    return radii


def _inside_manifold(queries: np.ndarray, points: np.ndarray, radii: np.ndarray,
                     batch_size: int) -> np.ndarray:
    """For each query: is it within radius of at least one manifold point?"""
    inside = np.empty(len(queries), bool)
    for start in range(0, len(queries), batch_size):
        d = _squared_distances(queries[start:start + batch_size], points)
        inside[start:start + batch_size] = (d <= radii[None, :]).any(axis=1)
    return inside


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 3,
                     batch_size: int = 1000) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019), as ADM computes them.

    Each set's manifold is the union of balls around its points with radius the distance to
    the k-th nearest neighbour in the same set. Precision: share of ``fake`` inside the real
    manifold; recall: share of ``real`` inside the fake manifold. Distances are computed in
    float32 in row blocks of ``batch_size`` (memory ~ batch_size x N x 4 bytes).
    """
    real = np.asarray(real, np.float32)
    fake = np.asarray(fake, np.float32)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected feature arrays [N, D] of equal D, got {real.shape}, "
                         f"{fake.shape}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"each set needs more than k={k} points, got {len(real)}, {len(fake)}")
    real_radii = _knn_radii(real, k, batch_size)
    fake_radii = _knn_radii(fake, k, batch_size)
    precision = _inside_manifold(fake, real, real_radii, batch_size).mean()
    recall = _inside_manifold(real, fake, fake_radii, batch_size).mean()
    return float(precision), float(recall)


# ----------------------------------------------------------------------------------------------
# ADM reference batches: .npz with "arr_0" (uint8 images [N, H, W, 3]) and/or precomputed
# statistics "mu", "sigma" (pool features) and "mu_s", "sigma_s" (spatial features).


@dataclasses.dataclass(frozen=True)
class ReferenceStatistics:
    """FID (``mu``, ``sigma``) and sFID (``mu_s``, ``sigma_s``) statistics of a reference set."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None


def read_adm_statistics(path: str | os.PathLike) -> ReferenceStatistics | None:
    """The precomputed statistics in an ADM batch, or None when it holds only images."""
    with np.load(path) as data:
        if "mu" not in data.files:
            return None
        spatial = "mu_s" in data.files
        return ReferenceStatistics(
            mu=data["mu"], sigma=data["sigma"],
            mu_s=data["mu_s"] if spatial else None, sigma_s=data["sigma_s"] if spatial else None)


def _check_images(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"ADM batches hold uint8 images [N, H, W, 3], got {images.dtype} "
                         f"{images.shape}")


def write_adm_npz(path: str | os.PathLike, *, images: np.ndarray | None = None,
                  stats: ReferenceStatistics | None = None,
                  extra: Mapping[str, np.ndarray] | None = None) -> None:
    """Write an ADM-format batch: ``arr_0`` images and/or the statistics arrays, plus any
    ``extra`` arrays under their own names (ADM's tools ignore keys they do not know)."""
    arrays: dict[str, np.ndarray] = dict(extra or {})
    if images is not None:
        _check_images(images)
        arrays["arr_0"] = images
    if stats is not None:
        arrays["mu"], arrays["sigma"] = stats.mu, stats.sigma
        if stats.mu_s is not None:
            arrays["mu_s"], arrays["sigma_s"] = stats.mu_s, stats.sigma_s
    if not arrays:
        raise ValueError("write_adm_npz needs images, statistics or both")
    np.savez(path, **arrays)


def _open_adm_images(path: str | os.PathLike, zf: zipfile.ZipFile) -> tuple[IO[bytes], tuple]:
    """The open ``arr_0.npy`` member positioned at its data, and its shape."""
    if "arr_0.npy" not in zf.namelist():
        raise ValueError(f"{path}: no images (arr_0) in this batch")
    f = zf.open("arr_0.npy")
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"{path}: unsupported .npy format version {version}")
    if fortran_order or dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be C-ordered uint8 [N, H, W, 3], got "
                         f"{dtype} {shape}{' (Fortran order)' if fortran_order else ''}")
    return f, shape


def adm_images_shape(path: str | os.PathLike) -> tuple[int, int, int, int]:
    """Shape [N, H, W, 3] of an ADM batch's images, from the header alone."""
    with zipfile.ZipFile(path) as zf:
        f, shape = _open_adm_images(path, zf)
        f.close()
        return shape


def iter_adm_images(path: str | os.PathLike, batch_size: int) -> Iterator[np.ndarray]:
    """Yield the ``arr_0`` images of an ADM batch in chunks, without loading the whole array
    (50K images at 256x256 are 9.8 GB)."""
    with zipfile.ZipFile(path) as zf:
        f, shape = _open_adm_images(path, zf)
        with f:
            per_image = int(np.prod(shape[1:]))
            for start in range(0, shape[0], batch_size):
                count = min(batch_size, shape[0] - start)
                raw = f.read(count * per_image)
                if len(raw) != count * per_image:
                    raise ValueError(f"{path}: arr_0 is truncated")
                yield np.frombuffer(raw, np.uint8).reshape(count, *shape[1:])
