"""S3Store against a real S3 server over HTTP (MinIO if installed, else moto in a subprocess)."""

from __future__ import annotations

import io
import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from meddiffuse.data.dataset import DatasetNotFound, DatasetWriter, list_datasets, open_dataset
from meddiffuse.data.phantoms import make_phantom, phantom_dataset
from meddiffuse.domains import get_domain
from meddiffuse.store import CorruptObject, LocalStore, ObjectNotFound, StoreError, create_store, sha256_hex
from meddiffuse.store.s3 import (
    InvalidStoreURI,
    S3Store,
    StoreAccessDenied,
    StoreUnavailable,
    parse_endpoint,
    parse_s3_uri,
)
from tests import s3server
from tests.s3server import S3Server, free_port

s3_server = s3server.s3_server  # the session's S3 server fixture

MiB = 1024 * 1024


@pytest.fixture
def s3_store(s3_server: S3Server) -> S3Store:
    """A store in a bucket of its own, under a prefix (the bucket does not exist yet)."""
    return S3Store(s3_server.new_bucket_name(), "runs/one", s3_server.config())


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path, s3_server: S3Server):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return S3Store(s3_server.new_bucket_name(), "pre", s3_server.config())


# -- the ObjectStore contract, identical for both stores ---------------------------------------------


def test_put_get_overwrite_exists(any_store):
    any_store.put("a/b.bin", b"\x00\x01first")
    assert any_store.get("a/b.bin") == b"\x00\x01first"
    any_store.put("a/b.bin", b"second")
    assert any_store.get("a/b.bin") == b"second"
    assert any_store.exists("a/b.bin")
    assert not any_store.exists("a/c.bin")
    assert not any_store.exists("a")  # a "folder" is not an object
    any_store.put("empty", b"")
    assert any_store.get("empty") == b""
    any_store.put_text("notes/é x+y.txt", "grüße ✓")
    assert any_store.get_text("notes/é x+y.txt") == "grüße ✓"


def test_missing_key_raises_object_not_found(any_store):
    with pytest.raises(ObjectNotFound, match="nope/x.png") as info:
        any_store.get("nope/x.png")
    assert isinstance(info.value, KeyError)  # callers may catch it as a KeyError too
    any_store.put("dir/x", b"1")
    with pytest.raises(ObjectNotFound):
        any_store.get("dir")


def test_list_is_sorted_and_filtered_by_prefix(any_store):
    keys = ["images/pro-b/2.png", "images/glioma/1.png", "images/glioma/0.png", "manifest.json", "imagesX"]
    for key in keys:
        any_store.put(key, key.encode())
    assert any_store.list() == sorted(keys)
    assert any_store.list("images/") == ["images/glioma/0.png", "images/glioma/1.png", "images/pro-b/2.png"]
    assert any_store.list("images/gl") == ["images/glioma/0.png", "images/glioma/1.png"]
    assert any_store.list("images") == sorted(k for k in keys if k.startswith("images"))
    assert any_store.list("absent/") == []


def test_delete_and_delete_prefix(any_store):
    for key in ["d/1", "d/2", "d/sub/3", "e/1"]:
        any_store.put(key, b"x")
    any_store.delete("d/1")
    any_store.delete("d/1")  # deleting a missing key is not an error
    assert not any_store.exists("d/1")
    assert any_store.delete_prefix("d/") == 2
    assert any_store.list() == ["e/1"]
    assert any_store.delete_prefix("d/") == 0


@pytest.mark.parametrize("bad_key", ["", "/abs", "a//b", "../up", "a/./b", "a\\b"])
def test_invalid_keys_are_refused(any_store, bad_key):
    with pytest.raises(StoreError, match="invalid store key"):
        any_store.put(bad_key, b"x")
    with pytest.raises(StoreError, match="invalid store key"):
        any_store.get(bad_key)
    assert any_store.list() == []


# no key is also a folder of another: a local folder cannot hold a file "a" and a folder "a/" at once
_keys = st.sampled_from(["a.txt", "a/b", "a/c", "ab/x", "images/g/1.png", "images/g/2.png", "images/p/1.png"])
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), _keys, st.binary(max_size=64)),
        st.tuples(st.just("delete"), _keys, st.none()),
        st.tuples(st.just("delete_prefix"), st.sampled_from(["a", "a/", "images/", "images/g"]), st.none()),
    ),
    max_size=8,
)


@hypothesis_settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops)
def test_random_operation_sequences_leave_both_stores_equal(s3_server, ops):
    with tempfile.TemporaryDirectory() as tmp:
        stores = [LocalStore(tmp), S3Store(s3_server.new_bucket_name(), "p", s3_server.config())]
        for op, key, data in ops:
            for store in stores:
                if op == "put" and key == "a" and store.list("a/"):
                    continue  # a folder cannot also be a file locally; S3 allows it (not part of the contract)
                if op == "put" and key.startswith("a/") and store.exists("a"):
                    continue
                getattr(store, op)(*([key, data] if op == "put" else [key]))
        local, s3 = stores
        assert s3.list() == local.list()
        for prefix in ("a", "a/", "images/g"):
            assert s3.list(prefix) == local.list(prefix)
        for key in local.list():
            assert s3.get(key) == local.get(key)


