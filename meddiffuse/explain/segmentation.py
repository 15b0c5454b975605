"""Superpixel segmentation for LIME, tuned for small (32-128 px) medical images.

SLIC is the default: it segments a 64 px image in milliseconds and finds a useful number of
superpixels, where LIME's default quickshift finds only ~6 at 96 px (and 1 at 32 px). Labels are always
returned as 0..S-1 so they can index a per-superpixel array directly.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field
from skimage.segmentation import felzenszwalb, quickshift, slic

from meddiffuse.explain.images import as_float_image


class SegmentationConfig(BaseModel):
    """How an image is cut into superpixels (the features LIME switches on and off)."""

    method: Literal["slic", "quickshift", "felzenszwalb"] = "slic"
    n_segments: int | None = Field(
        None, ge=2, le=2000, description="SLIC target count; None = 0.75 x side, clipped to [16, 100]."
    )
    compactness: float | None = Field(
        None, gt=0, description="SLIC shape regularity; None = 0.1 for grayscale, 10 for RGB (Lab)."
    )
    sigma: float = Field(0.5, ge=0, description="Gaussian pre-smoothing (SLIC, felzenszwalb).")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for the scikit-image function."
    )

    def target_segments(self, side: int) -> int:
        if self.n_segments is not None:
            return self.n_segments
        # LIME fits one weight per superpixel from ~1000 samples: enough superpixels to follow a small
        # lesion at 32-128 px, few enough that the fit stays well determined.
        return int(np.clip(round(0.75 * side), 16, 100))


def segment_image(image: np.ndarray, config: SegmentationConfig | None = None) -> np.ndarray:
    """HxW int32 superpixel labels 0..S-1 for an HxW(xC) image (uint8, or float in [0, 1])."""
    config = config or SegmentationConfig()
    img = as_float_image(image)
    gray = img.shape[2] == 1
    if config.method == "slic":
        compactness = config.compactness if config.compactness is not None else (0.1 if gray else 10.0)
        labels = slic(
            img[:, :, 0] if gray else img,
            n_segments=config.target_segments(min(img.shape[:2])),
            compactness=compactness,
            sigma=config.sigma,
            channel_axis=None if gray else -1,
            start_label=0,
            **config.params,
        )
    elif config.method == "quickshift":
        # quickshift needs three channels; these are LIME's defaults unless params override them
        params = {"kernel_size": 4, "max_dist": 200, "ratio": 0.2, **config.params}
        labels = quickshift(np.repeat(img, 3, axis=2) if gray else img, **params)
    else:
        params = {"scale": 100, "min_size": 10, **config.params}
        labels = felzenszwalb(img[:, :, 0] if gray else img, sigma=config.sigma,
                              channel_axis=None if gray else -1, **params)
    return compact_labels(labels)


def compact_labels(labels: np.ndarray) -> np.ndarray:
    """Relabel any integer label map to 0..S-1 (order of first label value preserved)."""
    if labels.ndim != 2:
        raise ValueError(f"a segmentation must be HxW, got shape {labels.shape}")
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape).astype(np.int32)
