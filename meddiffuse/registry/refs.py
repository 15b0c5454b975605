"""Registered-model names and references: one parser for every door (torch- and MLflow-free)."""

from __future__ import annotations

import re
from dataclasses import dataclass

CLASSIFIER_PREFIX = "meddiffuse-classifier-"
GENERATOR_PREFIX = "meddiffuse-generator-"
CHAMPION = "champion"
CHALLENGER = "challenger"

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_MODEL_REF_RE = re.compile(
    r"^(?:models:/)?(?P<name>[A-Za-z0-9][A-Za-z0-9_.\-]*)(?:@(?P<alias>[A-Za-z0-9_\-]+)|/(?P<version>\d+))?$"
)
_LOGGED_MODEL_RE = re.compile(r"^models:/m-[0-9a-f]{32}$")


def check_name_part(part: str, what: str) -> str:
    if not isinstance(part, str) or not NAME_RE.match(part):
        raise ValueError(f"{what} {part!r} cannot name a registered model: use letters, digits, '-', '_' and '.'")
    return part


def classifier_model_name(domain: str) -> str:
    return CLASSIFIER_PREFIX + check_name_part(domain, "domain")


def generator_model_name(domain: str) -> str:
    return GENERATOR_PREFIX + check_name_part(domain, "domain")


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference: exactly one of ``alias`` and ``version`` is set."""

    name: str
    alias: str | None = None
    version: int | None = None

    @property
    def uri(self) -> str:
        if self.version is not None:
            return f"models:/{self.name}/{self.version}"
        return f"models:/{self.name}@{self.alias}"

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True)
class PinnedVersion:
    """A registered version, as resolved: what lineage records (never only a moving alias)."""

    name: str
    version: int
    alias: str | None = None  # the alias it was reached through, if any
    run_id: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def label(self) -> str:
        """``name/version``, plus ``@alias`` when reached through one."""
        return f"{self.name}/{self.version}" + (f" (@{self.alias})" if self.alias else "")

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "version": self.version, "alias": self.alias, "uri": self.uri,
                "run_id": self.run_id}


def parse_model_ref(ref: str, default_alias: str = CHAMPION) -> ModelRef:
    """``models:/n@a``, ``n@a``, ``n/3``, ``models:/n/3`` or a bare ``n`` (= ``n@champion``)."""
    match = _MODEL_REF_RE.match(ref.strip()) if isinstance(ref, str) else None
    if match is None:
        raise ValueError(
            f"cannot read model reference {ref!r}; use NAME@ALIAS, NAME/VERSION, models:/NAME@ALIAS or "
            "models:/NAME/VERSION (e.g. meddiffuse-classifier-brain-mri@champion)"
        )
    if match["version"] is not None:
        version = int(match["version"])
        if version < 1:
            raise ValueError(f"model version must be a positive integer, got {version}")
        return ModelRef(match["name"], None, version)
    return ModelRef(match["name"], match["alias"] or default_alias, None)


def is_registry_ref(ref: str) -> bool:
    """True for ``models:/...`` URIs and ``name@alias`` / ``name/N`` forms of a registered meddiffuse model."""
    if not isinstance(ref, str):
        return False
    ref = ref.strip()
    if _LOGGED_MODEL_RE.match(ref):
        return False  # an MLflow logged model, not a registered version
    if ref.startswith("models:/"):
        return True
    if not ref.startswith(("meddiffuse-classifier-", "meddiffuse-generator-")):
        return False
    try:
        parse_model_ref(ref)
    except ValueError:
        return False
    return True


def resolve_model_uri(ref: str) -> str:
    """``models:/`` URI of a reference; ``runs:/...`` and logged-model URIs (``models:/m-<id>``) pass through."""
    ref = ref.strip()
    if ref.startswith("runs:/") or _LOGGED_MODEL_RE.match(ref):
        return ref
    return parse_model_ref(ref).uri
