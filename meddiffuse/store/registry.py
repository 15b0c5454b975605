"""The MLflow model registry: register classifiers, tag versions, move aliases, load models back.

Names: ``meddiffuse-classifier-<domain>`` (PyTorch flavour) and ``meddiffuse-generator-<domain>``
(pyfunc, registered by ``meddiffuse.generate.pyfunc`` through ``register_logged_model``).

Aliases: services load ``@champion``; ``@challenger`` marks the candidate under evaluation. Moving an
alias, here (``promote``, ``meddiffuse models promote``) or in the MLflow UI, is how a version ships:
the services resolve the alias when they load, so both paths are equivalent. ``promote`` moves only
the alias it names. It does not push the previous champion to ``challenger``, because that would
silently overwrite a real challenger; it returns the previous holder instead, so rolling back is one
more ``promote``.

Classifiers are saved with ``torch.export`` (MLflow's safe ``pt2`` format, no pickle), from a CPU copy
in eval mode, with a batch-2 input example so the batch dimension stays dynamic. A loaded classifier
gives exactly the outputs of the logged one. Each version carries ``extra_files/preprocessing.json``
(classes, channels, input size, mean/std, ...) so a loader can rebuild the input pipeline.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import itertools
import json
import math
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddiffuse.config import Settings
from meddiffuse.store.tracking import configure_mlflow, tracked_run

CLASSIFIER_PREFIX = "meddiffuse-classifier-"
GENERATOR_PREFIX = "meddiffuse-generator-"
CLASSIFIER_EXPERIMENT = "meddiffuse-classifier"
CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT = "classifier"
PREPROCESSING_FILE = "preprocessing.json"
TRAIN_DATA_ORIGINS = ("real", "synthetic", "mixed")
METRIC_TAG_PREFIX = "metric."
DATASET_TAG_PREFIX = "dataset."

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_MODEL_REF_RE = re.compile(
    r"^(?:models:/)?(?P<name>[A-Za-z0-9][A-Za-z0-9_.\-]*)(?:@(?P<alias>[A-Za-z0-9_\-]+)|/(?P<version>\d+))?$"
)
_LOGGED_MODEL_RE = re.compile(r"^models:/m-[0-9a-f]{32}$")


class RegistryError(RuntimeError):
    """A registry operation failed (the message says which model and what to do)."""


class ModelNotFound(RegistryError, LookupError):
    """No registered model, version or alias matches the reference."""


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: int
    run_id: str | None
    uri: str  # models:/<name>/<version>, pinned


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


# -- names and references ----------------------------------------------------------------------------


def _check_domain(domain: str) -> str:
    if not isinstance(domain, str) or not _NAME_RE.match(domain):
        raise ValueError(
            f"domain {domain!r} cannot name a registered model: use letters, digits, '-', '_' and '.'"
        )
    return domain


def classifier_model_name(domain: str) -> str:
    return CLASSIFIER_PREFIX + _check_domain(domain)


def generator_model_name(domain: str) -> str:
    return GENERATOR_PREFIX + _check_domain(domain)


def parse_model_ref(ref: str, default_alias: str = CHAMPION) -> tuple[str, str | None, int | None]:
    """(name, alias, version) of a reference; exactly one of alias and version is set."""
    match = _MODEL_REF_RE.match(ref.strip()) if isinstance(ref, str) else None
    if match is None:
        raise ValueError(
            f"cannot read model reference {ref!r}; use NAME@ALIAS, NAME/VERSION, models:/NAME@ALIAS or "
            "models:/NAME/VERSION (e.g. meddiffuse-classifier-brain-mri@champion)"
        )
    name, alias, version = match["name"], match["alias"], match["version"]
    if version is not None:
        return name, None, int(version)
    return name, alias or default_alias, None


def resolve_model_uri(ref: str) -> str:
    """``models:/`` URI for ``models:/n@a``, ``n@a``, ``n/3``, ``models:/n/3`` or a bare ``n`` (= ``n@champion``).

    ``runs:/...`` and MLflow 3 logged-model URIs (``models:/m-<id>``) pass through unchanged.
    """
    ref = ref.strip()
    if ref.startswith("runs:/") or _LOGGED_MODEL_RE.match(ref):
        return ref
    name, alias, version = parse_model_ref(ref)
    return f"models:/{name}/{version}" if version is not None else f"models:/{name}@{alias}"


# -- client and errors -------------------------------------------------------------------------------


def registry_client(settings: Settings | None = None):
    """An ``MlflowClient`` on the configured tracking and registry URIs."""
    from mlflow import MlflowClient

    settings = settings or Settings()
    tracking = configure_mlflow(settings)
    return MlflowClient(tracking_uri=tracking, registry_uri=settings.registry_uri or tracking)


@contextlib.contextmanager
def _registry_errors(what: str) -> Iterator[None]:
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
        raise RegistryError(f"{what}: {message}") from exc


def _version_number(version: int | str) -> int:
    try:
        number = int(version)
    except (TypeError, ValueError):
        raise ValueError(f"model version must be a positive integer, got {version!r}") from None
    if number < 1:
        raise ValueError(f"model version must be a positive integer, got {version!r}")
    return number


# -- tags --------------------------------------------------------------------------------------------


def classifier_tags(
    *,
    domain: str,
    classes: list[str],
    arch: str,
    train_data: str,
    dataset_ids: Mapping[str, str],
    pretrained: str | None,
    metrics: Mapping[str, float],
) -> dict[str, str]:
    """The version tags every classifier carries (searchable in the MLflow UI)."""
    if train_data not in TRAIN_DATA_ORIGINS:
        raise ValueError(f"train_data must be one of {TRAIN_DATA_ORIGINS} (TRTR, TSTR, mixed), got {train_data!r}")
    tags = {
        "meddiffuse.kind": "classifier",
        "domain": domain,
        "classes": json.dumps(list(classes)),
        "architecture": arch,
        "train_data": train_data,
        "pretrained": pretrained or "none",
    }
    for role, dataset_id in dataset_ids.items():
        tags[DATASET_TAG_PREFIX + _check_tag_part(role, "dataset role")] = str(dataset_id)
    for metric, value in _check_metrics(metrics).items():
        tags[METRIC_TAG_PREFIX + metric] = repr(value)
    return tags


def _check_tag_part(part: str, what: str) -> str:
    if not _NAME_RE.match(part):
        raise ValueError(f"{what} {part!r} cannot be part of a tag key: use letters, digits, '-', '_' and '.'")
    return part


def _check_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    checked: dict[str, float] = {}
    for name, value in metrics.items():
        _check_tag_part(name, "metric")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"metric {name!r} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"metric {name!r} must be finite, got {value!r}")
        checked[name] = number
    return checked


def tag_version(
    name: str, version: int | str, tags: Mapping[str, Any], settings: Settings | None = None
) -> None:
    """Set tags on one model version (values are stored as strings)."""
    client = registry_client(settings)
    number = _version_number(version)
    with _registry_errors(f"cannot tag {name} version {number}"):
        client.get_model_version(name, str(number))
        for key, value in tags.items():
            client.set_model_version_tag(name, str(number), key, str(value))


# -- aliases -----------------------------------------------------------------------------------------


def set_alias(name: str, alias: str, version: int | str, settings: Settings | None = None) -> None:
    """Point ``alias`` at ``version`` of ``name`` (the version must exist)."""
    client = registry_client(settings)
    number = _version_number(version)
    with _registry_errors(f"cannot set alias {alias!r} of {name} to version {number}"):
        client.get_model_version(name, str(number))
        client.set_registered_model_alias(name, alias, str(number))


def promote(
    name: str, version: int | str, alias: str = CHAMPION, settings: Settings | None = None
) -> Promotion:
    """Move ``alias`` (default ``champion``) to ``version``; returns the version that held it before.

    Only the named alias moves (see the module docstring): exactly what moving it in the MLflow UI does.
    """
    client = registry_client(settings)
    number = _version_number(version)
    with _registry_errors(f"cannot promote {name} version {number} to {alias!r}"):
        target = client.get_model_version(name, str(number))
        if target.status != "READY":
            raise RegistryError(f"{name} version {number} is {target.status}, not READY; it cannot be served")
        previous = client.get_registered_model(name).aliases.get(alias)
        client.set_registered_model_alias(name, alias, str(number))
    return Promotion(name, alias, number, int(previous) if previous is not None else None)


# -- listing -----------------------------------------------------------------------------------------


def list_model_names(prefix: str = "meddiffuse-", settings: Settings | None = None) -> list[str]:
    """Registered model names starting with ``prefix``, sorted."""
    client = registry_client(settings)
    with _registry_errors("cannot list registered models"):
        models = client.search_registered_models()
    return sorted(m.name for m in models if m.name.startswith(prefix))


def list_versions(name: str, settings: Settings | None = None) -> list[VersionSummary]:
    """Every version of ``name``, newest first, with its aliases, tags and ``metric.*`` tags as metrics."""
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid registered model name {name!r}")
    client = registry_client(settings)
    with _registry_errors(f"cannot list versions of {name}"):
        aliases = client.get_registered_model(name).aliases  # search results leave aliases out
        versions = client.search_model_versions(f"name = '{name}'")
    by_version: dict[int, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(int(version), []).append(alias)
    summaries = [_summary(v, sorted(by_version.get(int(v.version), []))) for v in versions]
    return sorted(summaries, key=lambda s: s.version, reverse=True)


def describe_version(ref: str, settings: Settings | None = None) -> VersionSummary:
    """The version a reference points at now (an alias resolved to its current version)."""
    name, alias, version = parse_model_ref(ref)
    client = registry_client(settings)
    with _registry_errors(f"cannot find {resolve_model_uri(ref)}"):
        if version is not None:
            mv = client.get_model_version(name, str(version))
        else:
            mv = client.get_model_version_by_alias(name, alias)
        aliases = client.get_registered_model(name).aliases
    return _summary(mv, sorted(a for a, v in aliases.items() if int(v) == int(mv.version)))


def _summary(mv: Any, aliases: list[str]) -> VersionSummary:
    tags = dict(mv.tags or {})
    metrics: dict[str, float] = {}
    for key, value in tags.items():
        if key.startswith(METRIC_TAG_PREFIX):
            with contextlib.suppress(ValueError):
                metrics[key[len(METRIC_TAG_PREFIX) :]] = float(value)
    created = (
        datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=UTC) if mv.creation_timestamp else None
    )
    return VersionSummary(
        name=mv.name,
        version=int(mv.version),
        aliases=aliases,
        tags=tags,
        metrics=metrics,
        run_id=mv.run_id,
        status=str(mv.status),
        created_at=created,
        source=mv.source,
        description=mv.description,
    )


# -- registering -------------------------------------------------------------------------------------


def register_logged_model(
    model_uri: str,
    name: str,
    *,
    tags: Mapping[str, Any] | None = None,
    alias: str | None = None,
    settings: Settings | None = None,
) -> ModelVersionInfo:
    """Register an already logged model (any flavour, e.g. the generator pyfunc) as a new version of
    ``name`` with ``tags``, and optionally point ``alias`` at it."""
    import mlflow

    if not _NAME_RE.match(name):
        raise ValueError(f"invalid registered model name {name!r}")
    registry_client(settings)  # points mlflow at the configured registry
    str_tags = {k: str(v) for k, v in (tags or {}).items()}
    with _registry_errors(f"cannot register {model_uri} as {name}"):
        mv = mlflow.register_model(model_uri, name, tags=str_tags)
    info = ModelVersionInfo(name, int(mv.version), mv.run_id, f"models:/{name}/{mv.version}")
    if alias:
        set_alias(name, alias, info.version, settings)
    return info


def register_classifier(
    model: torch.nn.Module,
    *,
    domain: str,
    classes: list[str],
    arch: str,
    input_example: np.ndarray,
    train_data: str,
    dataset_ids: dict[str, str],
    pretrained: str | None,
    metrics: dict[str, float],
    extra_tags: dict[str, str] | None = None,
    settings: Settings | None = None,
    alias: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> ModelVersionInfo:
    """Log ``model`` (PyTorch flavour, signature, input example, preprocessing JSON) and register it as a
    new version of ``meddiffuse-classifier-<domain>``, tagged for search; optionally set ``alias``.

    ``input_example`` is an N x C x H x W float array as the model receives it (after preprocessing);
    ``metadata`` adds to the preprocessing record (e.g. ``mean``, ``std``, ``resolution``). The run is the
    active MLflow run if there is one (the training run), else a new run in ``meddiffuse-classifier``.
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    name = classifier_model_name(domain)
    classes = _check_classes(classes)
    example = _check_example(input_example)
    tags = classifier_tags(
        domain=domain, classes=classes, arch=arch, train_data=train_data,
        dataset_ids=dataset_ids, pretrained=pretrained, metrics=metrics,
    )
    tags |= {k: str(v) for k, v in (extra_tags or {}).items()}
    preprocessing = _preprocessing_record(domain, classes, arch, example, metadata)

    with _exportable(model) as cpu_model:
        with torch.no_grad():
            outputs = cpu_model(torch.from_numpy(example))
        if outputs.ndim != 2 or outputs.shape[1] != len(classes):
            raise ValueError(
                f"model outputs shape {tuple(outputs.shape)} for the input example; expected "
                f"({example.shape[0]}, {len(classes)}): one logit per class of {classes}"
            )
        signature = infer_signature(example, outputs.numpy())
        configure_mlflow(settings or Settings())
        run = _classifier_run(domain, arch, train_data, pretrained, dataset_ids, settings)
        with run, tempfile.TemporaryDirectory() as tmp:
            json_path = Path(tmp) / PREPROCESSING_FILE
            json_path.write_text(json.dumps(preprocessing, indent=2, sort_keys=True))
            mlflow.log_metrics(_check_metrics(metrics))
            mlflow.set_tags({k: v for k, v in tags.items() if not k.startswith(METRIC_TAG_PREFIX)})
            with _registry_errors(f"cannot log classifier {name}"):
                logged = mlflow.pytorch.log_model(
                    cpu_model,
                    name=MODEL_ARTIFACT,
                    signature=signature,
                    input_example=example,
                    serialization_format="pt2",
                    extra_files=[str(json_path)],
                    metadata={"meddiffuse": preprocessing},
                    # given, not inferred: inference re-imports the model in a subprocess (slow, and
                    # it may try the network)
                    pip_requirements=pinned_requirements("torch", "numpy"),
                )
    return register_logged_model(logged.model_uri, name, tags=tags, alias=alias, settings=settings)


