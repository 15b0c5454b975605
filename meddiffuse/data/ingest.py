"""Ingest a folder of raw images into a real Dataset: validate, deduplicate, convert, split, commit.

Every file is checked before it can reach the dataset. Bad files (corrupt, truncated, zero-byte, not an
image, too large, a decompression bomb) are skipped and listed with the reason; nothing crashes the run.
Exact duplicates are removed before the split, so no image can sit in both train and test.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, Field

from meddiffuse.data.dataset import Dataset, DatasetWriter, Origin, Split, encode_png
from meddiffuse.domains import Domain, UnknownClassError
from meddiffuse.store.base import ObjectStore, sha256_hex

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".ppm"}
MASK_SUFFIX = ".mask.png"
REPORT_KEY = "ingest-report.json"

SplitMode = Literal["stratified", "train", "test"]


class ImageRejected(ValueError):
    """A file cannot become a dataset image; the message is the reason shown in the ingest report."""


class Skipped(BaseModel):
    path: str
    reason: str


class Duplicate(BaseModel):
    path: str
    duplicate_of: str
    reason: str = "identical content"


class IngestReport(BaseModel):
    domain: str
    source: str
    resolution: int
    train_fraction: float
    seed: int
    dataset_prefix: str
    dataset_id: str = ""
    counts: dict[str, dict[str, int]] = Field(default_factory=dict)
    skipped: list[Skipped] = Field(default_factory=list)
    duplicates: list[Duplicate] = Field(default_factory=list)
    notes: list[Skipped] = Field(default_factory=list, description="accepted files with a remark")

    @property
    def n_images(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())


class _Item(BaseModel):
    rel: str
    label: str
    file_sha: str
    image: bytes  # processed PNG
    pixel_sha: str
    mask: bytes | None = None


def _to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit integer and float images: stretch the used range onto 0..255 (windowing by min/max)."""
    arr = np.asarray(im).astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")


def _normalise_mode(im: Image.Image, channels: int) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        im = _to_8bit(im)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        # transparent background -> black, as in the scanners' own exports
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("L" if channels == 1 else "RGB")


def centre_square(im: Image.Image, resolution: int, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side))
    if side != resolution:
        # reducing_gap: fast box pre-shrink for large originals, exact bicubic for the last step
        gap = 3.0 if side > 3 * resolution else None
        im = im.resize((resolution, resolution), resample, reducing_gap=gap)
    return im


def load_image_file(
    data: bytes, channels: int, resolution: int, max_pixels: int, name: str = ""
) -> tuple[np.ndarray, list[str]]:
    """Decode and convert one file's bytes; raise ImageRejected with the reason when it is not usable."""
    notes: list[str] = []
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"decompression bomb refused: {exc}") from None
    except Image.DecompressionBombWarning as exc:
        raise ImageRejected(f"decompression bomb refused: {exc}") from None
    except UnidentifiedImageError:
        raise ImageRejected("not an image (unrecognised format)") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a reason, not a crash
        raise ImageRejected(f"unreadable: {type(exc).__name__}: {exc}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise ImageRejected(
            f"too large: {w}x{h} = {w * h / 1e6:.0f} megapixels exceeds the limit of "
            f"{max_pixels / 1e6:.0f} (MEDDIFFUSE_INGEST__MAX_PIXELS); refused before decoding"
        )
    if w < 8 or h < 8:
        raise ImageRejected(f"too small: {w}x{h}")
    suffix = Path(name).suffix.lower().lstrip(".")
    fmt = (im.format or "").lower()
    aliases = {"jpg": "jpeg", "tif": "tiff", "jpeg": "jpeg", "png": "png", "bmp": "bmp", "tiff": "tiff"}
    if suffix and fmt and aliases.get(suffix, suffix) != fmt:
        notes.append(f"extension .{suffix} but content is {fmt.upper()}")
    if im.mode not in ("L", "RGB"):
        notes.append(f"converted from mode {im.mode}")
    try:
        im.load()  # full decode: catches truncated and corrupt data
        im = ImageOps.exif_transpose(im) or im
        im = _normalise_mode(im, channels)
        im = centre_square(im, resolution)
    except Exception as exc:  # noqa: BLE001
        raise ImageRejected(f"corrupt or truncated: {type(exc).__name__}: {exc}") from None
    arr = np.asarray(im, dtype=np.uint8)
    return arr, notes


