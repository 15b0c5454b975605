"""The object-store contract shared by the local folder and S3/MinIO implementations."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from pathlib import Path


class StoreError(RuntimeError):
    """A store operation failed in a way the caller should report (not retry)."""


class ObjectNotFound(StoreError, KeyError):
    """The key does not exist in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "object not found"


class CorruptObject(StoreError):
    """An object's bytes do not match the content hash recorded when it was written."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_key(key: str) -> str:
    """Keys are '/'-separated relative paths; refuse anything that could escape the store root."""
    if not key or key.startswith("/") or "\\" in key:
        raise StoreError(f"invalid store key {key!r}")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise StoreError(f"invalid store key {key!r}")
    return key


class ObjectStore(ABC):
    """put/get/list/exists/delete over '/'-separated keys.

    ``put`` is atomic per object: a reader sees either the old bytes, the new bytes, or nothing.
    Multi-object atomicity (datasets, checkpoints) comes from writing a manifest last.
    """

    uri: str

    @abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys starting with ``prefix``, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one key; deleting a missing key is not an error."""

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

    def put_folder(self, local_dir: Path, prefix: str) -> dict[str, str]:
        """Upload every file under ``local_dir`` to ``<prefix>/<relative path>``; returns {relative path: sha256}.

        Callers record the returned hashes in a manifest they write afterwards (the commit point).
        """
        files: dict[str, str] = {}
        for path in sorted(Path(local_dir).rglob("*")):
            if path.is_file():
                rel = path.relative_to(local_dir).as_posix()
                data = path.read_bytes()
                self.put(f"{prefix.rstrip('/')}/{rel}", data)
                files[rel] = sha256_hex(data)
        return files

    def put_text(self, key: str, text: str) -> None:
        self.put(key, text.encode("utf-8"))

    def get_text(self, key: str) -> str:
        return self.get(key).decode("utf-8")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"
