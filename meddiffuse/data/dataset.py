"""The Dataset contract: PNG images plus a ``manifest.json`` written last, inside one store prefix.

A dataset without a manifest does not exist. Its id is the hash of its manifest, so the same input
always yields the same id. Re-writing a prefix first withdraws the old manifest, then writes the new
images and manifest, then removes images the new manifest no longer names: a re-run replaces a
dataset, it never duplicates one, and a killed writer leaves nothing visible.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from meddiffuse.domains import Domain
from meddiffuse.store.base import ObjectNotFound, ObjectStore, sha256_hex

MANIFEST = "manifest.json"
FORMAT_VERSION = 1

Split = Literal["train", "test"]
# What a classifier was trained on: real only (TRTR), synthetic only (TSTR), or both. The one vocabulary.
TrainData = Literal["real", "synthetic", "mixed"]
TRAIN_DATA_ORIGINS: tuple[str, ...] = ("real", "synthetic", "mixed")


class DatasetNotFound(FileNotFoundError):
    """No committed manifest at the prefix (the dataset does not exist, or its writer never finished)."""


class Origin(BaseModel):
    """Where an image came from: a real file, or a generator with everything needed to regenerate it."""

    kind: Literal["real", "synthetic"] = "real"
    generator: str | None = None  # model URI/version, e.g. models:/meddiffuse-generator-brain-mri/3
    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None


class Entry(BaseModel):
    key: str = Field(description="Object key relative to the dataset prefix.")
    sha256: str = Field(description="SHA-256 of the stored PNG bytes.")
    label: str
    split: Split
    origin: Origin = Origin()
    mask_key: str | None = Field(None, description="Lesion mask PNG (phantoms), relative key.")
    source: str | None = Field(None, description="Original file, relative to the ingested folder.")
    source_sha256: str | None = Field(None, description="SHA-256 of the original file's bytes.")


class Manifest(BaseModel):
    format_version: int = FORMAT_VERSION
    name: str
    domain: str
    classes: list[str]
    channels: int
    resolution: int
    entries: list[Entry]
    meta: dict[str, Any] = Field(default_factory=dict)

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @property
    def dataset_id(self) -> str:
        return sha256_hex(self.canonical_json().encode())[:16]

    def select(self, split: Split | None = None, labels: Iterable[str] | None = None) -> list[Entry]:
        wanted = set(labels) if labels is not None else None
        return [
            e
            for e in self.entries
            if (split is None or e.split == split) and (wanted is None or e.label in wanted)
        ]

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {class: n}} with every class present (zeros included), in class order."""
        out: dict[str, dict[str, int]] = {}
        for split in ("train", "test"):
            c = Counter(e.label for e in self.entries if e.split == split)
            if c or split == "train":
                out[split] = {cls: c.get(cls, 0) for cls in self.classes}
        return out


def encode_png(image: np.ndarray | Image.Image) -> bytes:
    """Deterministic PNG bytes for an HxW or HxWxC uint8 image."""
    if isinstance(image, np.ndarray):
        arr = np.ascontiguousarray(image)
        if arr.dtype != np.uint8:
            raise TypeError(f"images must be uint8, got {arr.dtype}")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        image = Image.fromarray(arr)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes, channels: int) -> np.ndarray:
    """HxWxC uint8 array with the requested number of channels."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        arr = np.asarray(im, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


class Dataset:
    """A committed dataset: a store, a prefix and its manifest."""

    def __init__(self, store: ObjectStore, prefix: str, manifest: Manifest) -> None:
        self.store = store
        self.prefix = prefix.rstrip("/")
        self.manifest = manifest

    @property
    def id(self) -> str:
        return self.manifest.dataset_id

    @property
    def classes(self) -> list[str]:
        return self.manifest.classes

    @property
    def domain(self) -> Domain:
        """The registered domain, or one rebuilt from the manifest (custom ImageFolder domains)."""
        from meddiffuse.domains import UnknownDomainError, get_domain

        m = self.manifest
        try:
            return get_domain(m.domain)
        except UnknownDomainError:
            return Domain(name=m.domain, classes=m.classes, channels=m.channels)

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}"

    def read_bytes(self, entry: Entry) -> bytes:
        return self.store.get(self.key(entry.key))

    def load_image(self, entry: Entry) -> np.ndarray:
        return decode_png(self.read_bytes(entry), self.manifest.channels)

    def load_mask(self, entry: Entry) -> np.ndarray | None:
        if entry.mask_key is None:
            return None
        return decode_png(self.store.get(self.key(entry.mask_key)), 1)[:, :, 0] > 127

    def load_arrays(
        self, split: Split | None = None, entries: list[Entry] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(N x H x W x C uint8 images, N int64 class indices) for a split or explicit entries."""
        entries = entries if entries is not None else self.manifest.select(split)
        index = {c: i for i, c in enumerate(self.classes)}
        res, ch = self.manifest.resolution, self.manifest.channels
        images = np.zeros((len(entries), res, res, ch), dtype=np.uint8)
        for i, e in enumerate(entries):
            images[i] = self.load_image(e)
        labels = np.array([index[e.label] for e in entries], dtype=np.int64)
        return images, labels

    def subset(self, prefix: str, keep: Sequence[bool], meta: dict[str, Any] | None = None) -> Dataset:
        """A new dataset at ``prefix`` (same store) holding the entries where ``keep`` is true.

        Objects are copied, then the manifest is committed; the source's ``meta`` is kept, updated by ``meta``.
        """
        entries = self.manifest.entries
        if len(keep) != len(entries):
            raise ValueError(f"keep has {len(keep)} flags for {len(entries)} entries of {self.prefix!r}")
        writer = DatasetWriter(self.store, prefix, self.domain, self.manifest.resolution)
        writer.withdraw()
        for entry, k in zip(entries, keep, strict=True):
            if k:
                for rel in (entry.key, entry.mask_key):
                    if rel is not None:
                        self.store.put(f"{writer.prefix}/{rel}", self.store.get(self.key(rel)))
                writer.add_entry(entry)
        return writer.commit(meta=self.manifest.meta | (meta or {}))

    def __repr__(self) -> str:
        return f"Dataset({self.prefix!r}, id={self.id}, n={len(self.manifest.entries)})"