# -- datasets move to S3 with no other change -------------------------------------------------------


def test_phantom_dataset_round_trips_identically(tmp_path, s3_store):
    local = LocalStore(tmp_path / "local")
    written_local = phantom_dataset(local, "datasets/brain", "brain-mri", n_per_class=3, resolution=32)
    written_s3 = phantom_dataset(s3_store, "datasets/brain", "brain-mri", n_per_class=3, resolution=32)

    reopened = open_dataset(s3_store, "datasets/brain")
    assert reopened.id == written_s3.id == written_local.id
    assert list_datasets(s3_store) == ["datasets/brain"]
    assert s3_store.list("datasets/") == local.list("datasets/")
    for key in local.list("datasets/"):
        assert s3_store.get(key) == local.get(key)
    images_s3, labels_s3 = reopened.load_arrays("train")
    images_local, labels_local = written_local.load_arrays("train")
    assert (images_s3 == images_local).all() and (labels_s3 == labels_local).all()


def test_settings_alone_move_the_store_to_s3(s3_server, settings, monkeypatch):
    """MEDDIFFUSE_STORE=s3://... plus MEDDIFFUSE_S3__* and nothing else changes."""
    from meddiffuse.config import Settings

    bucket = s3_server.new_bucket_name()
    monkeypatch.setenv("MEDDIFFUSE_STORE", f"s3://{bucket}/team/a")
    monkeypatch.setenv("MEDDIFFUSE_S3__ENDPOINT", s3_server.url)  # a URL works as well as host:port
    monkeypatch.setenv("MEDDIFFUSE_S3__ACCESS_KEY", s3_server.access_key)
    monkeypatch.setenv("MEDDIFFUSE_S3__SECRET_KEY", s3_server.secret_key)
    store = create_store(Settings())
    assert isinstance(store, S3Store) and store.uri == f"s3://{bucket}/team/a"
    dataset = phantom_dataset(store, "datasets/all", "all", n_per_class=2, resolution=16)

    raw_names = [o.object_name for o in s3_server.raw_client().list_objects(bucket, recursive=True)]
    assert "team/a/datasets/all/manifest.json" in raw_names
    assert len(raw_names) == len(store.list())
    assert open_dataset(create_store(Settings()), "datasets/all").id == dataset.id


