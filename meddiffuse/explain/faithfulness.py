"""How much an explanation can be trusted: deletion curves, and agreement with a known lesion mask."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy.ndimage import gaussian_filter

from meddiffuse.explain.images import ImageInputError, as_float_image
from meddiffuse.explain.lime import Explanation
from meddiffuse.explain.perturb import PredictFn, predict_masks

Baseline = Literal["mean", "blur"] | float


@dataclass
class DeletionResult:
    """Probability of the explained class as superpixels are removed, best-first versus at random.

    A faithful explanation removes the evidence first, so its curve falls fast and its area is small:
    ``faithfulness = auc_random - auc_top`` is positive (and ``ratio = auc_top / auc_random`` < 1).
    """

    fractions: np.ndarray  # (steps + 1,) share of superpixels removed, 0 .. 1
    curve: np.ndarray  # (steps + 1,) probability, removing superpixels by descending weight
    random_curves: np.ndarray  # (n_random, steps + 1) the same for random removal orders
    auc_top: float
    auc_random: float  # mean over the random orders
    auc_random_std: float
    baseline: str

    @property
    def faithfulness(self) -> float:
        return self.auc_random - self.auc_top

    @property
    def ratio(self) -> float:
        return self.auc_top / self.auc_random if self.auc_random > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {
            "fractions": self.fractions.tolist(),
            "curve": self.curve.tolist(),
            "random_curve_mean": self.random_curves.mean(axis=0).tolist(),
            "auc_top": self.auc_top,
            "auc_random": self.auc_random,
            "auc_random_std": self.auc_random_std,
            "faithfulness": self.faithfulness,
            "ratio": self.ratio,
            "baseline": self.baseline,
        }


def _area(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Trapezoid area under each row of ``y`` over ``x``."""
    return ((y[..., 1:] + y[..., :-1]) * np.diff(x) / 2).sum(axis=-1)


def baseline_image(image: np.ndarray, baseline: Baseline, blur_sigma: float | None = None) -> np.ndarray:
    """What removed superpixels are replaced with: the image mean, a strong blur, or a constant."""
    if baseline == "mean":
        return np.broadcast_to(image.mean(axis=(0, 1), keepdims=True), image.shape).copy()
    if baseline == "blur":
        sigma = blur_sigma if blur_sigma is not None else min(image.shape[:2]) / 8
        return gaussian_filter(image, (sigma, sigma, 0))
    if isinstance(baseline, int | float) and not isinstance(baseline, bool):
        if not 0.0 <= float(baseline) <= 1.0:
            raise ValueError(f"a constant baseline must lie in [0, 1], got {baseline}")
        return np.full_like(image, float(baseline))
    raise ValueError(f"baseline must be 'mean', 'blur' or a number in [0, 1], got {baseline!r}")


def deletion_curve(
    predict_fn: PredictFn,
    image: np.ndarray,
    explanation: Explanation,
    *,
    steps: int | None = None,
    baseline: Baseline = "mean",
    n_random: int = 10,
    seed: int = 0,
    batch_size: int | None = None,
) -> DeletionResult:
    """Remove superpixels in order of descending LIME weight and track the explained class's probability.

    ``steps`` points past the start (None = one per superpixel, at most 25); the same is done for
    ``n_random`` random orders. All curves are predicted together in batches.
    """
    img = as_float_image(image)
    seg = explanation.segments
    if seg.shape != img.shape[:2]:
        raise ImageInputError(f"image is {img.shape[:2]} but the explanation's segments are {seg.shape}")
    if n_random < 1:
        raise ValueError(f"n_random must be at least 1, got {n_random}")
    n_seg = explanation.n_segments
    steps = min(n_seg, 25) if steps is None else steps
    if not 1 <= steps <= n_seg:
        raise ValueError(f"steps must lie in 1..{n_seg} (the number of superpixels), got {steps}")

    rng = np.random.default_rng(seed)
    orders = [np.argsort(-explanation.weights, kind="stable")]
    orders += [rng.permutation(n_seg) for _ in range(n_random)]
    removed_counts = np.round(np.linspace(0, n_seg, steps + 1)).astype(int)
    keep = np.ones((len(orders), steps + 1, n_seg), dtype=bool)
    for o, order in enumerate(orders):
        for s, count in enumerate(removed_counts):
            keep[o, s, order[:count]] = False
    keep = keep.reshape(-1, n_seg)

    replacement = baseline_image(img, baseline)
    probs, _ = predict_masks(predict_fn, img, replacement, seg, keep, batch_size)
    curves = probs[:, explanation.label].reshape(len(orders), steps + 1)
    fractions = removed_counts / n_seg
    areas = _area(fractions, curves)
    return DeletionResult(
        fractions=fractions,
        curve=curves[0],
        random_curves=curves[1:],
        auc_top=float(areas[0]),
        auc_random=float(areas[1:].mean()),
        auc_random_std=float(areas[1:].std()),
        baseline=baseline if isinstance(baseline, str) else f"constant {float(baseline):g}",
    )


def mask_share(explanation: Explanation, mask: np.ndarray) -> float:
    """Share of the explanation's positive weight that falls inside ``mask`` (HxW bool).

    Each superpixel's weight is spread evenly over its pixels, so a superpixel half inside the
    mask counts half. 0.0 when no superpixel has positive weight (nothing points at the lesion).
    """
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.shape != explanation.segments.shape:
        raise ValueError(f"mask shape {mask.shape} does not match the explanation's {explanation.segments.shape}")
    positive = np.clip(explanation.weights, 0, None)
    sizes = np.bincount(explanation.segments.ravel(), minlength=explanation.n_segments)
    per_pixel = (positive / np.maximum(sizes, 1))[explanation.segments]
    total = float(per_pixel.sum())
    return float(per_pixel[mask.astype(bool)].sum()) / total if total > 0 else 0.0
