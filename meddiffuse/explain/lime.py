"""LIME for images, vectorised: the same estimator as ``lime_image``, built and predicted in batches.

As in ``lime_image.LimeImageExplainer`` (defaults): binary samples over superpixels with the first
sample all on; "off" superpixels take their own mean colour; sample weights sqrt(exp(-d^2 / w^2))
with d the cosine distance to the all-on sample and w = 0.25; one ridge regression (alpha 1, with
intercept) over all superpixels. Only the sampling and the batching differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meddiffuse.explain.images import ImageInputError, as_float_image
from meddiffuse.explain.perturb import (
    BATCH_CANDIDATES,
    BatchCalibration,
    PredictFn,
    predict_masks,
    segment_means,
)
from meddiffuse.explain.segmentation import SegmentationConfig, compact_labels, segment_image

KERNEL_WIDTH = 0.25  # lime_image's default
RIDGE_ALPHA = 1.0  # lime_base's default Ridge(alpha=1)


@dataclass
class Explanation:
    """One image's LIME explanation for one class."""

    label: int
    probability: float  # the model's probability for ``label`` on the unperturbed image
    probabilities: np.ndarray  # (K,) all class probabilities on the unperturbed image
    segments: np.ndarray  # (H, W) int32 superpixel labels 0..S-1
    weights: np.ndarray  # (S,) ridge coefficient of each superpixel for ``label``
    intercept: float
    score: float  # weighted R^2 of the local linear model
    local_prediction: float  # the linear model's prediction for the unperturbed image
    num_samples: int
    batch_size: int  # the batch size the samples were predicted at
    top_k: int = 5
    class_name: str | None = None
    seed: int = 0
    segmentation: dict[str, Any] | None = None  # the SegmentationConfig used, if any
    calibration: BatchCalibration | None = field(default=None, repr=False)

    @property
    def n_segments(self) -> int:
        return int(self.weights.shape[0])

    @property
    def top_segments(self) -> list[int]:
        """The ``top_k`` superpixels with the largest positive weight, strongest first."""
        return self.top(self.top_k)

    def top(self, k: int) -> list[int]:
        """Up to ``k`` superpixels with positive weight, strongest first (as lime's positive_only)."""
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        order = np.argsort(-self.weights, kind="stable")
        return [int(s) for s in order[:k] if self.weights[s] > 0]

    def top_mask(self, k: int | None = None) -> np.ndarray:
        """HxW bool mask of the top ``k`` (default ``top_k``) positive superpixels."""
        return np.isin(self.segments, self.top(k or self.top_k))

    def pixel_weights(self) -> np.ndarray:
        """HxW map: each pixel carries its superpixel's weight."""
        return self.weights[self.segments]

    def to_dict(self, include_segments: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "label": self.label,
            "class_name": self.class_name,
            "probability": self.probability,
            "probabilities": [float(p) for p in self.probabilities],
            "intercept": self.intercept,
            "score": self.score,
            "local_prediction": self.local_prediction,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "top_k": self.top_k,
            "top_segments": self.top_segments,
            "n_segments": self.n_segments,
            "weights": [float(w) for w in self.weights],
            "shape": list(self.segments.shape),
            "segmentation": self.segmentation,
        }
        if include_segments:
            out["segments"] = self.segments.tolist()
        return out

    def to_json(self, include_segments: bool = True, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(include_segments), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Explanation:
        if "segments" not in data:
            raise ValueError("cannot rebuild an Explanation saved without its segments")
        return cls(
            label=int(data["label"]),
            probability=float(data["probability"]),
            probabilities=np.asarray(data["probabilities"], dtype=np.float64),
            segments=np.asarray(data["segments"], dtype=np.int32),
            weights=np.asarray(data["weights"], dtype=np.float64),
            intercept=float(data["intercept"]),
            score=float(data["score"]),
            local_prediction=float(data["local_prediction"]),
            num_samples=int(data["num_samples"]),
            batch_size=int(data["batch_size"]),
            top_k=int(data["top_k"]),
            class_name=data.get("class_name"),
            seed=int(data.get("seed", 0)),
            segmentation=data.get("segmentation"),
        )

    @classmethod
    def from_json(cls, text: str) -> Explanation:
        return cls.from_dict(json.loads(text))


@dataclass
class LocalModel:
    coef: np.ndarray
    intercept: float
    score: float
    local_prediction: float


def lime_sample_weights(samples: np.ndarray, kernel_width: float = KERNEL_WIDTH) -> np.ndarray:
    """lime_image's weights: sqrt(exp(-d^2/w^2)), d = cosine distance of each 0/1 row to all-ones.

    For a row with k of S superpixels on, d = 1 - sqrt(k/S) (an all-off row has distance 1, as in
    scikit-learn's cosine distance).
    """
    on = samples.sum(axis=1, dtype=np.float64)
    distance = 1.0 - np.sqrt(on / samples.shape[1])
    return np.sqrt(np.exp(-(distance**2) / kernel_width**2))


def fit_weighted_ridge(
    x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray, alpha: float = RIDGE_ALPHA
) -> LocalModel:
    """Ridge with intercept and sample weights, closed form (what sklearn's Ridge solves).

    Centre by weighted means so the intercept is not penalised, then solve
    (Xc' W Xc + alpha I) b = Xc' W yc. Row 0 of ``x`` is the explained (all-on) sample.
    """
    x = x.astype(np.float64)
    w = sample_weight.astype(np.float64)
    x_mean = w @ x / w.sum()
    y_mean = float(w @ y / w.sum())
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ (xc * w[:, None]) + alpha * np.eye(x.shape[1])
    coef = np.linalg.solve(gram, xc.T @ (w * yc))
    intercept = y_mean - float(x_mean @ coef)
    fitted = x @ coef + intercept
    total = float(w @ (y - y_mean) ** 2)
    score = 1.0 - float(w @ (y - fitted) ** 2) / total if total > 0 else 0.0
    return LocalModel(coef=coef, intercept=intercept, score=score, local_prediction=float(fitted[0]))


def explain_image(
    predict_fn: PredictFn,
    image: np.ndarray,
    *,
    label: int | None = None,
    num_samples: int = 1000,
    segmentation: SegmentationConfig | None = None,
    top_k: int = 5,
    batch_size: int | None = None,
    seed: int = 0,
    segments: np.ndarray | None = None,
    hide_color: float | None = None,
    batch_candidates: tuple[int, ...] = BATCH_CANDIDATES,
    class_name: str | None = None,
) -> Explanation:
    """Explain ``predict_fn``'s prediction for ``image`` (HxW, HxWx1 or HxWx3; uint8 or float in [0, 1]).

    ``label`` None explains the predicted class. ``segments`` (an HxW label map) overrides
    ``segmentation``. ``batch_size`` None measures the fastest batch size on the first samples
    (recorded in the result, so a caller explaining many images can pass it on). ``hide_color``
    None fills switched-off superpixels with their mean colour, as lime_image does.
    """
    img = as_float_image(image)
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2, got {num_samples}")
    if top_k < 1:
        raise ValueError(f"top_k must be positive, got {top_k}")
    if segments is not None:
        segments = np.asarray(segments)
        if segments.shape != img.shape[:2]:
            raise ImageInputError(f"segments shape {segments.shape} does not match image {img.shape[:2]}")
        seg = compact_labels(segments)
        seg_config = None
    else:
        config = segmentation or SegmentationConfig()
        seg = segment_image(img, config)
        seg_config = config.model_dump()
    n_seg = int(seg.max()) + 1
    replacement = segment_means(img, seg) if hide_color is None else np.full_like(img, hide_color)

    rng = np.random.default_rng(seed)
    samples = rng.integers(0, 2, size=(num_samples, n_seg), dtype=np.uint8)
    samples[0] = 1  # the explained image itself

    probs, calibration = predict_masks(
        predict_fn, img, replacement, seg, samples, batch_size, batch_candidates
    )
    n_classes = probs.shape[1]
    if label is None:
        label = int(np.argmax(probs[0]))
    elif not 0 <= label < n_classes:
        raise ValueError(f"label {label} is out of range for a model with {n_classes} classes")

    model = fit_weighted_ridge(samples, probs[:, label], lime_sample_weights(samples))
    return Explanation(
        label=label,
        probability=float(probs[0, label]),
        probabilities=probs[0].copy(),
        segments=seg,
        weights=model.coef,
        intercept=model.intercept,
        score=model.score,
        local_prediction=model.local_prediction,
        num_samples=num_samples,
        batch_size=calibration.best if calibration else int(batch_size or 0),
        top_k=top_k,
        class_name=class_name,
        seed=seed,
        segmentation=seg_config,
        calibration=calibration,
    )
