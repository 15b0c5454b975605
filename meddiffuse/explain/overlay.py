"""Overlay PNG: the image with its top superpixels tinted and outlined."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from skimage.segmentation import find_boundaries

from meddiffuse.explain.images import ImageInputError, as_float_image
from meddiffuse.explain.lime import Explanation

POSITIVE_TINT = np.array([0.1, 0.9, 0.2])
OUTLINE = np.array([1.0, 0.9, 0.0])


def overlay_image(
    image: np.ndarray, explanation: Explanation, top_k: int | None = None, scale: int = 1, alpha: float = 0.45
) -> np.ndarray:
    """(H*scale, W*scale, 3) uint8: the top ``top_k`` positive superpixels tinted green and outlined.

    ``scale`` enlarges by pixel repetition before outlining, so outlines stay one pixel wide on the
    small images this project uses.
    """
    img = as_float_image(image)
    if img.shape[:2] != explanation.segments.shape:
        raise ImageInputError(
            f"image is {img.shape[:2]} but the explanation's segments are {explanation.segments.shape}"
        )
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    rgb = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img
    mask = explanation.top_mask(top_k)
    if scale > 1:
        rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
        mask = mask.repeat(scale, axis=0).repeat(scale, axis=1)
    out = rgb.copy()
    out[mask] = (1 - alpha) * rgb[mask] + alpha * POSITIVE_TINT
    out[find_boundaries(mask, mode="inner")] = OUTLINE
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def overlay_png(
    image: np.ndarray, explanation: Explanation, top_k: int | None = None, scale: int = 1, alpha: float = 0.45
) -> bytes:
    """PNG bytes of :func:`overlay_image`; ``top_k`` None uses the explanation's own ``top_k``."""
    buf = io.BytesIO()
    Image.fromarray(overlay_image(image, explanation, top_k, scale, alpha)).save(buf, format="PNG")
    return buf.getvalue()
