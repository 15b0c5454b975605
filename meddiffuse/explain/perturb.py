"""Building perturbed images in one vectorised gather, and predicting them in measured batches.

LIME and the deletion curve both ask the model about many copies of one image in which some
superpixels are replaced. ``lime_image`` builds each copy in a Python loop; here a boolean
(samples x superpixels) matrix indexes the segment map once per batch, so building costs next to
nothing next to the forward pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

PredictFn = Callable[[np.ndarray], np.ndarray]
"""images (N, H, W, C) float32 in [0, 1] -> class probabilities (N, K)."""

BATCH_CANDIDATES: tuple[int, ...] = (8, 16, 32, 64, 128)


class PredictionError(RuntimeError):
    """The prediction function returned something that is not an (N, K) array of probabilities."""


def segment_means(image: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """HxWxC image in which every superpixel is filled with its own mean colour (LIME's default)."""
    n = int(segments.max()) + 1
    flat = segments.ravel()
    counts = np.bincount(flat, minlength=n).astype(np.float64)
    means = np.stack(
        [np.bincount(flat, weights=image[:, :, c].ravel(), minlength=n) for c in range(image.shape[2])],
        axis=1,
    ) / np.maximum(counts, 1)[:, None]
    return means[segments].astype(image.dtype)


def perturb(image: np.ndarray, replacement: np.ndarray, segments: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """(N, H, W, C) images: ``image`` where ``keep[n, segment]`` is true, else ``replacement``."""
    pixel_keep = keep.astype(bool)[:, segments]  # one gather: (N, S) -> (N, H, W)
    return np.where(pixel_keep[..., None], image[None], replacement[None])


@dataclass
class BatchCalibration:
    """Milliseconds per image measured at each tried batch size, and the fastest one."""

    best: int
    ms_per_image: dict[int, float] = field(default_factory=dict)


def _checked(probs: object, n: int, k: int | None) -> np.ndarray:
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise PredictionError(f"predict_fn must return an (N, K) array for N={n} images, got shape {arr.shape}")
    if k is not None and arr.shape[1] != k:
        raise PredictionError(f"predict_fn returned {arr.shape[1]} classes, earlier batches had {k}")
    if not np.isfinite(arr).all():
        raise PredictionError("predict_fn returned NaN or infinite probabilities")
    return arr


def predict_in_batches(
    predict_fn: PredictFn,
    make_batch: Callable[[int, int], np.ndarray],
    n: int,
    batch_size: int | None = None,
    candidates: tuple[int, ...] = BATCH_CANDIDATES,
) -> tuple[np.ndarray, BatchCalibration | None]:
    """Predict images ``make_batch(start, stop)`` for 0..n in batches; (N, K) probabilities.

    With ``batch_size=None`` the first batches double as a calibration: after one untimed warm-up
    batch, each candidate size is timed twice, in a rising then a falling sweep, on real work (nothing
    is wasted), and the rest runs at the size with the best time. Measured, because on a CPU small
    batches often win (cache) while on a GPU large ones do; the best of two sweeps, because a single
    timing on a shared machine can catch another process's burst.
    """
    if n < 1:
        raise ValueError("need at least one image to predict")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    out: list[np.ndarray] = []
    k: int | None = None
    done = 0

    def run(size: int) -> float:
        nonlocal done, k
        stop = min(n, done + size)
        batch = make_batch(done, stop)
        start = time.perf_counter()
        probs = _checked(predict_fn(batch), stop - done, k)
        elapsed = time.perf_counter() - start
        k = probs.shape[1]
        out.append(probs)
        n_done, done = stop - done, stop
        return elapsed * 1000 / n_done

    calibration: BatchCalibration | None = None
    if batch_size is None:
        tried = sorted({c for c in candidates if c >= 1})
        if not tried:
            raise ValueError("batch-size candidates must hold at least one positive size")
        run(tried[0])  # warm-up: first calls pay for allocation and kernel selection
        timings: dict[int, float] = {}
        for size in tried + tried[::-1]:
            if n - done < size:
                continue
            timings[size] = min(timings.get(size, np.inf), run(size))
        best = min(timings, key=timings.__getitem__) if timings else tried[0]
        calibration = BatchCalibration(best=best, ms_per_image=timings)
        batch_size = best
    while done < n:
        run(batch_size)
    return np.concatenate(out), calibration


def calibrate_batch_size(
    predict_fn: PredictFn,
    images: np.ndarray,
    candidates: tuple[int, ...] = BATCH_CANDIDATES,
    repeats: int = 2,
) -> BatchCalibration:
    """Time ``predict_fn`` at each candidate batch size on copies of ``images``; keep the fastest.

    Each size is timed ``repeats`` times and the best time kept (the minimum is the least disturbed
    by other work on a shared machine).
    """
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty (N, H, W, C) array, got shape {images.shape}")
    tried = sorted(c for c in candidates if c >= 1)
    if not tried:
        raise ValueError("batch-size candidates must hold at least one positive size")
    pool = np.resize(images, (max(tried),) + images.shape[1:])  # repeat images up to the largest batch
    _checked(predict_fn(pool[: tried[0]]), tried[0], None)  # warm-up
    timings: dict[int, float] = {}
    for size in tried:
        best = np.inf
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            predict_fn(pool[:size])
            best = min(best, (time.perf_counter() - start) * 1000 / size)
        timings[size] = best
    return BatchCalibration(best=min(timings, key=timings.__getitem__), ms_per_image=timings)


def predict_masks(
    predict_fn: PredictFn,
    image: np.ndarray,
    replacement: np.ndarray,
    segments: np.ndarray,
    keep: np.ndarray,
    batch_size: int | None = None,
    candidates: tuple[int, ...] = BATCH_CANDIDATES,
) -> tuple[np.ndarray, BatchCalibration | None]:
    """Probabilities (N, K) for the N perturbations ``keep`` (N x S, true = superpixel kept).

    Identical rows are predicted once: with few superpixels (quickshift finds ~6 on small images)
    most of LIME's 1000 samples repeat, and deletion curves all share their first and last steps.
    """
    unique, inverse = np.unique(keep.astype(bool), axis=0, return_inverse=True)
    probs, calibration = predict_in_batches(
        predict_fn,
        lambda a, b: perturb(image, replacement, segments, unique[a:b]),
        len(unique),
        batch_size,
        candidates,
    )
    return probs[inverse.ravel()], calibration
