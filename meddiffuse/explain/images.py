"""Validation of the images handed to the explainer: one place that says what an image may be."""

from __future__ import annotations

import numpy as np


class ImageInputError(ValueError):
    """An image the explainer cannot use (wrong shape, dtype or value range)."""


MIN_SIDE = 8


def as_float_image(image: np.ndarray) -> np.ndarray:
    """An HxWxC float32 copy in [0, 1] of an HxW / HxWx1 / HxWx3 image (uint8, or float in [0, 1]).

    Raises ImageInputError naming what is wrong, so a caller never gets a confusing failure deep
    inside segmentation or the model.
    """
    if not isinstance(image, np.ndarray):
        raise ImageInputError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ImageInputError(
            f"image must be HxW, HxWx1 or HxWx3, got shape {image.shape}"
        )
    if min(image.shape[:2]) < MIN_SIDE:
        raise ImageInputError(f"image is {image.shape[1]}x{image.shape[0]} px; need at least {MIN_SIDE} px")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if not np.issubdtype(image.dtype, np.floating):
        raise ImageInputError(f"image must be uint8 or float in [0, 1], got dtype {image.dtype}")
    if not np.isfinite(image).all():
        raise ImageInputError("image holds NaN or infinite values")
    lo, hi = float(image.min()), float(image.max())
    if lo < 0.0 or hi > 1.0:
        raise ImageInputError(f"float images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
    return image.astype(np.float32, copy=True)
