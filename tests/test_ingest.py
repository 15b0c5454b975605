"""Ingestion of messy image folders into Datasets."""

from __future__ import annotations

import io
import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from meddiffuse.data.dataset import DatasetNotFound, DatasetWriter, open_dataset
from meddiffuse.data.ingest import ImageRejected, ingest_folder, load_image_file
from meddiffuse.data.phantoms import write_phantom_folder
from meddiffuse.domains import get_domain
from tests.conftest import shared_data

BRAIN = get_domain("brain-mri")


def _png(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, **kw).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(side: int = 20_000) -> bytes:
    """A tiny file that claims a huge image: a valid PNG header with a compressed all-zero body."""
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    body = zlib.compress(row * side, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


@pytest.fixture
def messy_folder(tmp_path: Path) -> tuple[Path, set[str], dict[str, str]]:
    """A brain-mri folder with good files of every kind and bad files with known reasons."""
    rng = np.random.default_rng(0)
    root = tmp_path / "raw"
    good: set[str] = set()
    bad: dict[str, str] = {}

    def put(rel: str, data: bytes, is_good: bool, reason: str = "") -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        (good.add(rel) if is_good else bad.__setitem__(rel, reason))

    def noise(h: int, w: int, c: int | None = None) -> np.ndarray:
        shape = (h, w) if c is None else (h, w, c)
        return rng.integers(0, 256, shape, dtype=np.uint8)

    # good files, in the public datasets' own folder spellings
    put("glioma_tumor/a.png", _png(noise(80, 100)), True)
    put("glioma_tumor/rgb.jpg", (lambda b: (Image.fromarray(noise(90, 70, 3)).save(b, "JPEG"), b.getvalue())[1])(
        io.BytesIO()), True)
    put("no_tumor/rgba.png", _png(noise(64, 64, 4), mode="RGBA"), True)
    put("no_tumor/lying.jpg", _png(noise(70, 70)), True)  # PNG content, .jpg name
    arr16 = np.tile(np.linspace(100, 4000, 72), (72, 1)).astype(np.uint16)  # 12-bit gradient
    put("meningioma_tumor/sixteen.png", _png(arr16), True)
    pal = Image.fromarray(noise(66, 66, 3)).convert("P", palette=Image.Palette.ADAPTIVE)
    b = io.BytesIO()
    pal.save(b, "PNG")
    put("meningioma_tumor/palette.png", b.getvalue(), True)
    b = io.BytesIO()
    Image.fromarray(noise(64, 64)).save(b, "BMP")
    put("pituitary_tumor/x.bmp", b.getvalue(), True)
    b = io.BytesIO()
    Image.fromarray(noise(64, 64)).save(b, "TIFF")
    put("pituitary_tumor/y.tif", b.getvalue(), True)
    # bad files
    put("glioma_tumor/empty.png", b"", False, "empty file")
    put("glioma_tumor/notes.txt", b"radiologist notes, not an image", False, "not an image")
    full = _png(noise(64, 64))
    put("no_tumor/truncated.png", full[: len(full) // 2], False, "truncated")
    corrupt = bytearray(_png(noise(64, 64)))
    corrupt[60:80] = b"\xff" * 20
    put("no_tumor/corrupt.png", bytes(corrupt), False, "corrupt")
    put("pituitary_tumor/bomb.png", _bomb_png(), False, "decompression bomb")
    put("loose.png", _png(noise(64, 64)), False, "not inside a class folder")
    put("astrocytoma/z.png", _png(noise(64, 64)), False, "not a class")
    return root, good, bad


def test_messy_folder_every_good_file_in_every_bad_file_reported(messy_folder, store):
    root, good, bad = messy_folder
    ds, report = ingest_folder(root, BRAIN, store, "datasets/messy", resolution=32, train_fraction=0.5)
    sources = {e.source for e in ds.manifest.entries}
    assert sources == good
    skipped = {s.path: s.reason for s in report.skipped}
    assert set(skipped) == set(bad)
    for path, expected in bad.items():
        assert expected.split()[0] in skipped[path].lower() or expected in skipped[path].lower(), (path, skipped[path])
    notes = {n.path: n.reason for n in report.notes}
    assert "PNG" in notes["no_tumor/lying.jpg"]
    assert "RGBA" in notes["no_tumor/rgba.png"]
    # converted to the domain's channels and resolution
    for e in ds.manifest.entries:
        img = ds.load_image(e)
        assert img.shape == (32, 32, 1)
    # 16-bit image was windowed onto the full 8-bit range, not clipped to white
    e16 = next(e for e in ds.manifest.entries if e.source.endswith("sixteen.png"))
    img16 = ds.load_image(e16)
    assert img16.max() > 240 and img16.min() < 15
    assert {e.label for e in ds.manifest.entries} == set(BRAIN.classes)
    stored = json.loads(store.get_text("datasets/messy/ingest-report.json"))
    assert len(stored["skipped"]) == len(bad)


def test_huge_image_refused_before_decoding():
    bomb = _bomb_png(12_000)  # 144 megapixels claimed
    with pytest.raises(ImageRejected, match="megapixels|bomb"):
        load_image_file(bomb, 1, 32, max_pixels=100_000_000)


def test_same_input_same_dataset_id_and_split(tmp_path, store):
    write_phantom_folder("brain-mri", tmp_path / "ph", 10, size=48)
    a, _ = ingest_folder(tmp_path / "ph", BRAIN, store, "datasets/a", resolution=32)
    b, _ = ingest_folder(tmp_path / "ph", BRAIN, store, "datasets/a", resolution=32)
    assert a.id == b.id
    assert [(e.key, e.split) for e in a.manifest.entries] == [(e.key, e.split) for e in b.manifest.entries]
    # a different seed gives a different split of the same images
    c, _ = ingest_folder(tmp_path / "ph", BRAIN, store, "datasets/c", resolution=32, seed=1)
    assert c.id != a.id
    assert {e.key for e in c.manifest.entries} == {e.key for e in a.manifest.entries}


def test_split_proportions_per_class(tmp_path, store):
    write_phantom_folder("covid-ct", tmp_path / "ph", 25, size=40)
    ds, _ = ingest_folder(tmp_path / "ph", get_domain("covid-ct"), store, "datasets/p", resolution=32,
                          train_fraction=0.2)
    counts = ds.manifest.counts()
    for cls in ("covid", "non-covid"):
        assert counts["train"][cls] == 5 and counts["test"][cls] == 20
    ds2, _ = ingest_folder(tmp_path / "ph", get_domain("covid-ct"), store, "datasets/p2", resolution=32,
                           train_fraction=0.6)
    assert ds2.manifest.counts()["train"]["covid"] == 15


def test_masks_travel_with_images(tmp_path, store):
    write_phantom_folder("brain-mri", tmp_path / "ph", 3, size=64)
    ds, report = ingest_folder(tmp_path / "ph", BRAIN, store, "datasets/m", resolution=32)
    assert not report.skipped  # mask files are attachments, not images
    assert len(ds.manifest.entries) == 12
    glioma = [e for e in ds.manifest.entries if e.label == "glioma"]
    assert all(e.mask_key for e in glioma)
    assert any(ds.load_mask(e).any() for e in glioma)
    notumor = [e for e in ds.manifest.entries if e.label == "notumor"]
    assert not any(ds.load_mask(e).any() for e in notumor)


def test_duplicates_never_straddle_splits(tmp_path, store):
    root = tmp_path / "dups"
    rng = np.random.default_rng(1)
    for cls in ("glioma", "notumor"):
        (root / cls).mkdir(parents=True)
        for i in range(10):
            data = _png(rng.integers(0, 256, (40, 40), dtype=np.uint8))
            (root / cls / f"{i}.png").write_bytes(data)
            (root / cls / f"{i}-copy.png").write_bytes(data)  # exact byte duplicate
    # same pixels in another container (BMP) and a cross-class copy (mislabelled)
    Image.open(root / "glioma" / "0.png").save(root / "glioma" / "0-as.bmp")
    shutil.copy(root / "glioma" / "1.png", root / "notumor" / "from-glioma.png")
    ds, report = ingest_folder(root, BRAIN, store, "datasets/d", resolution=32, train_fraction=0.5)
    assert len(ds.manifest.entries) == 20
    assert len(report.duplicates) == 22
    shas = [e.sha256 for e in ds.manifest.entries]
    assert len(shas) == len(set(shas))
    train = {e.sha256 for e in ds.manifest.select("train")}
    test = {e.sha256 for e in ds.manifest.select("test")}
    assert not train & test
    conflict = next(d for d in report.duplicates if d.path == "notumor/from-glioma.png")
    assert "different label" in conflict.reason


def test_killed_ingest_leaves_no_visible_dataset(tmp_path, store):
    write_phantom_folder("brain-mri", tmp_path / "ph", 4, size=40)

    class Killed(Exception):
        pass

    def die(done: int, total: int) -> None:
        if done == 7:
            raise Killed

    with pytest.raises(Killed):
        ingest_folder(tmp_path / "ph", BRAIN, store, "datasets/k", resolution=32, progress=die)
    with pytest.raises(DatasetNotFound):
        open_dataset(store, "datasets/k")
    # an earlier committed dataset is withdrawn before being rewritten: a writer killed mid-way
    # leaves no manifest pointing at half the images
    ds, _ = ingest_folder(tmp_path / "ph", BRAIN, store, "datasets/k", resolution=32)
    w = DatasetWriter(store, "datasets/k", BRAIN, 32)
    w.withdraw()
    with pytest.raises(DatasetNotFound):
        open_dataset(store, "datasets/k")
    ds2, _ = ingest_folder(tmp_path / "ph", BRAIN, store, "datasets/k", resolution=32)
    assert ds2.id == ds.id


def test_empty_or_missing_folder_clear_errors(tmp_path, store):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ingest_folder(tmp_path / "nope", BRAIN, store, "datasets/x")
    (tmp_path / "empty" / "glioma").mkdir(parents=True)
    with pytest.raises(ValueError, match="no usable images"):
        ingest_folder(tmp_path / "empty", BRAIN, store, "datasets/x")


@pytest.mark.parametrize("domain", ["brain-mri", "all", "covid-ct"])
def test_real_raw_files_ingest(domain, store):
    root = shared_data(domain, "raw")
    dom = get_domain(domain)
    files = [p for p in root.rglob("*") if p.is_file()]
    ds, report = ingest_folder(root, dom, store, f"datasets/raw-{domain}", resolution=64, train_fraction=0.25)
    assert not report.skipped, report.skipped
    assert len(ds.manifest.entries) + len(report.duplicates) == len(files)
    assert set(ds.manifest.counts()["train"]) == set(dom.classes)
    for e in ds.manifest.entries[:5]:
        assert ds.load_image(e).shape == (64, 64, dom.channels)
