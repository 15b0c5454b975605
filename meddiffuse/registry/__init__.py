"""The MLflow model registry: references, pinned versions, aliases, tags, compare-and-set promotion, and
``ModelHandle`` for serving. Torch-free at import; a model's format lives with its science
(``meddiffuse.classify.registry``, ``meddiffuse.generate.pyfunc``)."""

from meddiffuse.registry.client import (
    AliasMoved,
    ModelNotFound,
    RegistryError,
    RegistryUnavailable,
    configure_mlflow,
    registry_client,
)
from meddiffuse.registry.handle import ModelHandle, ModelNotLoaded, Served
from meddiffuse.registry.refs import (
    CHALLENGER,
    CHAMPION,
    CLASSIFIER_PREFIX,
    GENERATOR_PREFIX,
    ModelRef,
    PinnedVersion,
    classifier_model_name,
    generator_model_name,
    is_registry_ref,
    parse_model_ref,
    resolve_model_uri,
)
from meddiffuse.registry.versions import (
    SPEC_TAG,
    UNSET,
    ModelVersionInfo,
    Promotion,
    VersionSummary,
    current_alias,
    describe_version,
    find_version_by_tag,
    list_model_names,
    list_versions,
    promote,
    register_logged_model,
    resolve,
    set_alias,
    tag_version,
)

__all__ = [
    "CHALLENGER", "CHAMPION", "CLASSIFIER_PREFIX", "GENERATOR_PREFIX", "SPEC_TAG", "UNSET",
    "AliasMoved", "ModelHandle", "ModelNotFound", "ModelNotLoaded", "ModelRef", "ModelVersionInfo",
    "PinnedVersion", "Promotion", "RegistryError", "RegistryUnavailable", "Served", "VersionSummary",
    "classifier_model_name", "configure_mlflow", "current_alias", "describe_version", "find_version_by_tag",
    "generator_model_name", "is_registry_ref", "list_model_names", "list_versions", "parse_model_ref",
    "promote", "register_logged_model", "registry_client", "resolve", "resolve_model_uri", "set_alias",
    "tag_version",
]
