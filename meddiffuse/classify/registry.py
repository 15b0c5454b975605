"""The classifier's registry format: the library's own ``Classifier``, rebuilt whole from the registry.

A version holds ``classifier/`` — the same two files as a store copy (``model.safetensors``, then
``classifier.json`` with the complete input contract: architecture, classes, channels, dataset
resolution, crop, input size, mean/std, pretrained source) — logged as an MLflow pyfunc, so
``mlflow.pyfunc.load_model`` also predicts (N x H x W x C images -> probabilities) for other runtimes.
``load_registered_classifier`` rebuilds the timm model from those files: a ``models:/`` classifier
predicts, gives ``features()``, explains and audits exactly like the one trained.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from meddiffuse.classify.classifier import Classifier
from meddiffuse.classify.persist import METADATA_FILE, load_classifier_from_store, save_classifier
from meddiffuse.config import Settings
from meddiffuse.data.dataset import TRAIN_DATA_ORIGINS
from meddiffuse.registry import (
    ModelVersionInfo,
    PinnedVersion,
    RegistryError,
    classifier_model_name,
    configure_mlflow,
    parse_model_ref,
    register_logged_model,
    resolve,
)
from meddiffuse.registry.client import quiet_mlflow, registry_errors
from meddiffuse.registry.versions import check_metrics, dataset_tags, metric_tags, pinned_requirements
from meddiffuse.store.local import LocalStore

log = logging.getLogger(__name__)

ARTIFACT_KEY = "classifier"
EXPERIMENT = "meddiffuse-classifier"

try:  # mlflow is a dependency; keep this module importable for the type if it is absent
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object  # type: ignore[misc,assignment]


class ClassifierPyfunc(PythonModel):
    """``predict``: N x H x W x C images (uint8, or float in [0, 1]) -> N x K class probabilities."""

    # predict takes arrays/rows, not typed inputs: MLflow's type-hint validation (and its warning) does not apply
    _skip_type_hint_validation = True

    def __init__(self) -> None:
        self.classifier: Classifier | None = None

    def load_context(self, context):
        self.classifier = _load_folder(Path(context.artifacts[ARTIFACT_KEY]))

    def predict(self, context, model_input, params=None):
        if self.classifier is None:
            self.load_context(context)
        return self.classifier.predict_proba(np.asarray(model_input))


def classifier_tags(
    *,
    domain: str,
    classifier: Classifier,
    train_data: str,
    dataset_ids: Mapping[str, str],
    metrics: Mapping[str, float],
) -> dict[str, str]:
    """The version tags every classifier carries (searchable in the MLflow UI)."""
    if train_data not in TRAIN_DATA_ORIGINS:
        raise ValueError(f"train_data must be one of {TRAIN_DATA_ORIGINS} (TRTR, TSTR, mixed), got {train_data!r}")
    return {
        "meddiffuse.kind": "classifier",
        "domain": domain,
        "classes": json.dumps(list(classifier.classes)),
        "architecture": classifier.arch,
        "train_data": train_data,
        "pretrained": classifier.pretrained_source or "none",
        "resolution": str(classifier.resolution),
        **dataset_tags(dataset_ids),
        **metric_tags(metrics),
    }


def register_classifier(
    clf: Classifier,
    *,
    domain: str,
    train_data: str,
    dataset_ids: Mapping[str, str],
    metrics: Mapping[str, float],
    extra_tags: Mapping[str, str] | None = None,
    alias: str | None = None,
    settings: Settings | None = None,
) -> ModelVersionInfo:
    """Log ``clf`` and register it as a new version of ``meddiffuse-classifier-<domain>``.

    The run is the active MLflow run if there is one (the training run), else a new run.
    """
    import mlflow

    from meddiffuse.store.tracking import tracked_run

    if len(clf.classes) < 2:
        raise ValueError(f"a classifier needs at least two classes, got {clf.classes}")
    name = classifier_model_name(domain)
    tags = classifier_tags(domain=domain, classifier=clf, train_data=train_data, dataset_ids=dataset_ids,
                           metrics=metrics) | {k: str(v) for k, v in (extra_tags or {}).items()}
    settings = settings or Settings()
    configure_mlflow(settings)
    run = None
    if mlflow.active_run() is None:
        params = {"domain": domain, "arch": clf.arch, "train_data": train_data,
                  "pretrained": clf.pretrained_source or "none"}
        run = tracked_run(EXPERIMENT, f"{domain}-{clf.arch}-{train_data}", settings, params=params)
        run.__enter__()
    try:
        with tempfile.TemporaryDirectory(prefix="meddiffuse-classifier-") as tmp:
            save_classifier(clf, LocalStore(tmp), ARTIFACT_KEY)
            mlflow.log_metrics(check_metrics(metrics))
            mlflow.set_tags({k: v for k, v in tags.items() if not k.startswith("metric.")})
            with registry_errors(f"cannot log classifier {name}"), warnings.catch_warnings(), quiet_mlflow():
                warnings.filterwarnings("ignore", message=".*An input example was not provided")
                logged = mlflow.pyfunc.log_model(
                    name=ARTIFACT_KEY,
                    python_model=ClassifierPyfunc(),
                    artifacts={ARTIFACT_KEY: str(Path(tmp) / ARTIFACT_KEY)},
                    metadata={"meddiffuse": clf.metadata()},
                    # given, not inferred: inferring re-imports the model in a subprocess (slow, may try the network)
                    pip_requirements=pinned_requirements("torch", "timm", "safetensors", "numpy"),
                )
    finally:
        if run is not None:
            run.__exit__(None, None, None)
    info = register_logged_model(logged.model_uri, name, tags=tags, alias=alias, settings=settings)
    log.info("registered %s", info.uri)
    return info


def load_registered_classifier(
    ref: str | PinnedVersion, settings: Settings | None = None, device: str | None = None
) -> Classifier:
    """The classifier a reference points at (``meddiffuse-classifier-all@champion``, ``.../3``, a
    ``PinnedVersion``), rebuilt as the library's ``Classifier``; ``clf.registered`` names the version."""
    import mlflow.artifacts

    pinned = ref if isinstance(ref, PinnedVersion) else resolve(ref, settings)
    configure_mlflow(settings)
    with tempfile.TemporaryDirectory(prefix="meddiffuse-model-") as tmp:
        with registry_errors(f"cannot download {pinned.uri}"):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=pinned.uri, dst_path=tmp))
        clf = _load_folder(local)
    if device is not None:
        clf.to(device)
    elif settings is not None:
        clf.to(settings.torch_device())
    clf.model.eval()
    clf.registered = pinned
    return clf


def _load_folder(local: Path) -> Classifier:
    """The classifier in a downloaded model folder (its ``artifacts/classifier/`` sub-folder)."""
    found = sorted(local.glob(f"**/{METADATA_FILE}"))
    if not found:
        raise RegistryError(f"{local} holds no {METADATA_FILE}: not a classifier registered by meddiffuse")
    folder = found[0].parent
    return load_classifier_from_store(LocalStore(folder.parent), folder.name)


def is_classifier_ref(ref: str) -> bool:
    try:
        return parse_model_ref(ref).name.startswith("meddiffuse-classifier-")
    except ValueError:
        return False
