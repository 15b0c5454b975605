"""Object store in an S3 bucket (MinIO, AWS, anything S3-compatible) through the ``minio`` client.

``MEDDIFFUSE_STORE=s3://bucket/prefix`` plus the ``MEDDIFFUSE_S3__*`` settings (endpoint, keys,
region, TLS) move every artifact here with no other change. Beyond the ``ObjectStore`` contract:

* every object carries the SHA-256 of its bytes in its user metadata; ``get`` re-hashes and raises
  ``CorruptObject`` on a mismatch (objects written by other tools, without the hash, are read as-is);
* objects above ``part_size`` are uploaded in parts (minio aborts a failed multipart upload, and S3
  shows an object only once complete, so a reader never sees half an object);
* transient failures (connection refused or reset, timeouts, 5xx, SlowDown) are retried
  ``retries`` times with doubling back-off, then raise ``StoreUnavailable``; wrong credentials raise
  ``StoreAccessDenied`` at once, since retrying cannot fix them;
* the bucket is created on first use if it is missing.
"""

from __future__ import annotations

import io
import logging
import mimetypes
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError

from meddiffuse.config import S3Config
from meddiffuse.store.base import (
    CorruptObject,
    ObjectNotFound,
    ObjectStore,
    StoreError,
    check_key,
    sha256_hex,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: User-metadata field holding the SHA-256 of an object's bytes (header ``x-amz-meta-sha256``).
SHA256_METADATA = "sha256"
_SHA256_HEADER = f"x-amz-meta-{SHA256_METADATA}"
_MAX_BACKOFF_S = 30.0

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchObject", "ResourceNotFound"})
_AUTH_CODES = frozenset({
    "AccessDenied",
    "AllAccessDisabled",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidToken",
    "SignatureDoesNotMatch",
})
_TRANSIENT_CODES = frozenset({
    "InternalError",
    "OperationAborted",
    "RequestTimeout",
    "ServiceUnavailable",
    "SlowDown",
})


class InvalidStoreURI(StoreError, ValueError):
    """An ``s3://`` URI or endpoint that cannot name a bucket on a server."""


class StoreUnavailable(StoreError):
    """The S3 server did not answer (or kept failing) through every retry."""


class StoreAccessDenied(StoreError):
    """The S3 server refused the credentials or the operation."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")`` (prefix may be ``""``)."""
    if not uri.startswith("s3://"):
        raise InvalidStoreURI(f"not an S3 store URI: {uri!r}; expected s3://bucket[/prefix]")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    check_bucket(bucket, uri)
    prefix = prefix.strip("/")
    if prefix:
        try:
            check_key(prefix)
        except StoreError:
            raise InvalidStoreURI(
                f"invalid prefix {prefix!r} in {uri!r}: use '/'-separated names without '.', '..' or '//'"
            ) from None
    return bucket, prefix


def check_bucket(bucket: str, uri: str | None = None) -> str:
    """S3 bucket naming rules, checked before any request so the error names the real problem."""
    from minio.helpers import check_bucket_name

    where = f" in {uri!r}" if uri else ""
    if not bucket:
        raise InvalidStoreURI(f"no bucket{where}; expected s3://bucket[/prefix]")
    if not 3 <= len(bucket) <= 63:
        raise InvalidStoreURI(f"bucket name {bucket!r}{where} must be 3 to 63 characters long")
    try:
        check_bucket_name(bucket, strict=True)
    except ValueError as exc:
        raise InvalidStoreURI(
            f"invalid bucket name {bucket!r}{where} ({exc}): use lower-case letters, digits, '-' and '.'"
        ) from None
    return bucket


def parse_endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """``host:port`` as minio wants it, and whether to use TLS.

    Accepts ``host:port`` (TLS from ``secure``) or a URL such as ``http://minio:9000`` (TLS from the
    scheme), so the same value can serve ``MLFLOW_S3_ENDPOINT_URL``.
    """
    endpoint = endpoint.strip()
    if "://" not in endpoint:
        host, use_tls = endpoint.rstrip("/"), secure
    else:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidStoreURI(f"S3 endpoint {endpoint!r} must be host:port or http(s)://host:port")
        if parts.path.strip("/") or parts.query:
            raise InvalidStoreURI(f"S3 endpoint {endpoint!r} must not have a path; the bucket goes in the store URI")
        host, use_tls = parts.netloc, parts.scheme == "https"
    if not host or "/" in host:
        raise InvalidStoreURI(f"S3 endpoint {endpoint!r} must be host:port or http(s)://host:port")
    return host, use_tls


def resolve_credentials(config: S3Config) -> tuple[str | None, str | None, str | None]:
    """(access key, secret key, session token) from settings, else the standard AWS variables."""
    access = config.access_key.get_secret_value() or os.environ.get("AWS_ACCESS_KEY_ID", "")
    secret = config.secret_key.get_secret_value() or os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    token = config.session_token.get_secret_value() or os.environ.get("AWS_SESSION_TOKEN", "")
    if bool(access) != bool(secret):
        missing = "secret key" if access else "access key"
        raise StoreAccessDenied(
            f"S3 {missing} is missing: set both MEDDIFFUSE_S3__ACCESS_KEY and MEDDIFFUSE_S3__SECRET_KEY "
            "(or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        )
    return access or None, secret or None, token or None  # none at all = anonymous requests


def mlflow_artifact_env(config: S3Config) -> dict[str, str]:
    """Environment for MLflow's boto3 artifact client to reach the same S3 server as the store.

    For an MLflow server whose artifact root is ``s3://...`` on MinIO: export these in the client's
    environment (``MLFLOW_S3_ENDPOINT_URL`` and the AWS key variables MLflow reads).
    """
    host, use_tls = parse_endpoint(config.endpoint, config.secure)
    access, secret, token = resolve_credentials(config)
    env = {"MLFLOW_S3_ENDPOINT_URL": f"{'https' if use_tls else 'http'}://{host}"}
    if access and secret:
        env |= {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret}
    if token:
        env["AWS_SESSION_TOKEN"] = token
    if config.region:
        env["AWS_DEFAULT_REGION"] = config.region
    if use_tls and not config.verify_tls:
        env["MLFLOW_S3_IGNORE_TLS"] = "true"
    return env


class S3Store(ObjectStore):
    """``ObjectStore`` over one bucket, optionally under a key prefix."""

    def __init__(self, bucket: str, prefix: str = "", config: S3Config | None = None) -> None:
        self.config = config or S3Config()
        self.bucket = check_bucket(bucket)
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        self._root = f"{self.prefix}/" if self.prefix else ""
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.endpoint, self.secure = parse_endpoint(self.config.endpoint, self.config.secure)
        self.endpoint_url = f"{'https' if self.secure else 'http'}://{self.endpoint}"
        self.client = self._make_client()
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()

    @classmethod
    def from_uri(cls, uri: str, config: S3Config | None = None) -> S3Store:
        bucket, prefix = parse_s3_uri(uri)
        return cls(bucket, prefix, config)

    def _make_client(self) -> Minio:
        access, secret, token = resolve_credentials(self.config)
        self.anonymous = access is None
        timeout = urllib3.Timeout(connect=self.config.timeout_s, read=self.config.timeout_s)
        # urllib3 must not retry on its own: retries (and their bound) are ours, see _call
        http = urllib3.PoolManager(
            timeout=timeout,
            maxsize=10,
            cert_reqs="CERT_REQUIRED" if self.config.verify_tls else "CERT_NONE",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=urllib3.Retry(total=0, raise_on_redirect=False, raise_on_status=False),
        )
        return Minio(
            self.endpoint,
            access_key=access,
            secret_key=secret,
            session_token=token,
            secure=self.secure,
            region=self.config.region,
            http_client=http,
        )

    # -- pickling: the minio client holds sockets and locks, so rebuild it on the other side
    def __getstate__(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "prefix": self.prefix, "config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["bucket"], state["prefix"], state["config"])  # type: ignore[misc]

    # -- keys
    def _name(self, key: str) -> str:
        return self._root + check_key(key)

    # -- the contract
    def put(self, key: str, data: bytes) -> None:
        name = self._name(key)
        data = bytes(data)
        metadata = {SHA256_METADATA: sha256_hex(data)}
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"

        def upload() -> None:
            # a fresh stream per attempt: a failed attempt may have consumed the previous one
            self.client.put_object(
                self.bucket,
                name,
                io.BytesIO(data),
                len(data),
                content_type=content_type,
                metadata=metadata,
                part_size=self.config.part_size,
            )

        self._call("put", key, upload)

    def get(self, key: str) -> bytes:
        name = self._name(key)

        def download() -> tuple[bytes, str | None]:
            try:
                response = self.client.get_object(self.bucket, name)
            except S3Error as exc:
                if exc.code in _NOT_FOUND_CODES:
                    raise ObjectNotFound(f"no object {key!r} in {self.uri}") from None
                raise
            try:
                return response.read(), response.headers.get(_SHA256_HEADER)
            finally:
                response.close()
                response.release_conn()

        data, expected = self._call("get", key, download)
        if expected is not None:
            actual = sha256_hex(data)
            if actual != expected.strip().lower():
                raise CorruptObject(
                    f"object {key!r} in {self.uri} is corrupt: its bytes hash to sha256 {actual[:16]}..., "
                    f"but {expected[:16]}... was recorded when it was written; re-create it from its source"
                )
        return data

    def exists(self, key: str) -> bool:
        name = self._name(key)

        def stat() -> bool:
            try:
                self.client.stat_object(self.bucket, name)
            except S3Error as exc:
                if exc.code in _NOT_FOUND_CODES:
                    return False
                raise
            return True

        return self._call("exists", key, stat)

    def list(self, prefix: str = "") -> list[str]:
        def listing() -> list[str]:
            objects = self.client.list_objects(self.bucket, prefix=self._root + prefix, recursive=True)
            return [o.object_name for o in objects if o.object_name and not o.is_dir]

        names = self._call("list", prefix, listing)
        # folder markers ("a/") made by web consoles are not objects of ours
        return sorted(n[len(self._root) :] for n in names if not n.endswith("/"))

    def delete(self, key: str) -> None:
        name = self._name(key)
        self._call("delete", key, lambda: self.client.remove_object(self.bucket, name))

    def delete_prefix(self, prefix: str) -> int:
        """One multi-object delete request per 1000 keys instead of one request per key."""
        keys = self.list(prefix)
        if not keys:
            return 0

        def remove() -> None:
            errors = list(self.client.remove_objects(self.bucket, [DeleteObject(self._root + k) for k in keys]))
            if errors:
                first = errors[0]
                raise StoreError(
                    f"could not delete {len(errors)} of {len(keys)} objects under {prefix!r} in {self.uri}; "
                    f"first: {first.name}: {first.code} {first.message}"
                )

        self._call("delete_prefix", prefix, remove)
        return len(keys)

    # -- bucket and retries
    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        with self._bucket_lock:
            if self._bucket_ready:
                return

            def create_if_missing() -> None:
                if self.client.bucket_exists(self.bucket):
                    return
                try:
                    if self.config.region:
                        self.client.make_bucket(self.bucket, location=self.config.region)
                    else:
                        self.client.make_bucket(self.bucket)
                    log.info("created bucket %s on %s", self.bucket, self.endpoint_url)
                except S3Error as exc:
                    if exc.code != "BucketAlreadyOwnedByYou":  # another writer won the race: fine
                        raise

            self._retrying("create bucket", self.bucket, create_if_missing)
            self._bucket_ready = True

    def _call(self, operation: str, key: str, fn: Callable[[], T]) -> T:
        self._ensure_bucket()
        return self._retrying(operation, key, fn)

    def _retrying(self, operation: str, key: str, fn: Callable[[], T]) -> T:
        attempts = self.config.retries + 1
        last: BaseException | None = None
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except S3Error as exc:
                if exc.code in _AUTH_CODES:
                    raise StoreAccessDenied(self._auth_message(operation, key, exc)) from None
                if exc.code == "BucketAlreadyExists":
                    raise StoreAccessDenied(
                        f"bucket {self.bucket!r} already exists on {self.endpoint_url} and belongs to "
                        "another account; choose another bucket in MEDDIFFUSE_STORE"
                    ) from None
                if not _is_transient(exc):
                    raise StoreError(
                        f"S3 {operation} of {key!r} in {self.uri} failed: {exc.code}: {exc.message}"
                    ) from exc
                last = exc
            except (ServerError, InvalidResponseError, urllib3.exceptions.HTTPError, OSError) as exc:
                last = exc
            if attempt < attempts:
                delay = min(self.config.backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S)
                log.warning(
                    "S3 %s of %r failed (attempt %d/%d: %s); retrying in %.2fs",
                    operation, key, attempt, attempts, _describe(last), delay,
                )
                time.sleep(delay)
        raise StoreUnavailable(
            f"S3 {operation} of {key!r} in {self.uri} failed after {attempts} attempt(s) against "
            f"{self.endpoint_url}: {_describe(last)}. Is the server running and reachable? Check "
            "MEDDIFFUSE_S3__ENDPOINT and MEDDIFFUSE_S3__SECURE (retries: MEDDIFFUSE_S3__RETRIES)."
        ) from last

    def _auth_message(self, operation: str, key: str, exc: S3Error) -> str:
        who = "anonymous requests (no credentials set)" if self.anonymous else "the configured credentials"
        return (
            f"S3 {operation} of {key!r} in {self.uri} was refused by {self.endpoint_url} for {who}: "
            f"{exc.code}: {exc.message}. Check MEDDIFFUSE_S3__ACCESS_KEY / MEDDIFFUSE_S3__SECRET_KEY "
            "(or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and the key's permissions on the bucket."
        )


def _is_transient(exc: S3Error) -> bool:
    status = getattr(exc.response, "status", 0) or 0
    return exc.code in _TRANSIENT_CODES or status >= 500


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no error recorded"
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason  # the connection error, not urllib3's long wrapper text
    if isinstance(exc, S3Error):
        return f"{exc.code}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"
