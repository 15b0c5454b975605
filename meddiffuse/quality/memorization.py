"""Memorization: is a synthetic image a copy of a patient's training image?

For every synthetic image we find its nearest real *training* image. What counts as "too close" is
calibrated on real data: the distances from real *test* images (other patients, never trained on)
to their nearest training image. A synthetic image closer than that distribution's low percentile
is flagged as a likely copy.

Distances: in pixel space the RMS difference of [0, 1] intensities (Euclidean / sqrt(#values), so
thresholds read the same at every resolution); in feature space the Euclidean distance between
L2-normalised features (a monotone form of cosine distance), because feature norms follow image
contrast rather than content. A synthetic image is flagged if *any* space flags it: a copy that was
shifted or re-contrasted can hide in pixel space but not in feature space, and for a privacy check a
missed copy costs more than a false alarm.

The threshold is the percentile with ``method="lower"``: an observed test distance, so no real test
image is ever flagged against its own calibration set, even when the test split is small.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from meddiffuse.quality.fidelity import as_features

PIXEL_SPACE = "pixel"


class SpaceMemorization(BaseModel):
    """Nearest-training-image distances of every synthetic image in one space, and the flags."""

    space: str
    metric: str
    percentile: float
    threshold: float = Field(description="Percentile of real-test to real-train nearest distances.")
    reference_quantiles: dict[str, float] = Field(
        description="Quantiles (p1, p5, p50, p95) of the real-test to real-train nearest distances."
    )
    nearest_distance: list[float]
    nearest_train_index: list[int]
    nearest_mirrored: list[bool] = Field(description="The nearest training image was its mirror image.")
    flagged: list[bool]

    @property
    def flagged_share(self) -> float:
        return float(np.mean(self.flagged)) if self.flagged else 0.0


class ClosestPair(BaseModel):
    """A synthetic image and its nearest training image, ranked by distance / threshold."""

    synthetic_index: int
    train_index: int
    space: str
    distance: float
    threshold: float
    ratio: float = Field(description="distance / threshold; below 1 means flagged.")
    mirrored: bool = False
    flagged: bool


class MemorizationResult(BaseModel):
    percentile: float
    n_synthetic: int
    n_train: int
    n_test: int
    spaces: dict[str, SpaceMemorization]
    flagged: list[bool] = Field(description="Per synthetic image: flagged in at least one space.")

    @property
    def flagged_share(self) -> float:
        return float(np.mean(self.flagged)) if self.flagged else 0.0

    @property
    def flagged_indices(self) -> list[int]:
        return [i for i, f in enumerate(self.flagged) if f]

    def closest_pairs(self, top: int = 8) -> list[ClosestPair]:
        """The ``top`` most suspicious synthetic images, each with its closest pair in its worst space."""
        best: dict[int, ClosestPair] = {}
        for space in self.spaces.values():
            for i, (d, j, m, f) in enumerate(
                zip(space.nearest_distance, space.nearest_train_index, space.nearest_mirrored,
                    space.flagged, strict=True)
            ):
                ratio = d / space.threshold if space.threshold > 0 else (0.0 if d == 0 else np.inf)
                if i not in best or ratio < best[i].ratio:
                    best[i] = ClosestPair(synthetic_index=i, train_index=j, space=space.space, distance=d,
                                          threshold=space.threshold, ratio=float(ratio), mirrored=m,
                                          flagged=f)
        return sorted(best.values(), key=lambda p: (p.ratio, p.synthetic_index))[:top]


def pixel_vectors(images: np.ndarray) -> np.ndarray:
    """Flattened [0, 1] intensities scaled by 1/sqrt(#values): Euclidean distance = RMS difference.

    float32: 10k synthetic 64 px RGB images are 0.5 GB instead of 1 GB, and distances only need to
    separate copies (~0) from neighbours (~0.05-0.2).
    """
    arr = np.asarray(images).reshape(len(images), -1).astype(np.float32)
    return arr * np.float32(1.0 / 255.0 / np.sqrt(arr.shape[1]))


def normalised_features(features: np.ndarray, name: str) -> np.ndarray:
    feats = as_features(features, name)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    return feats / np.maximum(norms, 1e-12)


def nearest_neighbours(
    queries: np.ndarray, reference: np.ndarray, chunk: int = 512, progress: bool = False, desc: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """(distance, index) of each query's nearest reference row (Euclidean)."""
    ref_sq = np.einsum("ij,ij->i", reference, reference)
    index = np.empty(len(queries), dtype=np.int64)
    distance = np.empty(len(queries), dtype=np.float64)
    for start in tqdm(range(0, len(queries), chunk), desc=desc, disable=not progress, leave=False):
        q = queries[start : start + chunk]
        # |q|^2 is constant per row, so the argmin needs only |r|^2 - 2 q.r
        nearest = np.argmin(ref_sq[None, :] - 2.0 * (q @ reference.T), axis=1)
        index[start : start + chunk] = nearest
        # exact distances for the chosen pairs: the matrix-product form loses the zeros of exact copies
        diff = q.astype(np.float64) - reference[nearest].astype(np.float64)
        distance[start : start + chunk] = np.linalg.norm(diff, axis=1)
    return distance, index


def space_memorization(
    space: str,
    synthetic: np.ndarray,
    real_train: np.ndarray,
    real_test: np.ndarray,
    *,
    metric: str,
    percentile: float = 1.0,
    mirrored_train: np.ndarray | None = None,
    progress: bool = False,
) -> SpaceMemorization:
    """Flags for vectors already in a space (rows = images). ``mirrored_train`` rows mirror ``real_train``."""
    n_train = len(real_train)
    reference = real_train if mirrored_train is None else np.vstack([real_train, mirrored_train])
    test_d, _ = nearest_neighbours(real_test, reference, progress=progress, desc=f"{space}: test→train")
    syn_d, syn_i = nearest_neighbours(synthetic, reference, progress=progress, desc=f"{space}: synth→train")
    threshold = float(np.percentile(test_d, percentile, method="lower"))
    quantiles = {f"p{q:g}": float(np.percentile(test_d, q)) for q in (1, 5, 50, 95)}
    return SpaceMemorization(
        space=space,
        metric=metric,
        percentile=percentile,
        threshold=threshold,
        reference_quantiles=quantiles,
        nearest_distance=syn_d.tolist(),
        nearest_train_index=(syn_i % n_train).tolist(),
        nearest_mirrored=(syn_i >= n_train).tolist(),
        flagged=(syn_d < threshold).tolist(),
    )


def check_image_sets(**sets: np.ndarray) -> tuple[int, ...]:
    """All sets N x H x W x C with one common image shape and at least one image; returns that shape."""
    shape: tuple[int, ...] | None = None
    for name, arr in sets.items():
        a = np.asarray(arr)
        if a.ndim != 4:
            raise ValueError(f"{name} must be N x H x W x C images, got shape {a.shape}")
        if a.shape[0] == 0:
            raise ValueError(f"{name} is empty")
        if shape is not None and a.shape[1:] != shape:
            raise ValueError(f"{name} images are {a.shape[1:]}, others are {shape}: resize them first")
        shape = a.shape[1:]
    assert shape is not None
    return shape


def memorization(
    synthetic: np.ndarray,
    real_train: np.ndarray,
    real_test: np.ndarray,
    *,
    feature_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    percentile: float = 1.0,
    mirror: bool = False,
    progress: bool = False,
) -> MemorizationResult:
    """Nearest-training-image audit of ``synthetic`` in pixel space (and feature space if ``feature_fn``).

    ``mirror=True`` also compares against left-right mirrored training images: a generator trained
    with flip augmentation can reproduce a patient's image mirrored.
    """
    check_image_sets(synthetic=synthetic, real_train=real_train, real_test=real_test)
    if not 0.0 < percentile < 100.0:
        raise ValueError(f"percentile must be in (0, 100), got {percentile}")
    images = {"synthetic": synthetic, "train": real_train, "test": real_test}
    if mirror:
        images["mirrored"] = np.ascontiguousarray(np.asarray(real_train)[:, :, ::-1])
    features = None
    if feature_fn is not None:
        features = {k: np.asarray(feature_fn(np.ascontiguousarray(v))) for k, v in images.items()}
    return memorization_in_spaces(images, features, "features" if features else None,
                                  percentile=percentile, progress=progress)


def memorization_in_spaces(
    images: dict[str, np.ndarray],
    features: dict[str, np.ndarray] | None,
    feature_space: str | None,
    *,
    percentile: float,
    progress: bool,
) -> MemorizationResult:
    """Nearest-training-image flags in pixel space and (if given) one feature space.

    ``images``/``features`` hold ``synthetic``, ``train``, ``test`` and optionally ``mirrored`` (train).
    """
    def space(name: str, vectors: dict[str, np.ndarray], metric: str) -> SpaceMemorization:
        return space_memorization(name, vectors["synthetic"], vectors["train"], vectors["test"], metric=metric,
                                  percentile=percentile, mirrored_train=vectors.get("mirrored"),
                                  progress=progress)

    spaces = {PIXEL_SPACE: space(PIXEL_SPACE, {k: pixel_vectors(v) for k, v in images.items()}, "rms-pixel")}
    if feature_space is not None and features is not None:
        normalised = {k: normalised_features(v, f"{feature_space} {k} features") for k, v in features.items()}
        spaces[feature_space] = space(feature_space, normalised, "l2-normalised-features")
    return combine_spaces(spaces, percentile, len(images["train"]), len(images["test"]))


def combine_spaces(
    spaces: dict[str, SpaceMemorization], percentile: float, n_train: int, n_test: int
) -> MemorizationResult:
    flags = np.zeros(len(next(iter(spaces.values())).flagged), dtype=bool)
    for space in spaces.values():
        flags |= np.asarray(space.flagged, dtype=bool)
    return MemorizationResult(
        percentile=percentile,
        n_synthetic=len(flags),
        n_train=n_train,
        n_test=n_test,
        spaces=spaces,
        flagged=flags.tolist(),
    )


__all__ = [
    "PIXEL_SPACE",
    "ClosestPair",
    "MemorizationResult",
    "SpaceMemorization",
    "check_image_sets",
    "combine_spaces",
    "memorization",
    "memorization_in_spaces",
    "nearest_neighbours",
    "normalised_features",
    "pixel_vectors",
    "space_memorization",
]