def dataset_exists(store: ObjectStore, prefix: str) -> bool:
    return store.exists(f"{prefix.rstrip('/')}/{MANIFEST}")


def open_dataset(store: ObjectStore, prefix: str) -> Dataset:
    prefix = prefix.rstrip("/")
    try:
        raw = store.get(f"{prefix}/{MANIFEST}")
    except ObjectNotFound:
        raise DatasetNotFound(
            f"no dataset at {prefix!r} in {store.uri} (no manifest: never written, or its writer was "
            "interrupted before committing)"
        ) from None
    return Dataset(store, prefix, Manifest.model_validate_json(raw))


def list_datasets(store: ObjectStore, prefix: str = "datasets/") -> list[str]:
    return [k[: -len(MANIFEST) - 1] for k in store.list(prefix) if k.endswith(f"/{MANIFEST}")]


class DatasetWriter:
    """Writes images, then commits a manifest. Use ``withdraw()`` before ``add`` when replacing."""

    def __init__(
        self,
        store: ObjectStore,
        prefix: str,
        domain: Domain,
        resolution: int,
        name: str | None = None,
    ) -> None:
        self.store = store
        self.prefix = prefix.rstrip("/")
        self.domain = domain
        self.resolution = resolution
        self.name = name or self.prefix.rsplit("/", 1)[-1]
        self.entries: list[Entry] = []
        self._keys: set[str] = set()

    def withdraw(self) -> None:
        """Make any existing dataset at the prefix invisible before it is rewritten."""
        self.store.delete(f"{self.prefix}/{MANIFEST}")

    def add(
        self,
        image: np.ndarray,
        label: str,
        split: Split,
        origin: Origin | None = None,
        mask: np.ndarray | None = None,
        source: str | None = None,
        source_sha256: str | None = None,
        key: str | None = None,
    ) -> Entry:
        label = self.domain.canonical_class(label)
        if image.shape[0] != self.resolution or image.shape[1] != self.resolution:
            raise ValueError(
                f"image is {image.shape[1]}x{image.shape[0]}, dataset resolution is {self.resolution}"
            )
        data = encode_png(image)
        digest = sha256_hex(data)
        key = key or f"images/{label}/{digest[:16]}.png"
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r} in dataset {self.prefix!r}")
        self.store.put(f"{self.prefix}/{key}", data)
        mask_key = None
        if mask is not None:
            mask_key = key.replace("images/", "masks/", 1)
            self.store.put(f"{self.prefix}/{mask_key}", encode_png(mask.astype(np.uint8) * 255))
        entry = Entry(
            key=key,
            sha256=digest,
            label=label,
            split=split,
            origin=origin or Origin(),
            mask_key=mask_key,
            source=source,
            source_sha256=source_sha256,
        )
        self._keys.add(key)
        self.entries.append(entry)
        return entry

    def add_entry(self, entry: Entry) -> None:
        """Record an object already in the store (e.g. written by a resumed shard)."""
        if entry.key in self._keys:
            raise ValueError(f"duplicate key {entry.key!r}")
        self._keys.add(entry.key)
        self.entries.append(entry)

    def commit(self, meta: dict[str, Any] | None = None, sort: bool = True) -> Dataset:
        """Write the manifest (the commit point), then delete objects the manifest does not name."""
        entries = sorted(self.entries, key=lambda e: e.key) if sort else list(self.entries)
        manifest = Manifest(
            name=self.name,
            domain=self.domain.name,
            classes=list(self.domain.classes),
            channels=self.domain.channels,
            resolution=self.resolution,
            entries=entries,
            meta=meta or {},
        )
        self.store.put(f"{self.prefix}/{MANIFEST}", manifest.canonical_json().encode())
        keep = {f"{self.prefix}/{MANIFEST}"}
        for e in entries:
            keep.add(f"{self.prefix}/{e.key}")
            if e.mask_key:
                keep.add(f"{self.prefix}/{e.mask_key}")
        for key in self.store.list(f"{self.prefix}/"):
            if key not in keep and (key.startswith(f"{self.prefix}/images/") or
                                    key.startswith(f"{self.prefix}/masks/")):
                self.store.delete(key)
        return Dataset(self.store, self.prefix, manifest)



def train_data_of(datasets: Iterable[Dataset]) -> TrainData:
    """``real``, ``synthetic`` or ``mixed``: what a classifier trained on these datasets' images saw."""
    kinds = {e.origin.kind for ds in datasets for e in ds.manifest.entries}
    if kinds == {"real"}:
        return "real"
    if kinds == {"synthetic"}:
        return "synthetic"
    if kinds == {"real", "synthetic"}:
        return "mixed"
    raise ValueError("no images in the given datasets")