def test_aws_variables_are_a_credentials_fallback(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    store = S3Store(s3_server.new_bucket_name(), "", s3_server.config(access_key="", secret_key=""))
    store.put("k", b"v")
    assert store.get("k") == b"v"


def test_interrupted_dataset_write_leaves_no_dataset(s3_store):
    domain = get_domain("brain-mri")
    writer = DatasetWriter(s3_store, "datasets/half", domain, resolution=32)
    with pytest.raises(RuntimeError, match="interrupted"):
        for i, label in enumerate(domain.classes):
            img, _ = make_phantom(domain, label, i, 32)
            writer.add(img, label, "train")
        raise RuntimeError("interrupted before commit")
    assert s3_store.list("datasets/half/images/")  # the images did reach the bucket ...
    with pytest.raises(DatasetNotFound):  # ... but without a manifest there is no dataset
        open_dataset(s3_store, "datasets/half")
    assert list_datasets(s3_store) == []


def test_killed_rewrite_hides_the_dataset_and_a_rerun_restores_it(s3_server, s3_store):
    first = phantom_dataset(s3_store, "datasets/brain", "brain-mri", n_per_class=2, resolution=32)
    # a re-run in another process, SIGKILLed after some images and before its manifest (no cleanup runs)
    script = textwrap.dedent(
        """
        import os, signal
        from meddiffuse.data.dataset import DatasetWriter
        from meddiffuse.data.phantoms import make_phantom
        from meddiffuse.domains import get_domain
        from meddiffuse.store import create_store

        store = create_store()
        domain = get_domain("brain-mri")
        writer = DatasetWriter(store, "datasets/brain", domain, resolution=32)
        writer.withdraw()
        for i in range(3):
            img, _ = make_phantom(domain, "glioma", 100 + i, 32)
            writer.add(img, "glioma", "train")
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = os.environ | {
        "MEDDIFFUSE_STORE": s3_store.uri,
        "MEDDIFFUSE_S3__ENDPOINT": s3_server.endpoint,
        "MEDDIFFUSE_S3__ACCESS_KEY": s3_server.access_key,
        "MEDDIFFUSE_S3__SECRET_KEY": s3_server.secret_key,
    }
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert len(s3_store.list("datasets/brain/images/")) > len(first.manifest.entries)  # its stray images
    with pytest.raises(DatasetNotFound):
        open_dataset(s3_store, "datasets/brain")

    again = phantom_dataset(s3_store, "datasets/brain", "brain-mri", n_per_class=2, resolution=32)
    assert again.id == first.id
    named = {f"datasets/brain/{k}" for e in again.manifest.entries for k in (e.key, e.mask_key) if k}
    assert set(s3_store.list("datasets/brain/")) == named | {"datasets/brain/manifest.json"}


# -- large objects, integrity, failures --------------------------------------------------------------


def test_multipart_object_round_trips(s3_server):
    store = S3Store(s3_server.new_bucket_name(), "", s3_server.config(part_size=5 * MiB))
    data = os.urandom(12 * MiB)
    store.put("checkpoints/big.safetensors", data)
    assert store.get("checkpoints/big.safetensors") == data
    stat = s3_server.raw_client().stat_object(store.bucket, "checkpoints/big.safetensors")
    assert stat.etag.endswith("-3")  # S3 marks a multipart object's ETag with its part count
    assert stat.size == len(data)


def test_small_object_is_uploaded_in_one_part(s3_server):
    store = S3Store(s3_server.new_bucket_name(), "", s3_server.config(part_size=5 * MiB))
    store.put("small", b"x" * 1000)
    assert "-" not in s3_server.raw_client().stat_object(store.bucket, "small").etag


def test_corrupted_object_is_detected(s3_server, s3_store):
    s3_store.put("datasets/x/manifest.json", b'{"entries": []}')
    raw = s3_server.raw_client()
    name = "runs/one/datasets/x/manifest.json"
    recorded = raw.stat_object(s3_store.bucket, name).metadata["x-amz-meta-sha256"]
    assert recorded == sha256_hex(b'{"entries": []}')
    # behind the store's back: new bytes, old hash (as a bit flip on disk would leave it)
    evil = b'{"entries": [1]}'
    raw.put_object(s3_store.bucket, name, io.BytesIO(evil), len(evil), metadata={"sha256": recorded})
    with pytest.raises(CorruptObject, match="datasets/x/manifest.json"):
        s3_store.get("datasets/x/manifest.json")
    with pytest.raises(CorruptObject):
        open_dataset(s3_store, "datasets/x")


def test_objects_written_by_other_tools_without_hash_are_readable(s3_server, s3_store):
    s3_store.put("seed", b"make the bucket")
    raw = s3_server.raw_client()
    raw.put_object(s3_store.bucket, "runs/one/uploaded.png", io.BytesIO(b"png"), 3)
    assert s3_store.get("uploaded.png") == b"png"


def test_wrong_credentials_fail_clearly_without_retrying(s3_server, caplog):
    config = s3_server.config(access_key="not-a-key", secret_key="not-a-secret", retries=3)
    store = S3Store(s3_server.new_bucket_name(), "", config)
    with caplog.at_level(logging.WARNING, logger="meddiffuse.store.s3"), pytest.raises(StoreAccessDenied) as info:
        store.put("k", b"v")
    assert "MEDDIFFUSE_S3__ACCESS_KEY" in str(info.value)
    assert "not-a-secret" not in str(info.value)
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]

    wrong_secret = S3Store(store.bucket, "", s3_server.config(secret_key="wrong-secret"))
    with pytest.raises(StoreAccessDenied, match="SignatureDoesNotMatch|AccessDenied"):
        wrong_secret.get("k")


def test_unreachable_server_fails_after_bounded_retries(caplog):
    from meddiffuse.config import S3Config

    port = free_port()  # closed: nothing listens there
    config = S3Config(endpoint=f"127.0.0.1:{port}", access_key="a", secret_key="b", retries=2,
                      backoff_s=0.01, timeout_s=2.0)
    store = S3Store("some-bucket", "", config)
    with caplog.at_level(logging.WARNING, logger="meddiffuse.store.s3"), pytest.raises(StoreUnavailable) as info:
        store.get("k")
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "3 attempt(s)" in message
    assert "MEDDIFFUSE_S3__ENDPOINT" in message
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2


def test_store_survives_pickling(s3_store):
    s3_store.put("a", b"1")
    clone = pickle.loads(pickle.dumps(s3_store))
    assert clone.uri == s3_store.uri and clone.get("a") == b"1"


# -- parsing -----------------------------------------------------------------------------------------


def test_uri_and_endpoint_parsing():
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    assert parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_endpoint("minio:9000", False) == ("minio:9000", False)
    assert parse_endpoint("https://minio.example.org", False) == ("minio.example.org", True)
    assert parse_endpoint("http://127.0.0.1:9000/", True) == ("127.0.0.1:9000", False)


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("s3://", "no bucket"),
        ("s3://ab/x", "3 to 63"),
        ("s3://Upper_Case/x", "invalid bucket name"),
        ("s3://bucket/a/../b", "invalid prefix"),
        ("gs://bucket", "not an S3 store URI"),
    ],
)
def test_bad_uris_are_refused_before_any_request(uri, problem):
    with pytest.raises(InvalidStoreURI, match=problem):
        parse_s3_uri(uri)


def test_bad_endpoint_and_half_credentials_are_refused(monkeypatch):
    from meddiffuse.config import S3Config

    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)

    with pytest.raises(InvalidStoreURI, match="must not have a path"):
        S3Store("bucket", "", S3Config(endpoint="http://minio:9000/bucket"))
    with pytest.raises(StoreAccessDenied, match="secret key is missing"):
        S3Store("bucket", "", S3Config(access_key="only-access"))
