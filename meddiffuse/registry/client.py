"""One MLflow client per process and configuration, and MLflow's errors turned into ours."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

from meddiffuse.config import Settings

log = logging.getLogger(__name__)

_lock = threading.Lock()
_configured: tuple[str, str] | None = None
_clients: dict[tuple[str, str], Any] = {}


class RegistryError(RuntimeError):
    """A registry operation failed (the message says which model and what to do)."""


class ModelNotFound(RegistryError, LookupError):
    """No registered model, version or alias matches the reference."""


class RegistryUnavailable(RegistryError, ConnectionError):
    """The registry could not be reached (network, server down); retrying may succeed."""


class AliasMoved(RegistryError):
    """A compare-and-set promotion found the alias somewhere other than expected."""


def registry_uris(settings: Settings | None = None) -> tuple[str, str]:
    settings = settings or Settings()
    tracking = settings.resolved_tracking_uri
    if tracking.startswith("sqlite:///"):
        settings.home.mkdir(parents=True, exist_ok=True)
    return tracking, settings.registry_uri or tracking


def configure_mlflow(settings: Settings | None = None) -> str:
    """Point MLflow's global state at the configured URIs, once per process and configuration."""
    global _configured
    uris = registry_uris(settings)
    with _lock:
        if _configured != uris:
            import mlflow

            # MLflow's optional telemetry tries the network; this is an offline tool
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            os.environ.setdefault("DO_NOT_TRACK", "true")
            mlflow.set_tracking_uri(uris[0])
            mlflow.set_registry_uri(uris[1])
            _configured = uris
    return uris[0]


def registry_client(settings: Settings | None = None) -> Any:
    """An ``MlflowClient`` on the configured URIs (cached: building one costs a store round trip)."""
    uris = registry_uris(settings)
    with _lock:
        client = _clients.get(uris)
    if client is None:
        configure_mlflow(settings)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uris[0], registry_uri=uris[1])
        with _lock:
            _clients[uris] = client
    return client


@contextlib.contextmanager
def registry_errors(what: str) -> Iterator[None]:
    """MLflow's exceptions, re-raised as ours with the object named and a next step."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        message = getattr(exc, "message", str(exc))
        # MLflow reports a missing alias as an invalid parameter, not as a missing resource
        missing_alias = "alias" in message and "not found" in message
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or missing_alias:
            raise ModelNotFound(f"{what}: {message} (see `meddiffuse models list`)") from None
        if _unreachable(exc):
            raise RegistryUnavailable(f"{what}: registry unreachable: {message}") from exc
        raise RegistryError(f"{what}: {message}") from exc
    except (ConnectionError, OSError) as exc:
        raise RegistryUnavailable(f"{what}: registry unreachable: {exc}") from exc


def _unreachable(exc: Exception) -> bool:
    text = str(exc)
    return any(s in text for s in ("Max retries exceeded", "Connection refused", "ConnectionError",
                                   "Failed to establish", "Read timed out", "database is locked"))


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
    """MLflow's INFO/WARNING chatter while logging and registering ("Created version ...", the cloudpickle
    notice) off; our own log line says what was registered."""
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
