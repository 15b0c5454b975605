"""Fidelity of synthetic images, measured on plain feature arrays (N x D): FD, KID, PRDC, C2ST.

Everything here works on whatever features the caller chose (ImageNet, domain classifier, pixels),
so the metrics are checked against reference implementations on fixed vectors, independent of models.
"""

from __future__ import annotations

import warnings
from typing import TypedDict

import numpy as np


class KIDScore(TypedDict):
    mean: float
    std: float
    subsets: int
    subset_size: int


class PRDCScore(TypedDict):
    precision: float
    recall: float
    density: float
    coverage: float


class C2STScore(TypedDict):
    accuracy: float
    p_value: float
    n: int


def as_features(x: np.ndarray, name: str, min_rows: int = 1) -> np.ndarray:
    """A finite float64 (N x D) array, or a ValueError naming what is wrong with ``x``."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N x D) feature array, got shape {arr.shape}")
    if arr.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {arr.shape[0]}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has zero feature dimensions")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _pair(f1: np.ndarray, f2: np.ndarray, min_rows: int, names: tuple[str, str]) -> tuple[np.ndarray, ...]:
    a = as_features(f1, names[0], min_rows)
    b = as_features(f2, names[1], min_rows)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{names[0]} and {names[1]} have different feature dimensions ({a.shape[1]} vs {b.shape[1]})"
        )
    return a, b


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID when features are Inception's).

    ``d = |mu1 - mu2|^2 + Tr S1 + Tr S2 - 2 Tr sqrt(S1 S2)``. The last trace avoids ``sqrtm`` of the
    non-symmetric product, which drifts into complex values whenever a class has fewer images than
    feature dimensions (singular covariances):

    * few samples (both sets smaller than D): with centred rows A, B, the non-zero eigenvalues of
      S1 S2 are the squared singular values of A Bᵀ / sqrt((n1-1)(n2-1)), so the trace is that
      matrix's nuclear norm: an n1 x n2 SVD instead of D x D work (per-class audits);
    * otherwise ``Tr sqrt(S1^½ S2 S1^½)``: similar to S1 S2 and symmetric positive semi-definite, so
      its eigenvalues are real and non-negative.
    """
    a, b = _pair(f1, f2, 2, ("f1", "f2"))
    diff = a.mean(axis=0) - b.mean(axis=0)
    ca, cb = a - a.mean(axis=0), b - b.mean(axis=0)
    n1, n2, dim = a.shape[0], b.shape[0], a.shape[1]
    trace_s1 = float((ca * ca).sum()) / (n1 - 1)
    trace_s2 = float((cb * cb).sum()) / (n2 - 1)
    if max(n1, n2) < dim:
        singular = np.linalg.svd(ca @ cb.T, compute_uv=False)
        tr_covmean = float(singular.sum()) / np.sqrt((n1 - 1) * (n2 - 1))
    else:
        s1, s2 = ca.T @ ca / (n1 - 1), cb.T @ cb / (n2 - 1)
        w, v = np.linalg.eigh(s1)
        root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
        middle = root1 @ s2 @ root1
        eig = np.linalg.eigvalsh((middle + middle.T) / 2)
        tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    value = float(diff @ diff) + trace_s1 + trace_s2 - 2.0 * tr_covmean
    return max(value, 0.0)  # rounding can leave -1e-12 for identical sets


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with the cubic polynomial kernel of KID (Bińkowski et al. 2018); x, y same size."""
    m = x.shape[0]
    kxx, kyy, kxy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.mean())


def kernel_inception_distance(
    f1: np.ndarray,
    f2: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> KIDScore:
    """KID: unbiased polynomial-kernel MMD² averaged over random equal-size subsets (without replacement).

    ``subset_size`` is capped at the smaller set; when it covers both sets every subset is the whole
    set and the score is the exact unbiased MMD² (std 0). Values near 0 (possibly negative) mean "same
    distribution".
    """
    a, b = _pair(f1, f2, 2, ("f1", "f2"))
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    m = min(subset_size, a.shape[0], b.shape[0])
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        values[i] = unbiased_mmd2(x, y)
    return KIDScore(mean=float(values.mean()), std=float(values.std()), subsets=subsets, subset_size=m)


def _squared_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def pairwise_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Euclidean distances (len(x) x len(y)) through one matrix product (fast for wide features)."""
    d2 = _squared_norms(x)[:, None] + _squared_norms(y)[None, :] - 2.0 * (x @ y.T)
    return np.sqrt(np.clip(d2, 0.0, None))


