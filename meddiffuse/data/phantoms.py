"""Procedural phantom datasets shaped like the study's three domains, with lesion masks.

They exist so the demo and the tests run offline with no patient data, and so explanations can be
checked against ground truth: every image comes with the mask of what makes its class. Contrast,
size and position are drawn from ranges that overlap between hard and easy cases, so a small CNN
learns them well above chance but not perfectly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from meddiffuse.data.dataset import Dataset, DatasetWriter
from meddiffuse.domains import Domain, get_domain
from meddiffuse.store.base import ObjectStore

PhantomFn = Callable[[str, np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ax = (np.arange(size) + 0.5) / size * 2 - 1  # [-1, 1]
    return np.meshgrid(ax, ax, indexing="xy")


def _texture(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    t = gaussian_filter(rng.standard_normal((size, size)), sigma * size / 64)
    return t / (t.std() + 1e-8)


def _blob(x, y, cx, cy, rx, ry, rng: np.random.Generator, irregular: float, size: int) -> np.ndarray:
    """A (possibly lobulated) ellipse mask."""
    ang = np.arctan2(y - cy, x - cx)
    wobble = np.zeros_like(ang)
    if irregular > 0:
        for k in (2, 3, 5):
            wobble += irregular / k * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
    r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return r < 1 + wobble


def brain_slice(label: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = _grid(size)
    cx, cy = rng.normal(0, 0.03, 2)
    ax_, ay_ = rng.uniform(0.62, 0.75), rng.uniform(0.75, 0.88)
    head_r = np.sqrt(((x - cx) / ax_) ** 2 + ((y - cy) / ay_) ** 2)
    brain = head_r < 0.9
    img = np.zeros((size, size))
    img[(head_r < 1.0) & ~brain] = 0.85  # skull/scalp ring
    img[brain] = 0.45 + 0.06 * _texture(rng, size, 2.0)[brain]
    # grey/white matter folds and ventricles are shared by all classes (the non-informative anatomy)
    folds = _texture(rng, size, 1.0)
    img[brain] += 0.05 * np.tanh(folds[brain])
    for side in (-1, 1):
        v = _blob(x, y, cx + side * 0.1, cy - 0.05, 0.06, 0.18, rng, 0.1, size)
        img[v & brain] = 0.15
    mask = np.zeros((size, size), bool)
    contrast = rng.uniform(0.18, 0.4)
    if label == "glioma":  # intra-axial, irregular, heterogeneous, ring-like, anywhere in a hemisphere
        side = rng.choice([-1, 1])
        lx, ly = cx + side * rng.uniform(0.2, 0.4), cy + rng.uniform(-0.4, 0.3)
        r = rng.uniform(0.12, 0.22)
        mask = _blob(x, y, lx, ly, r, r * rng.uniform(0.7, 1.3), rng, 0.35, size) & brain
        core = _blob(x, y, lx, ly, r * 0.5, r * 0.5, rng, 0.3, size)
        img[mask] += contrast + 0.08 * _texture(rng, size, 0.7)[mask]
        img[mask & core] -= contrast * 1.2  # necrotic core
    elif label == "meningioma":  # extra-axial: round, homogeneous, touching the skull
        ang = rng.uniform(0, 2 * np.pi)
        r = rng.uniform(0.1, 0.17)
        lx, ly = cx + (0.62 - r * 0.6) * np.cos(ang), cy + (0.78 - r * 0.6) * np.sin(ang)
        mask = _blob(x, y, lx, ly, r, r, rng, 0.05, size) & brain
        img[mask] += contrast * 1.1
    elif label == "pituitary":  # small, midline, low (sella turcica)
        r = rng.uniform(0.08, 0.13)
        lx, ly = cx + rng.normal(0, 0.03), cy + rng.uniform(0.3, 0.45)
        mask = _blob(x, y, lx, ly, r * 1.2, r, rng, 0.1, size) & brain
        img[mask] += contrast * 1.2
    elif label != "notumor":
        raise ValueError(f"unknown brain-mri class {label!r}")
    img += rng.normal(0, 0.03, img.shape)  # scanner noise
    img = gaussian_filter(img, 0.5 * size / 64)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), mask


_NUCLEUS = {  # (radius range, irregularity, chromatin texture, nucleoli, colour darkness)
    "benign": ((0.08, 0.11), 0.03, 0.2, 0, 1.0),
    "early-pre-b": ((0.11, 0.15), 0.08, 0.45, 0, 0.85),
    "pre-b": ((0.12, 0.16), 0.10, 0.5, 2, 0.8),
    "pro-b": ((0.13, 0.18), 0.30, 0.6, 1, 0.75),
}


def blood_smear(label: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    if label not in _NUCLEUS:
        raise ValueError(f"unknown all class {label!r}")
    x, y = _grid(size)
    bg = np.array([0.93, 0.85, 0.88]) + rng.normal(0, 0.02, 3)
    img = np.ones((size, size, 3)) * bg
    # red blood cells: pale discs with a lighter centre, class-independent clutter
    for _ in range(rng.integers(6, 12)):
        px, py, r = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.08, 0.13)
        d = np.sqrt((x - px) ** 2 + (y - py) ** 2) / r
        rbc = d < 1
        img[rbc] = img[rbc] * 0.6 + np.array([0.88, 0.55, 0.6]) * 0.4
        img[d < 0.4] = img[d < 0.4] * 0.7 + bg * 0.3
    (rmin, rmax), irregular, chroma, nucleoli, dark = _NUCLEUS[label]
    mask = np.zeros((size, size), bool)
    n_cells = rng.integers(1, 3)
    for _ in range(n_cells):
        px, py = rng.uniform(-0.45, 0.45, 2)
        r = rng.uniform(rmin, rmax) * rng.uniform(0.9, 1.1)
        cyto = _blob(x, y, px, py, r * 1.35, r * 1.3, rng, 0.05, size)
        img[cyto] = np.array([0.72, 0.72, 0.9]) + rng.normal(0, 0.02, 3)
        nuc = _blob(x, y, px + rng.normal(0, r * 0.1), py, r, r * rng.uniform(0.85, 1.0), rng, irregular, size)
        tex = _texture(rng, size, 0.5)
        base = np.array([0.35, 0.15, 0.5]) * dark + rng.normal(0, 0.03, 3)
        img[nuc] = base + chroma * 0.08 * tex[nuc, None]
        for _ in range(nucleoli):
            ox, oy = rng.uniform(-0.4, 0.4, 2) * r
            hole = np.sqrt((x - px - ox) ** 2 + (y - py - oy) ** 2) < r * 0.22
            img[hole & nuc] = base * 1.6
        mask |= nuc
    img += rng.normal(0, 0.025, img.shape)
    img = gaussian_filter(img, (0.6 * size / 64, 0.6 * size / 64, 0))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), mask


def lung_slice(label: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    if label not in ("covid", "non-covid"):
        raise ValueError(f"unknown covid-ct class {label!r}")
    x, y = _grid(size)
    cy = rng.normal(0, 0.03)
    body = ((x / rng.uniform(0.85, 0.95)) ** 2 + ((y - cy) / rng.uniform(0.6, 0.7)) ** 2) < 1
    img = np.zeros((size, size))
    img[body] = 0.6 + 0.03 * _texture(rng, size, 2.0)[body]
    lungs = np.zeros_like(body)
    for side in (-1, 1):
        lungs |= _blob(x, y, side * 0.38, cy - 0.03, rng.uniform(0.26, 0.32), rng.uniform(0.4, 0.48),
                       rng, 0.08, size)
    img[lungs] = 0.12
    # vessels: small bright dots in both classes
    vessels = np.zeros_like(lungs)
    for _ in range(rng.integers(10, 25)):
        px, py = rng.uniform(-0.7, 0.7), cy + rng.uniform(-0.45, 0.45)
        vessels |= np.sqrt((x - px) ** 2 + (y - py) ** 2) < rng.uniform(0.012, 0.03)
    img[vessels & lungs] = 0.45
    mask = np.zeros((size, size), bool)
    if label == "covid":  # peripheral ground-glass opacities: hazy, partly transparent patches
        for _ in range(rng.integers(1, 4)):
            side = rng.choice([-1, 1])
            px = side * rng.uniform(0.45, 0.6)
            py = cy + rng.uniform(-0.35, 0.35)
            r = rng.uniform(0.11, 0.2)
            patch = _blob(x, y, px, py, r, r * rng.uniform(0.7, 1.3), rng, 0.3, size) & lungs
            haze = np.clip(0.5 + 0.5 * _texture(rng, size, 1.0), 0, 1)
            img[patch] += rng.uniform(0.15, 0.35) * (0.4 + 0.6 * haze[patch])
            mask |= patch
    img += rng.normal(0, 0.03, img.shape)
    img = gaussian_filter(img, 0.5 * size / 64)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), mask


PHANTOMS: dict[str, PhantomFn] = {"brain-mri": brain_slice, "all": blood_smear, "covid-ct": lung_slice}


def make_phantom(domain: Domain | str, label: str, seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """One phantom image (HxW or HxWx3 uint8) and its lesion mask (HxW bool)."""
    domain = get_domain(domain) if isinstance(domain, str) else domain
    if domain.name not in PHANTOMS:
        raise ValueError(f"no phantom for domain {domain.name!r}; phantoms exist for {sorted(PHANTOMS)}")
    label = domain.canonical_class(label)
    rng = np.random.default_rng([seed, domain.classes.index(label)])
    return PHANTOMS[domain.name](label, rng, size)


def write_phantom_folder(
    domain: Domain | str,
    out_dir: str | Path,
    n_per_class: int,
    size: int = 64,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write an ImageFolder (``<class>/<name>.png``) with each mask beside its image (``<name>.mask.png``)."""
    domain = get_domain(domain) if isinstance(domain, str) else domain
    if n_per_class <= 0:
        raise ValueError("n must be positive")
    out = Path(out_dir)
    for label in domain.classes:
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img, mask = make_phantom(domain, label, seed * 1_000_003 + i, size)
            stem = f"{label}-{seed}-{i:05d}"
            Image.fromarray(img).save(folder / f"{stem}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{stem}.mask.png")
            if progress:
                progress(1)
    return out


def phantom_dataset(
    store: ObjectStore,
    prefix: str,
    domain: Domain | str,
    n_per_class: int,
    resolution: int = 32,
    train_fraction: float = 0.5,
    seed: int = 0,
) -> Dataset:
    """A committed phantom Dataset written straight to the store (tests and examples; no folder step)."""
    domain = get_domain(domain) if isinstance(domain, str) else domain
    writer = DatasetWriter(store, prefix, domain, resolution)
    writer.withdraw()
    n_train = max(1, round(n_per_class * train_fraction))
    for label in domain.classes:
        for i in range(n_per_class):
            img, mask = make_phantom(domain, label, seed * 1_000_003 + i, resolution)
            split = "train" if i < n_train else "test"
            writer.add(img, label, split, mask=mask, source=f"phantom/{label}/{i}",
                       key=f"images/{label}/{label}-{seed}-{i:05d}.png")
    return writer.commit(meta={"phantom": True, "seed": seed, "train_fraction": train_fraction})
