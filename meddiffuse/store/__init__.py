"""Object stores (local folder, S3/MinIO) and the MLflow tracking/registry helpers."""

from __future__ import annotations

from meddiffuse.config import Settings
from meddiffuse.store.base import (
    CorruptObject,
    ObjectNotFound,
    ObjectStore,
    StoreError,
    sha256_hex,
)
from meddiffuse.store.local import LocalStore

__all__ = [
    "CorruptObject",
    "LocalStore",
    "ObjectNotFound",
    "ObjectStore",
    "StoreError",
    "create_store",
    "sha256_hex",
]


def create_store(settings: Settings | None = None, uri: str | None = None) -> ObjectStore:
    """The store named by ``uri`` (or ``settings.store_uri``): a folder path or ``s3://bucket/prefix``."""
    settings = settings or Settings()
    uri = uri or settings.store_uri
    if uri.startswith("s3://"):
        from meddiffuse.store.s3 import S3Store  # local: the minio client is only needed for S3

        return S3Store.from_uri(uri, settings.s3)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return LocalStore(uri)
