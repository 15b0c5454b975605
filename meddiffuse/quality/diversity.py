"""Diversity: mean pairwise MS-SSIM inside a set of images (lower = more diverse).

MS-SSIM for small images. Wang et al. (2003) use 5 scales and an 11x11 Gaussian window (sigma 1.5),
which needs at least 161 px per side. Our images are 32-64 px, so:

* the window is 7x7 (sigma 1.5, truncated at ±3 px and renormalised), small enough to keep several
  scales yet still about 2 sigma wide;
* the number of scales is the largest (at most 5) whose coarsest image is still as large as the
  window: 32 px -> 3 scales (32, 16, 8), 64 px -> 4 scales, 128 px -> 5;
* the scale weights are the first weights of Wang et al., renormalised to sum to 1;
* SSIM maps are computed on the valid region only (no padding, as in the reference implementation),
  per channel, and averaged over channels; negative contrast-structure terms are clamped to 0 before
  the fractional powers (as ``pytorch_msssim`` does) so anti-correlated pairs count as dissimilar
  instead of producing NaN.

With one scale and an 11x11 window this is exactly scikit-image's Gaussian SSIM (tested).
"""

from __future__ import annotations

import math

import numpy as np

WANG_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
K1, K2 = 0.01, 0.03


def auto_scales(side: int, win_size: int = 7, max_scales: int = 5) -> int:
    """Most scales (<= max_scales) whose coarsest image side is still >= win_size."""
    if side < win_size:
        raise ValueError(f"images of {side} px are smaller than the {win_size}x{win_size} SSIM window")
    scales = 1
    while scales < max_scales and side // 2**scales >= win_size:
        scales += 1
    return scales


def _gaussian_window(win_size: int, sigma: float):
    """2-D Gaussian window (outer product of the normalised 1-D one), float32."""
    import torch

    ax = torch.arange(win_size, dtype=torch.float64) - (win_size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g).float()


def _as_nchw(images: np.ndarray, name: str):
    import torch

    arr = np.asarray(images)
    if arr.ndim == 2:
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"{name} must be HxW, HxWxC or NxHxWxC, got shape {np.asarray(images).shape}")
    # float32: ~1e-6 relative error against float64 SSIM, 4x faster convolutions on CPU
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(0, 3, 1, 2)


def _ssim_terms(x, y, window, data_range: float):
    """Per-image, per-channel mean SSIM and mean contrast-structure term over the valid region."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape
    # the five local statistics of every channel blurred in one grouped convolution
    maps = torch.stack([x, y, x * x, y * y, x * y], dim=1).reshape(n * 5 * c, 1, h, w)
    blurred = F.conv2d(maps, window[None, None]).reshape(n, 5, c, h - window.shape[0] + 1, -1)
    mx, my, exx, eyy, exy = blurred.unbind(dim=1)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    vx, vy, cxy = exx - mx * mx, eyy - my * my, exy - mx * my
    cs = (2 * cxy + c2) / (vx + vy + c2)
    luminance = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    return (luminance * cs).mean(dim=(2, 3)), cs.mean(dim=(2, 3))


def ms_ssim(
    a: np.ndarray,
    b: np.ndarray,
    *,
    data_range: float = 255.0,
    scales: int | None = None,
    win_size: int = 7,
    sigma: float = 1.5,
) -> np.ndarray:
    """MS-SSIM of image pairs ``a[i]``/``b[i]`` (N x H x W x C, or one HxW(xC) image each) -> (N,)."""
    import torch
    import torch.nn.functional as F

    x, y = _as_nchw(a, "a"), _as_nchw(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)} (NCHW)")
    if win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"win_size must be an odd number >= 3, got {win_size}")
    side = min(x.shape[2], x.shape[3])
    n_scales = scales if scales is not None else auto_scales(side, win_size)
    if not 1 <= n_scales <= len(WANG_WEIGHTS):
        raise ValueError(f"scales must be in 1..{len(WANG_WEIGHTS)}, got {n_scales}")
    if side // 2 ** (n_scales - 1) < win_size:
        raise ValueError(f"{side} px images are too small for {n_scales} scales with a {win_size} px window")
    weights = torch.tensor(WANG_WEIGHTS[:n_scales], dtype=torch.float32)
    weights = weights / weights.sum()
    window = _gaussian_window(win_size, sigma)
    factors = []
    with torch.no_grad():
        for level in range(n_scales):
            ssim, cs = _ssim_terms(x, y, window, data_range)
            last = level == n_scales - 1
            factors.append(torch.clamp(ssim if last else cs, min=0.0) ** weights[level])
            if not last:
                x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        per_channel = torch.stack(factors).prod(dim=0)  # N x C
    return per_channel.mean(dim=1).double().numpy()


def sample_pairs(n: int, max_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All distinct pairs if there are at most ``max_pairs``, else that many random ones (i != j)."""
    if n < 2:
        raise ValueError(f"need at least 2 images to form pairs, got {n}")
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    if math.comb(n, 2) <= max_pairs:
        i, j = np.triu_indices(n, k=1)
        return i, j
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, max_pairs)
    j = (i + rng.integers(1, n, max_pairs)) % n  # offset 1..n-1 never lands on i
    return i, j


def ms_ssim_diversity(
    images: np.ndarray,
    max_pairs: int = 1000,
    seed: int = 0,
    *,
    batch_size: int = 256,
    data_range: float = 255.0,
) -> float:
    """Mean MS-SSIM over distinct pairs of ``images`` (N x H x W x C). 1 = all identical."""
    arr = np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(f"images must be N x H x W x C, got shape {arr.shape}")
    i, j = sample_pairs(arr.shape[0], max_pairs, seed)
    scores = [
        ms_ssim(arr[i[s : s + batch_size]], arr[j[s : s + batch_size]], data_range=data_range)
        for s in range(0, len(i), batch_size)
    ]
    return float(np.concatenate(scores).mean())


__all__ = ["WANG_WEIGHTS", "auto_scales", "ms_ssim", "ms_ssim_diversity", "sample_pairs"]
