"""Sample grids for the report: generated images of a class beside real examples of the same class."""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from meddiffuse.data.dataset import Dataset
from meddiffuse.generate.errors import InvalidGeneratorRequest
from meddiffuse.generate.pipeline import DiffusionGenerator
from meddiffuse.generate.seeding import class_seeds
from meddiffuse.store.base import ObjectStore

GeneratedSource = DiffusionGenerator | Dataset | Mapping[str, np.ndarray]

_GAP = 4  # pixels between tiles
_HEADER = 14  # caption strip height


def sample_grid_png(
    generated: GeneratedSource,
    label_or_real: str | Dataset | None = None,
    per_class: int = 8,
    *,
    real_dataset: Dataset | None = None,
    label: str | None = None,
    columns: int = 8,
    min_tile: int = 64,
    seed: int = 0,
    **sample_kwargs,
) -> bytes:
    """PNG bytes: for one class (``label``) or every class (one band each), generated | real examples.

    ``generated`` is a DiffusionGenerator (sampled with the dataset seeds of ``seed``; ``sample_kwargs``
    go to ``sample``), a synthetic Dataset, or a mapping ``{class: (N, H, W, C) uint8}``. The second
    argument may name the class or give the real dataset: ``sample_grid_png(gen, real, 8)`` and
    ``sample_grid_png(gen, "glioma", real_dataset=real)`` both work. Small images are enlarged
    (nearest) to at least ``min_tile`` pixels so the report shows their texture.
    """
    if isinstance(label_or_real, Dataset):
        real_dataset = real_dataset or label_or_real
    elif label_or_real is not None:
        label = label_or_real
    if per_class <= 0:
        raise InvalidGeneratorRequest(f"per_class must be positive, got {per_class}")
    classes = _classes(generated)
    labels = [label] if label is not None else classes
    if isinstance(generated, DiffusionGenerator):  # accept aliases ("glioma_tumor")
        labels = [generated.domain.canonical_class(name) for name in labels]
    for name in labels:
        if name not in classes:
            raise InvalidGeneratorRequest(f"unknown class {name!r}; expected one of {classes}")
    fakes = _generated_images(generated, labels, per_class, seed, sample_kwargs)
    bands = []
    for name in labels:
        fake = fakes[name]
        res = fake.shape[1]
        panels = [(f"{name}: generated", fake)]
        if real_dataset is not None:
            panels.append((f"{name}: real", _real_images(real_dataset, name, per_class, res, fake.shape[3])))
        bands.append(_band(panels, columns, max(1, -(-min_tile // res))))
    return _encode(_stack(bands))


def write_sample_grids(
    store: ObjectStore,
    prefix: str,
    generated: GeneratedSource,
    real_dataset: Dataset | None = None,
    per_class: int = 8,
    **kwargs,
) -> dict[str, str]:
    """One grid PNG per class under ``<prefix>/<class>.png``; returns {class: key}."""
    keys = {}
    for name in _classes(generated):
        key = f"{prefix.rstrip('/')}/{name}.png"
        store.put(key, sample_grid_png(generated, name, per_class, real_dataset=real_dataset, **kwargs))
        keys[name] = key
    return keys


def _classes(generated: GeneratedSource) -> list[str]:
    if isinstance(generated, DiffusionGenerator | Dataset):
        return list(generated.classes)
    return list(generated)


def _generated_images(
    generated: GeneratedSource, labels: list[str], n: int, seed: int, kwargs: dict
) -> dict[str, np.ndarray]:
    if isinstance(generated, DiffusionGenerator):
        # one sampling call for all classes; a grid need not match dataset bits, so no batch padding
        indices = [generated.class_index(name) for name in labels]
        kwargs = {"batch_size": min(64, n * len(labels)), **kwargs}
        images = generated.sample([i for i in indices for _ in range(n)],
                                  [s for i in indices for s in class_seeds(seed, i, n)], **kwargs)
        return {name: images[k * n:(k + 1) * n] for k, name in enumerate(labels)}
    out = {}
    for name in labels:
        if isinstance(generated, Dataset):
            entries = sorted(generated.manifest.select(labels=[name]), key=lambda e: e.key)[:n]
            if not entries:
                raise InvalidGeneratorRequest(f"dataset {generated.prefix!r} has no {name!r} images")
            out[name] = generated.load_arrays(entries=entries)[0]
        else:
            images = np.asarray(generated[name])
            out[name] = (images[..., None] if images.ndim == 3 else images)[:n]
    return out


def _real_images(dataset: Dataset, label: str, n: int, res: int, channels: int) -> np.ndarray:
    # prefer held-out test images; fall back to train where a class has too few
    entries = dataset.manifest.select("test", [label]) + dataset.manifest.select("train", [label])
    images = dataset.load_arrays(entries=entries[:n])[0] if entries else np.zeros((0, res, res, channels), np.uint8)
    out = []
    for img in images:
        pil = _to_pil(img)
        if pil.size != (res, res):
            pil = pil.resize((res, res), Image.Resampling.BOX if pil.size[0] > res else Image.Resampling.BICUBIC)
        pil = pil.convert("L" if channels == 1 else "RGB")
        arr = np.asarray(pil)
        out.append(arr[..., None] if arr.ndim == 2 else arr)
    return np.stack(out) if out else np.zeros((0, res, res, channels), np.uint8)


def _to_pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


def _band(panels: list[tuple[str, np.ndarray]], columns: int, scale: int) -> Image.Image:
    """Panels side by side, each a captioned grid of tiles."""
    rendered = [_panel(title, images, columns, scale) for title, images in panels]
    width = sum(p.width for p in rendered) + _GAP * 2 * (len(rendered) - 1)
    height = max(p.height for p in rendered)
    band = Image.new("RGB", (width, height), "white")
    x = 0
    for panel in rendered:
        band.paste(panel, (x, 0))
        x += panel.width + _GAP * 2
    return band


def _panel(title: str, images: np.ndarray, columns: int, scale: int) -> Image.Image:
    n, res = max(len(images), 1), images.shape[1] * scale
    cols = min(columns, n)
    rows = -(-n // cols)
    panel = Image.new("RGB", (cols * (res + _GAP) - _GAP, _HEADER + rows * (res + _GAP)), "white")
    ImageDraw.Draw(panel).text((2, 1), title, fill="black", font=ImageFont.load_default())
    for i, img in enumerate(images):
        tile = _to_pil(img).convert("RGB").resize((res, res), Image.Resampling.NEAREST)
        panel.paste(tile, ((i % cols) * (res + _GAP), _HEADER + (i // cols) * (res + _GAP)))
    return panel


def _stack(bands: list[Image.Image]) -> Image.Image:
    width = max(b.width for b in bands)
    height = sum(b.height for b in bands) + _GAP * 2 * (len(bands) - 1)
    out = Image.new("RGB", (width, height), "white")
    y = 0
    for band in bands:
        out.paste(band, (0, y))
        y += band.height + _GAP * 2
    return out


def _encode(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
