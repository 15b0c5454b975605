"""``ModelHandle``: serve whatever version an alias points at, swapping atomically when it moves.

A handle resolves its reference at most once per ``reload_interval_s`` (one cheap registry call), loads
a version once, and swaps the served ``(model, version)`` pair in one assignment, so a caller always
gets a whole version, old or new, never a mix. Loading happens outside the lock that readers take:
requests keep being answered by the old version while the new one loads. When the registry is briefly
unreachable the loaded version keeps serving and the failure is logged, once per outage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from meddiffuse.config import Settings
from meddiffuse.registry.refs import PinnedVersion, parse_model_ref
from meddiffuse.registry.versions import resolve

log = logging.getLogger(__name__)

T = TypeVar("T")
Loader = Callable[[PinnedVersion], T]


@dataclass(frozen=True)
class Served(Generic[T]):
    """A loaded model and the pinned version it is."""

    model: T
    pinned: PinnedVersion
    loaded_at: float


class ModelNotLoaded(RuntimeError):
    """The handle has no version loaded yet (the registry has none, or loading failed)."""


class ModelHandle(Generic[T]):
    """``handle.get()`` -> ``Served(model, pinned)`` for ``ref`` (e.g. ``meddiffuse-classifier-all@champion``)."""

    def __init__(
        self,
        ref: str,
        loader: Loader[T],
        *,
        settings: Settings | None = None,
        reload_interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ref = parse_model_ref(ref)
        self._loader = loader
        self._settings = settings
        self.reload_interval_s = reload_interval_s
        self._clock = clock
        self._served: Served[T] | None = None
        self._checked_at = float("-inf")
        self._refresh_lock = threading.Lock()  # one refresh at a time; readers never wait on it
        self.last_error: str | None = None

    @property
    def ready(self) -> bool:
        return self._served is not None

    @property
    def pinned(self) -> PinnedVersion | None:
        served = self._served
        return served.pinned if served else None

    def get(self) -> Served[T]:
        """The current version, refreshed first if the interval has passed (by one caller; others don't wait)."""
        if self._clock() - self._checked_at >= self.reload_interval_s:
            blocking = self._served is None  # the first load: everyone waits for it
            if self._refresh_lock.acquire(blocking=blocking):
                try:
                    if self._clock() - self._checked_at >= self.reload_interval_s:
                        self._refresh_locked()
                finally:
                    self._refresh_lock.release()
        served = self._served
        if served is None:
            raise ModelNotLoaded(f"no version of {self.ref.uri} is loaded: {self.last_error or 'not resolved yet'}")
        return served

    def refresh(self) -> bool:
        """Resolve now (e.g. on a registry webhook); load and swap if the alias moved. True if it swapped."""
        with self._refresh_lock:
            return self._refresh_locked()

    def _refresh_locked(self) -> bool:
        self._checked_at = self._clock()
        try:
            pinned = resolve(self.ref.uri, self._settings)
        except Exception as exc:  # noqa: BLE001 - keep serving the loaded version through an outage
            self._note_error(f"cannot resolve {self.ref.uri}: {exc}")
            return False
        current = self._served
        if current is not None and current.pinned.version == pinned.version:
            self._clear_error()
            return False
        try:
            model = self._loader(pinned)
        except Exception as exc:  # noqa: BLE001
            self._note_error(f"cannot load {pinned.uri}: {exc}")
            return False
        self._served = Served(model, pinned, self._clock())  # one assignment: the atomic swap
        self._clear_error()
        if current is None:
            log.info("serving %s", pinned.label)
        else:
            log.info("alias moved: serving %s (was version %s)", pinned.label, current.pinned.version)
        return True

    def _note_error(self, message: str) -> None:
        if message != self.last_error:
            served = self._served
            keep = f"; still serving {served.pinned.label}" if served else ""
            log.warning("%s%s", message, keep)
        self.last_error = message

    def _clear_error(self) -> None:
        if self.last_error is not None:
            log.info("registry reachable again for %s", self.ref.uri)
        self.last_error = None
