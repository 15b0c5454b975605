"""Object store in a local folder: the embedded default."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from meddiffuse.store.base import ObjectNotFound, ObjectStore, StoreError, check_key


class LocalStore(ObjectStore):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise StoreError(f"cannot write {key!r}: a part of its path is an object in {self.uri}") from None
        if path.is_dir():
            raise StoreError(f"cannot write {key!r}: it is a folder of other objects in {self.uri}")
        # write-then-rename: a killed process leaves a temp file, never a half-written object
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in {self.uri}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        keys: list[str] = []
        base = self.root
        # walk only the deepest folder the prefix names, so listing one dataset stays cheap
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = base.joinpath(*folder.split("/")) if folder else base
        if not start.is_dir():
            return []
        for dirpath, _dirs, files in os.walk(start):
            rel_dir = Path(dirpath).relative_to(base).as_posix()
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # prune empty folders up to the root so deleted datasets leave nothing behind
        parent = path.parent
        while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
