"""Explanations: vectorised, batched LIME, overlays, and faithfulness scores.

The library speaks to models through a plain ``predict_fn`` (images N x H x W x C float in [0, 1] ->
probabilities N x K), so it works with any classifier; ``explain_with_classifier`` adapts ours.
"""

from meddiffuse.explain.batch import classifier_predict_fn, explain_batch, explain_with_classifier
from meddiffuse.explain.faithfulness import DeletionResult, baseline_image, deletion_curve, mask_share
from meddiffuse.explain.images import ImageInputError, as_float_image
from meddiffuse.explain.lime import Explanation, explain_image, fit_weighted_ridge, lime_sample_weights
from meddiffuse.explain.overlay import overlay_image, overlay_png
from meddiffuse.explain.perturb import (
    BatchCalibration,
    PredictFn,
    PredictionError,
    calibrate_batch_size,
    perturb,
    segment_means,
)
from meddiffuse.explain.segmentation import SegmentationConfig, compact_labels, segment_image

__all__ = [
    "BatchCalibration",
    "DeletionResult",
    "Explanation",
    "ImageInputError",
    "PredictFn",
    "PredictionError",
    "SegmentationConfig",
    "as_float_image",
    "baseline_image",
    "calibrate_batch_size",
    "classifier_predict_fn",
    "compact_labels",
    "deletion_curve",
    "explain_batch",
    "explain_image",
    "explain_with_classifier",
    "fit_weighted_ridge",
    "lime_sample_weights",
    "mask_share",
    "overlay_image",
    "overlay_png",
    "perturb",
    "segment_image",
    "segment_means",
]