def _scan(root: Path, domain: Domain, report: IngestReport) -> dict[str, list[tuple[Path, str]]]:
    """Files per canonical class; unknown folders and loose files go to the report."""
    by_class: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    for path in sorted(root.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        rel = path.relative_to(root).as_posix()
        if path.name.endswith(MASK_SUFFIX):
            continue  # attached to its image below
        if len(path.relative_to(root).parts) < 2:
            report.skipped.append(Skipped(path=rel, reason="not inside a class folder"))
            continue
        folder = path.relative_to(root).parts[0]
        try:
            label = domain.canonical_class(folder)
        except UnknownClassError as exc:
            report.skipped.append(Skipped(path=rel, reason=str(exc)))
            continue
        by_class[label].append((path, rel))
    return by_class


def _duplicate(rel: str, label: str, first: tuple[str, str], what: str) -> Duplicate:
    """A duplicate of the first file seen; one under another class is flagged as possibly mislabelled."""
    first_rel, first_label = first
    reason = what if first_label == label else (
        f"{what} with a different label ({first_label} vs {label}): possibly mislabelled"
    )
    return Duplicate(path=rel, duplicate_of=first_rel, reason=reason)


def _split_order(file_sha: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{file_sha}".encode()).hexdigest()


def ingest_folder(
    root: str | Path,
    domain: Domain,
    store: ObjectStore,
    prefix: str,
    *,
    resolution: int = 64,
    train_fraction: float = 0.2,
    seed: int = 0,
    max_pixels: int = 50_000_000,
    split_mode: SplitMode = "stratified",
    exclude_sha256: set[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Dataset, IngestReport]:
    """Validate, convert and split an ImageFolder into a committed Dataset at ``prefix``.

    ``split_mode="test"`` puts every image in the test split (a separate test folder); ``exclude_sha256``
    drops images whose pixels or file bytes match images already used elsewhere (e.g. training).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    report = IngestReport(
        domain=domain.name, source=str(root), resolution=resolution, train_fraction=train_fraction,
        seed=seed, dataset_prefix=prefix,
    )
    by_class = _scan(root, domain, report)
    total = sum(len(v) for v in by_class.values())
    done = 0
    seen_file: dict[str, tuple[str, str]] = {}
    seen_pixels: dict[str, tuple[str, str]] = {}
    items: dict[str, list[_Item]] = defaultdict(list)
    exclude = exclude_sha256 or set()
    for label in domain.classes:
        for path, rel in by_class.get(label, []):
            done += 1
            if progress:
                progress(done, total)
            try:
                data = path.read_bytes()
            except OSError as exc:
                report.skipped.append(Skipped(path=rel, reason=f"cannot read: {exc}"))
                continue
            file_sha = sha256_hex(data)
            if file_sha in seen_file:
                report.duplicates.append(_duplicate(rel, label, seen_file[file_sha], "identical content"))
                continue
            seen_file[file_sha] = (rel, label)
            try:
                arr, notes = load_image_file(data, domain.channels, resolution, max_pixels, path.name)
            except ImageRejected as exc:
                report.skipped.append(Skipped(path=rel, reason=str(exc)))
                continue
            png = encode_png(arr)
            pixel_sha = sha256_hex(png)
            if file_sha in exclude or pixel_sha in exclude:
                report.duplicates.append(
                    Duplicate(path=rel, duplicate_of="(excluded set)", reason="already used for training")
                )
                continue
            if pixel_sha in seen_pixels:
                report.duplicates.append(_duplicate(rel, label, seen_pixels[pixel_sha], "identical pixels"))
                continue
            seen_pixels[pixel_sha] = (rel, label)
            for note in notes:
                report.notes.append(Skipped(path=rel, reason=note))
            mask_bytes = None
            mask_path = path.with_name(path.name.rsplit(".", 1)[0] + MASK_SUFFIX)
            if mask_path.is_file():
                with Image.open(mask_path) as m:
                    mask = centre_square(m.convert("L"), resolution, Image.Resampling.NEAREST)
                mask_bytes = encode_png(np.asarray(mask))
            items[label].append(
                _Item(rel=rel, label=label, file_sha=file_sha, image=png, pixel_sha=pixel_sha, mask=mask_bytes)
            )
    if not any(items.values()):
        raise ValueError(
            f"no usable images found in {root}: expected class folders {domain.classes}; "
            f"{len(report.skipped)} file(s) skipped"
        )

    writer = DatasetWriter(store, prefix, domain, resolution)
    writer.withdraw()
    for label in domain.classes:
        cls_items = sorted(items.get(label, []), key=lambda it: _split_order(it.file_sha, seed))
        n = len(cls_items)
        if split_mode == "stratified":
            n_train = round(n * train_fraction)
            if n >= 2:
                n_train = min(max(n_train, 1), n - 1)  # both splits see every class
        else:
            n_train = n if split_mode == "train" else 0
        for i, it in enumerate(cls_items):
            split: Split = "train" if i < n_train else "test"
            key = f"images/{label}/{it.pixel_sha[:16]}.png"
            _put_item(writer, it, split, key)
    meta = {
        "source": "ingest",
        "resolution": resolution,
        "train_fraction": train_fraction,
        "seed": seed,
        "split_mode": split_mode,
        "skipped": len(report.skipped),
        "duplicates": len(report.duplicates),
    }
    dataset = writer.commit(meta=meta)
    report.dataset_id = dataset.id
    report.counts = dataset.manifest.counts()
    # the report sits beside the manifest; it is informational, the manifest stays the commit point
    store.put_text(f"{prefix.rstrip('/')}/{REPORT_KEY}", report.model_dump_json(indent=2))
    return dataset, report


def _put_item(writer: DatasetWriter, it: _Item, split: Split, key: str) -> None:
    from meddiffuse.data.dataset import Entry

    writer.store.put(f"{writer.prefix}/{key}", it.image)
    mask_key = None
    if it.mask is not None:
        mask_key = key.replace("images/", "masks/", 1)
        writer.store.put(f"{writer.prefix}/{mask_key}", it.mask)
    writer.add_entry(
        Entry(key=key, sha256=it.pixel_sha, label=it.label, split=split, origin=Origin(kind="real"),
              mask_key=mask_key, source=it.rel, source_sha256=it.file_sha)
    )


def default_prefix(domain: Domain, resolution: int, name: str | None = None) -> str:
    return f"datasets/{name or f'{domain.name}-real-{resolution}px'}"