def kth_neighbour_radius(x: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Distance from each row of ``x`` to its k-th nearest *other* row (the PRDC ball radius)."""
    radii = np.empty(x.shape[0])
    for start in range(0, x.shape[0], chunk):
        d = pairwise_distances(x[start : start + chunk], x)
        # index k of the sorted row: index 0 is the point itself (distance 0)
        radii[start : start + chunk] = np.partition(d, k, axis=1)[:, k]
    return radii


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5, chunk: int = 1024) -> PRDCScore:
    """Precision, recall, density and coverage (Naeem et al. 2020) with k-nearest-neighbour balls.

    Same definitions and strict inequalities as the authors' ``prdc`` package; fake points are
    processed in chunks so 10k x 10k sets never need a full distance matrix.
    """
    a, b = _pair(real, fake, 1, ("real", "fake"))
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for name, arr in (("real", a), ("fake", b)):
        if arr.shape[0] <= k:
            raise ValueError(f"prdc with k={k} needs more than {k} {name} samples, got {arr.shape[0]}")
    real_radii = kth_neighbour_radius(a, k, chunk)
    fake_radii = kth_neighbour_radius(b, k, chunk)
    in_real_balls = np.empty(b.shape[0])  # per fake: how many real balls contain it
    real_recalled = np.zeros(a.shape[0], dtype=bool)  # per real: inside some fake ball
    nearest_fake = np.full(a.shape[0], np.inf)  # per real: distance to the closest fake
    for start in range(0, b.shape[0], chunk):
        d = pairwise_distances(a, b[start : start + chunk])  # real x fake-chunk
        in_real_balls[start : start + chunk] = (d < real_radii[:, None]).sum(axis=0)
        real_recalled |= (d < fake_radii[None, start : start + chunk]).any(axis=1)
        nearest_fake = np.minimum(nearest_fake, d.min(axis=1))
    return PRDCScore(
        precision=float((in_real_balls > 0).mean()),
        recall=float(real_recalled.mean()),
        density=float(in_real_balls.mean() / k),
        coverage=float((nearest_fake < real_radii).mean()),
    )


def c2st(real: np.ndarray, fake: np.ndarray, seed: int = 0, test_fraction: float = 0.5) -> C2STScore:
    """Classifier two-sample test: can logistic regression tell real from fake features?

    Classes are balanced by subsampling the larger set, split stratified into train/held-out, and the
    held-out accuracy is tested against chance with a one-sided binomial test. Accuracy ≈ 0.5 (large
    p-value) means indistinguishable; ≈ 1 means trivially separable. Exact copies can score *below*
    0.5: a held-out point whose twin was trained on with the other label is misclassified.
    """
    from scipy.stats import binomtest
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    a, b = _pair(real, fake, 2, ("real", "fake"))
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    n = min(a.shape[0], b.shape[0])
    a = a[rng.choice(a.shape[0], n, replace=False)]
    b = b[rng.choice(b.shape[0], n, replace=False)]
    x = np.vstack([a, b])
    y = np.r_[np.zeros(n, dtype=int), np.ones(n, dtype=int)]
    n_test = max(2, round(2 * n * test_fraction))
    if 2 * n - n_test < 2:
        raise ValueError(f"c2st needs at least 2 samples per set on each side of the split, got {n}")
    x_fit, x_held, y_fit, y_held = train_test_split(
        x, y, test_size=n_test, stratify=y, random_state=seed
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    with warnings.catch_warnings():
        # separable real/fake features never converge fully; the held-out accuracy is what counts
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x_fit, y_fit)
    correct = int((model.predict(x_held) == y_held).sum())
    p_value = binomtest(correct, len(y_held), 0.5, alternative="greater").pvalue
    return C2STScore(accuracy=correct / len(y_held), p_value=float(p_value), n=len(y_held))


__all__ = [
    "C2STScore",
    "KIDScore",
    "PRDCScore",
    "as_features",
    "c2st",
    "frechet_distance",
    "kernel_inception_distance",
    "kth_neighbour_radius",
    "pairwise_distances",
    "prdc",
    "unbiased_mmd2",
]
