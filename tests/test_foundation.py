"""Config, domains, the object store contract, the Dataset contract, loaders and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from meddiffuse.cli import app
from meddiffuse.config import Settings
from meddiffuse.data.dataset import DatasetNotFound, DatasetWriter, Origin, list_datasets, open_dataset
from meddiffuse.data.loader import ManifestImageDataset, make_loader, match_channels, train_augmentation
from meddiffuse.data.phantoms import make_phantom, phantom_dataset
from meddiffuse.domains import UnknownClassError, UnknownDomainError, domain_from_folder, get_domain
from meddiffuse.store import LocalStore, ObjectNotFound, StoreError, create_store


def test_settings_env_and_defaults(monkeypatch, tmp_path):
    s = Settings()
    assert str(s.home) == ".meddiffuse" or s.home.name  # embedded default lives under ./.meddiffuse
    monkeypatch.setenv("MEDDIFFUSE_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("MEDDIFFUSE_INGEST__RESOLUTION", "48")
    monkeypatch.setenv("MEDDIFFUSE_S3__ACCESS_KEY", "s3cr3t-value")
    s = Settings()
    assert s.home == tmp_path / "h"
    assert s.ingest.resolution == 48
    assert s.s3.access_key.get_secret_value() == "s3cr3t-value" and "s3cr3t" not in repr(s.s3)
    assert s.store_uri == str(tmp_path / "h" / "store")
    assert s.resolved_tracking_uri.startswith("sqlite:///") and s.resolved_tracking_uri.endswith("mlflow.db")
    monkeypatch.setenv("MEDDIFFUSE_INGEST__TRAIN_FRACTION", "1.5")
    with pytest.raises(ValueError):
        Settings()


def test_domains_and_aliases(tmp_path):
    brain = get_domain("brain-mri")
    assert brain.classes == ["glioma", "meningioma", "notumor", "pituitary"] and brain.channels == 1
    assert brain.canonical_class("glioma_tumor") == "glioma"
    assert brain.canonical_class("no_tumor") == "notumor"
    al = get_domain("all")
    assert al.channels == 3
    assert [al.canonical_class(x) for x in ("Benign", "Early", "Pre", "Pro")] == al.classes
    covid = get_domain("covid-ct")
    assert covid.canonical_class("COVID") == "covid" and covid.canonical_class("non-COVID") == "non-covid"
    with pytest.raises(UnknownClassError, match="not a class"):
        brain.canonical_class("astrocytoma")
    with pytest.raises(UnknownDomainError, match="unknown domain"):
        get_domain("knee-xray")
    for c in ("cats", "dogs"):
        (tmp_path / "pets" / c).mkdir(parents=True)
    custom = domain_from_folder(tmp_path / "pets")
    assert custom.classes == ["cats", "dogs"] and custom.name == "pets"


def test_local_store_contract(tmp_path):
    s = LocalStore(tmp_path / "s")
    s.put("a/b/c.bin", b"123")
    s.put("a/b/d.bin", b"4")
    s.put("a/e.bin", b"5")
    assert s.get("a/b/c.bin") == b"123"
    assert s.exists("a/b/c.bin") and not s.exists("a/b/zz")
    assert s.list("a/b/") == ["a/b/c.bin", "a/b/d.bin"]
    assert s.list("a/") == ["a/b/c.bin", "a/b/d.bin", "a/e.bin"]
    assert s.list("nothing/") == []
    s.put("a/b/c.bin", b"new")  # overwrite is atomic replace
    assert s.get("a/b/c.bin") == b"new"
    s.delete("a/b/c.bin")
    s.delete("a/b/c.bin")  # idempotent
    with pytest.raises(ObjectNotFound):
        s.get("a/b/c.bin")
    assert s.delete_prefix("a/") == 2
    assert s.list("") == []
    s.put("f", b"1")
    with pytest.raises(StoreError, match="is an object"):
        s.put("f/g", b"2")
    s.put("d/e", b"3")
    with pytest.raises(StoreError, match="is a folder"):
        s.put("d", b"4")
    for bad in ("../x", "/abs", "a//b", "a/./b"):
        with pytest.raises(StoreError, match="invalid store key"):
            s.put(bad, b"")


def test_create_store_from_settings(settings):
    st = create_store(settings)
    assert isinstance(st, LocalStore) and st.root == (settings.home / "store").resolve()


def test_dataset_contract_and_id(store):
    dom = get_domain("covid-ct")
    w = DatasetWriter(store, "datasets/c", dom, 16)
    img = np.zeros((16, 16), np.uint8)
    w.add(img, "COVID", "train")  # alias accepted, stored canonical
    w.add(img + 1, "non-covid", "test", origin=Origin(kind="synthetic", generator="g", seed=3))
    with pytest.raises(ValueError, match="resolution"):
        w.add(np.zeros((8, 8), np.uint8), "covid", "train")
    with pytest.raises(DatasetNotFound):
        open_dataset(store, "datasets/c")  # nothing visible before the manifest
    ds = w.commit()
    assert list_datasets(store) == ["datasets/c"]
    again = open_dataset(store, "datasets/c")
    assert again.id == ds.id and len(again.manifest.entries) == 2
    assert again.manifest.entries[0].label == "covid"
    x, y = again.load_arrays("test")
    assert x.shape == (1, 16, 16, 1) and y.tolist() == [1]
    # rewriting with fewer images removes the orphans
    w2 = DatasetWriter(store, "datasets/c", dom, 16)
    w2.withdraw()
    w2.add(img, "covid", "train")
    ds2 = w2.commit()
    assert ds2.id != ds.id
    assert len([k for k in store.list("datasets/c/images/")]) == 1


def test_subset_copies_kept_images_and_masks_and_refuses_a_wrong_mask(store):
    src = phantom_dataset(store, "datasets/p", "covid-ct", n_per_class=3, resolution=16)
    keep = [i % 2 == 0 for i in range(len(src.manifest.entries))]
    sub = src.subset("datasets/p-even", keep, meta={"why": "test"})
    kept = [e for e, k in zip(src.manifest.entries, keep, strict=True) if k]
    assert [e.key for e in sub.manifest.entries] == sorted(e.key for e in kept)
    assert sub.manifest.meta["why"] == "test" and sub.domain.name == "covid-ct"
    for e in sub.manifest.entries:  # the bytes (and masks) are really there, not only listed
        assert np.array_equal(sub.load_image(e), src.load_image(e))
        if e.mask_key:
            assert np.array_equal(sub.load_mask(e), src.load_mask(e))
    with pytest.raises(ValueError, match="flags"):
        src.subset("datasets/p-bad", keep[:-1])
    assert not store.exists("datasets/p-bad/manifest.json")  # refused before anything was written


def test_phantoms_deterministic_with_masks():
    for name in ("brain-mri", "all", "covid-ct"):
        dom = get_domain(name)
        for cls in dom.classes:
            a, ma = make_phantom(dom, cls, 5, 48)
            b, mb = make_phantom(dom, cls, 5, 48)
            assert np.array_equal(a, b) and np.array_equal(ma, mb)
            assert a.dtype == np.uint8 and ma.shape == (48, 48)
            assert (a.ndim == 3) == (dom.channels == 3)
    _, m = make_phantom("brain-mri", "notumor", 1, 48)
    assert not m.any()
    _, m = make_phantom("covid-ct", "covid", 1, 64)
    assert m.any()


def test_torch_loader(store):
    ds = phantom_dataset(store, "datasets/p", "brain-mri", n_per_class=6, resolution=24, train_fraction=0.5)
    tds = ManifestImageDataset(ds, "train", channels=3, transform=train_augmentation(get_domain("brain-mri")))
    assert len(tds) == 12
    x, y = tds[0]
    assert x.shape == (3, 24, 24) and x.min() >= 0.0 and x.max() <= 1.0 and isinstance(y, int)
    loader = make_loader(tds, batch_size=5, shuffle=True, seed=0, balanced=True)
    xb, yb = next(iter(loader))
    assert xb.shape == (5, 3, 24, 24)
    test = ManifestImageDataset(ds, "test")
    assert len(test) == 12 and test[0][0].shape == (1, 24, 24)
    gray = match_channels(torch.rand(2, 3, 4, 4), 1)
    assert gray.shape == (2, 1, 4, 4)


runner = CliRunner()


def test_cli_help_everywhere():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    commands = [c.name for c in app.registered_commands]
    assert {"ingest", "phantom"} <= set(commands)
    for name in commands:
        r = runner.invoke(app, [name, "--help"])
        assert r.exit_code == 0, (name, r.output)
        assert "Usage" in r.output


def test_cli_phantom_then_ingest(settings, tmp_path):
    r = runner.invoke(app, ["phantom", "-d", "covid-ct", "--n", "6", "--size", "40", "--out", str(tmp_path / "ph")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["ingest", "-d", "covid-ct", "--data", str(tmp_path / "ph"), "--resolution", "32",
                            "--train-fraction", "0.5"])
    assert r.exit_code == 0, r.output
    assert "covid" in r.output and "non-covid" in r.output
    ds = open_dataset(create_store(Settings()), "datasets/covid-ct-real-32px")
    assert ds.manifest.counts()["train"] == {"covid": 3, "non-covid": 3}
    r = runner.invoke(app, ["ingest", "-d", "knee", "--data", str(tmp_path / "ph")])
    assert r.exit_code != 0 and "unknown domain" in r.output
    r = runner.invoke(app, ["ingest", "-d", "covid-ct", "--data", str(tmp_path / "missing")])
    assert r.exit_code != 0 and "does not exist" in r.output