def _check_classes(classes: list[str]) -> list[str]:
    classes = [str(c) for c in classes]
    if len(classes) < 2:
        raise ValueError(f"a classifier needs at least two classes, got {classes}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"class names must be unique, got {classes}")
    return classes


def _check_example(input_example: np.ndarray) -> np.ndarray:
    if not isinstance(input_example, np.ndarray) or input_example.ndim != 4:
        shape = getattr(input_example, "shape", None)
        raise ValueError(f"input_example must be an N x C x H x W numpy array, got {type(input_example).__name__} "
                         f"of shape {shape}")
    if not np.issubdtype(input_example.dtype, np.floating):
        raise ValueError(f"input_example must be floating point (as the model receives it), got {input_example.dtype}")
    if input_example.shape[0] == 0:
        raise ValueError("input_example is empty (batch size 0)")
    example = np.ascontiguousarray(input_example, dtype=np.float32)
    if example.shape[0] == 1:
        # torch.export freezes a batch dimension of size 1; two rows keep it dynamic
        example = np.concatenate([example, example], axis=0)
    return example


def _preprocessing_record(
    domain: str, classes: list[str], arch: str, example: np.ndarray, metadata: dict[str, Any] | None
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "format_version": 1,
        "domain": domain,
        "classes": classes,
        "arch": arch,
        "in_chans": int(example.shape[1]),
        "channels": int(example.shape[1]),  # image channels; metadata may say 1 for a 3-channel model
        "input_size": [int(example.shape[2]), int(example.shape[3])],
        "layout": "NCHW",
        "dtype": "float32",
    }
    for key, value in (metadata or {}).items():
        expected = record.get(key)
        # a square side, as Classifier.metadata() records it, is compared as [side, side]
        compared = [value, value] if key == "input_size" and isinstance(value, int) else value
        if key in ("classes", "in_chans", "input_size") and compared != expected:
            raise ValueError(f"metadata[{key!r}] = {value!r} contradicts the model: {expected!r}")
        if key == "channels" and value not in (1, 3):
            raise ValueError(f"metadata['channels'] must be 1 or 3, got {value!r}")
        record[key] = value
    try:
        json.dumps(record)
    except TypeError as exc:
        raise ValueError(f"classifier metadata must be JSON-serialisable: {exc}") from None
    return record


@contextlib.contextmanager
def _exportable(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model on the CPU in eval mode (a copy if it lives elsewhere); the caller's mode is restored."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    on_cpu = all(t.device.type == "cpu" for t in tensors)
    target = model if on_cpu else copy.deepcopy(model).cpu()
    was_training = model.training
    target.eval()
    try:
        yield target
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _classifier_run(
    domain: str,
    arch: str,
    train_data: str,
    pretrained: str | None,
    dataset_ids: Mapping[str, str],
    settings: Settings | None,
) -> Iterator[Any]:
    import mlflow

    active = mlflow.active_run()
    if active is not None:  # the caller's training run: log there, leave it open
        yield active
        return
    params = {"domain": domain, "arch": arch, "train_data": train_data, "pretrained": pretrained or "none"}
    params |= {f"dataset_{role}": dataset_id for role, dataset_id in dataset_ids.items()}
    with tracked_run(CLASSIFIER_EXPERIMENT, f"{domain}-{arch}-{train_data}", settings, params=params) as run:
        yield run


def pinned_requirements(*packages: str) -> list[str]:
    pinned = []
    for package in packages:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            pinned.append(f"{package}=={importlib.metadata.version(package)}")
    return pinned


# -- loading -----------------------------------------------------------------------------------------


class RegisteredClassifier(torch.nn.Module):
    """A classifier loaded from the registry: the exported graph plus its metadata.

    The graph was captured in eval mode and cannot switch modes (``torch.export`` graphs refuse
    ``train()``/``eval()``), so ``train()`` here only records the flag: callers may call ``.eval()``.
    """

    def __init__(self, graph: torch.nn.Module, metadata: dict[str, Any]) -> None:
        super().__init__()
        self.graph = graph
        self.metadata = metadata
        self.classes: list[str] = list(metadata.get("classes", []))
        self.training = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)

    def train(self, mode: bool = True) -> RegisteredClassifier:
        self.training = mode
        return self


def load_classifier_model(
    ref: str, settings: Settings | None = None
) -> tuple[RegisteredClassifier, dict[str, Any]]:
    """The classifier a reference points at (``models:/meddiffuse-classifier-brain-mri@champion``, ...)
    and its metadata: the preprocessing record plus ``name``, ``version``, ``model_uri`` (pinned to the
    version, for provenance) and the version's tags."""
    import mlflow.pytorch

    summary = describe_version(ref, settings)
    with tempfile.TemporaryDirectory(prefix="meddiffuse-model-") as tmp:
        local = _download(summary.uri, Path(tmp))
        metadata = _read_metadata(local, summary)
        with _registry_errors(f"cannot load {summary.uri}"):
            graph = mlflow.pytorch.load_model(str(local))
    return RegisteredClassifier(graph, metadata), metadata


def download_model(ref: str, out_dir: str | Path, settings: Settings | None = None) -> tuple[Path, dict[str, Any]]:
    """Copy the model version a reference points at into ``out_dir`` (an MLflow model folder that
    ``mlflow.pytorch.load_model(out_dir)`` loads) and return it with its metadata."""
    summary = describe_version(ref, settings)
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new folder for the model")
    out.mkdir(parents=True, exist_ok=True)
    local = _download(summary.uri, out)
    return local, _read_metadata(local, summary)


def _download(uri: str, dst: Path) -> Path:
    import mlflow.artifacts

    with _registry_errors(f"cannot download {uri}"):
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))


def _read_metadata(local: Path, summary: VersionSummary) -> dict[str, Any]:
    path = local / "extra_files" / PREPROCESSING_FILE
    if not path.is_file():
        raise RegistryError(
            f"{summary.uri} has no {PREPROCESSING_FILE}: it was not registered by register_classifier, "
            "so its preprocessing is unknown"
        )
    metadata = json.loads(path.read_text())
    metadata |= {
        "name": summary.name,
        "version": summary.version,
        "model_uri": summary.uri,
        "aliases": summary.aliases,
        "tags": summary.tags,
        "metrics": summary.metrics,
    }
    return metadata
