"""Versions, tags and aliases in the MLflow registry — torch-free, so `meddiffuse models ...` starts fast.

Aliases: services load ``@champion``; ``@challenger`` marks the candidate under evaluation. Moving an alias
here (``promote``), with ``meddiffuse models promote`` or in the MLflow UI is how a version ships: the
services re-resolve the alias (``ModelHandle``), so every path is equivalent. ``promote`` moves only the
alias it names and returns the previous holder, so rolling back is one more ``promote``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from meddiffuse.config import Settings
from meddiffuse.registry.client import AliasMoved, RegistryError, quiet_mlflow, registry_client, registry_errors
from meddiffuse.registry.refs import CHAMPION, NAME_RE, ModelRef, PinnedVersion, check_name_part, parse_model_ref

log = logging.getLogger(__name__)

METRIC_TAG_PREFIX = "metric."
DATASET_TAG_PREFIX = "dataset."
SPEC_TAG = "meddiffuse.spec"  # the fingerprint of the task spec that made a version (retries find it)


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
_promote_lock = threading.Lock()


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: int
    run_id: str | None
    uri: str  # models:/<name>/<version>, pinned

    @property
    def pinned(self) -> PinnedVersion:
        return PinnedVersion(self.name, self.version, None, self.run_id)


@dataclass(frozen=True)
class VersionSummary:
    name: str
    version: int
    aliases: list[str]
    tags: dict[str, str]
    metrics: dict[str, float]
    run_id: str | None
    status: str
    created_at: datetime | None
    source: str | None = None
    description: str | None = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class Promotion:
    name: str
    alias: str
    version: int
    previous: int | None  # the version that held the alias before, if any

    @property
    def moved(self) -> bool:
        return self.previous != self.version


def _version_number(version: int | str) -> int:
    try:
        number = int(version)
    except (TypeError, ValueError):
        raise ValueError(f"model version must be a positive integer, got {version!r}") from None
    if number < 1:
        raise ValueError(f"model version must be a positive integer, got {version!r}")
    return number


def check_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    checked: dict[str, float] = {}
    for name, value in metrics.items():
        check_name_part(name, "metric")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"metric {name!r} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"metric {name!r} must be finite, got {value!r}")
        checked[name] = number
    return checked


def metric_tags(metrics: Mapping[str, float]) -> dict[str, str]:
    return {METRIC_TAG_PREFIX + k: repr(v) for k, v in check_metrics(metrics).items()}


def dataset_tags(dataset_ids: Mapping[str, str]) -> dict[str, str]:
    return {DATASET_TAG_PREFIX + check_name_part(role, "dataset role"): str(v) for role, v in dataset_ids.items()}


# -- resolving ---------------------------------------------------------------------------------------


def _lookup(client: Any, parsed: ModelRef) -> Any:
    """The MLflow ModelVersion a parsed reference points at (by number, or through its alias)."""
    if parsed.version is not None:
        return client.get_model_version(parsed.name, str(parsed.version))
    return client.get_model_version_by_alias(parsed.name, parsed.alias)


def resolve(ref: str, settings: Settings | None = None) -> PinnedVersion:
    """The version a reference points at now: one registry call, no download."""
    parsed = parse_model_ref(ref)
    client = registry_client(settings)
    with registry_errors(f"cannot find {parsed.uri}"):
        mv = _lookup(client, parsed)
    return PinnedVersion(parsed.name, int(mv.version), parsed.alias, mv.run_id)


def describe_version(ref: str, settings: Settings | None = None) -> VersionSummary:
    """The version a reference points at now, with its aliases, tags and metrics."""
    parsed = parse_model_ref(ref)
    client = registry_client(settings)
    with registry_errors(f"cannot find {parsed.uri}"):
        mv = _lookup(client, parsed)
        aliases = client.get_registered_model(parsed.name).aliases
    return _summary(mv, sorted(a for a, v in aliases.items() if int(v) == int(mv.version)))


def current_alias(name: str, alias: str, settings: Settings | None = None) -> int | None:
    """The version holding ``alias`` now, or None."""
    client = registry_client(settings)
    with registry_errors(f"cannot read aliases of {name}"):
        try:
            value = client.get_registered_model(name).aliases.get(alias)
        except Exception as exc:  # noqa: BLE001 - a model that does not exist yet holds no alias
            if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
    return int(value) if value is not None else None


# -- listing -----------------------------------------------------------------------------------------


def list_model_names(prefix: str = "meddiffuse-", settings: Settings | None = None) -> list[str]:
    """Registered model names starting with ``prefix``, sorted."""
    client = registry_client(settings)
    with registry_errors("cannot list registered models"):
        models = client.search_registered_models()
    return sorted(m.name for m in models if m.name.startswith(prefix))


def list_versions(name: str, settings: Settings | None = None) -> list[VersionSummary]:
    """Every version of ``name``, newest first, with its aliases, tags and ``metric.*`` tags as metrics."""
    if not NAME_RE.match(name):
        raise ValueError(f"invalid registered model name {name!r}")
    client = registry_client(settings)
    with registry_errors(f"cannot list versions of {name}"):
        aliases = client.get_registered_model(name).aliases  # search results leave aliases out
        versions = client.search_model_versions(f"name = '{name}'")
    by_version: dict[int, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(int(version), []).append(alias)
    summaries = [_summary(v, sorted(by_version.get(int(v.version), []))) for v in versions]
    return sorted(summaries, key=lambda s: s.version, reverse=True)


def find_version_by_tag(name: str, key: str, value: str, settings: Settings | None = None) -> VersionSummary | None:
    """The newest READY version of ``name`` whose tag ``key`` equals ``value`` (None if none or no model)."""
    from meddiffuse.registry.client import ModelNotFound

    try:
        versions = list_versions(name, settings)
    except ModelNotFound:
        return None
    matches = [v for v in versions if v.tags.get(key) == value and v.status == "READY"]
    return matches[0] if matches else None


def _summary(mv: Any, aliases: list[str]) -> VersionSummary:
    tags = dict(mv.tags or {})
    metrics: dict[str, float] = {}
    for key, value in tags.items():
        if key.startswith(METRIC_TAG_PREFIX):
            with contextlib.suppress(ValueError):
                metrics[key[len(METRIC_TAG_PREFIX):]] = float(value)
    created = datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=UTC) if mv.creation_timestamp else None
    return VersionSummary(
        name=mv.name, version=int(mv.version), aliases=aliases, tags=tags, metrics=metrics, run_id=mv.run_id,
        status=str(mv.status), created_at=created, source=mv.source, description=mv.description,
    )


# -- tags and aliases --------------------------------------------------------------------------------


def tag_version(name: str, version: int | str, tags: Mapping[str, Any], settings: Settings | None = None) -> None:
    """Set tags on one model version (values are stored as strings)."""
    client = registry_client(settings)
    number = _version_number(version)
    with registry_errors(f"cannot tag {name} version {number}"):
        client.get_model_version(name, str(number))
        for key, value in tags.items():
            client.set_model_version_tag(name, str(number), key, str(value))


def set_alias(name: str, alias: str, version: int | str, settings: Settings | None = None) -> None:
    """Point ``alias`` at ``version`` of ``name`` (the version must exist)."""
    promote(name, version, alias=alias, settings=settings)


def promote(
    name: str,
    version: int | str,
    alias: str = CHAMPION,
    *,
    expected_current: int | None = UNSET,
    settings: Settings | None = None,
) -> Promotion:
    """Move ``alias`` (default ``champion``) to ``version``; returns the version that held it before.

    With ``expected_current`` (a version, or None for "no holder yet") this is a compare-and-set: it
    raises ``AliasMoved`` if the alias is held by another version, e.g. because someone promoted in the
    MLflow UI after the caller read it. MLflow offers no atomic CAS, so the check and the move are two
    calls: serialised within a process, a window of milliseconds across processes.
    """
    check_name_part(alias, "alias")
    client = registry_client(settings)
    number = _version_number(version)
    with _promote_lock, registry_errors(f"cannot promote {name} version {number} to {alias!r}"):
        target = client.get_model_version(name, str(number))
        if target.status != "READY":
            raise RegistryError(f"{name} version {number} is {target.status}, not READY; it cannot be served")
        held = client.get_registered_model(name).aliases.get(alias)
        previous = int(held) if held is not None else None
        if expected_current is not UNSET and previous != expected_current:
            raise AliasMoved(
                f"{name}@{alias} is at version {previous}, not {expected_current} as expected: it moved "
                "meanwhile; re-read it and decide again"
            )
        if previous != number:
            client.set_registered_model_alias(name, alias, str(number))
    log.info("%s@%s -> version %s (was %s)", name, alias, number, previous)
    return Promotion(name, alias, number, previous)


# -- registering -------------------------------------------------------------------------------------


def register_logged_model(
    model_uri: str,
    name: str,
    *,
    tags: Mapping[str, Any] | None = None,
    alias: str | None = None,
    settings: Settings | None = None,
) -> ModelVersionInfo:
    """Register an already logged model as a new version of ``name`` with ``tags``; optionally set ``alias``."""
    import mlflow

    check_name_part(name, "registered model name")
    registry_client(settings)  # configures mlflow's globals for this registry
    str_tags = {k: str(v) for k, v in (tags or {}).items()}
    with registry_errors(f"cannot register {model_uri} as {name}"), quiet_mlflow():
        mv = mlflow.register_model(model_uri, name, tags=str_tags)
    info = ModelVersionInfo(name, int(mv.version), mv.run_id, f"models:/{name}/{mv.version}")
    if alias:
        promote(name, info.version, alias=alias, settings=settings)
    return info


def pinned_requirements(*packages: str) -> list[str]:
    pinned = []
    for package in packages:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            pinned.append(f"{package}=={importlib.metadata.version(package)}")
    return pinned


