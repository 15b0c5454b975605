"""MLflow tracking: one place that points MLflow at the configured store (SQLite by default)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from meddiffuse.config import Settings
from meddiffuse.registry.client import configure_mlflow


def ensure_experiment(name: str, settings: Settings | None = None) -> str:
    """Experiment id for ``name``, created with artifacts under the configured location if missing."""
    import mlflow

    settings = settings or Settings()
    configure_mlflow(settings)
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None if settings.tracking_uri else settings.artifact_location
    return mlflow.create_experiment(name, artifact_location=location)


@contextlib.contextmanager
def tracked_run(
    experiment: str,
    run_name: str,
    settings: Settings | None = None,
    tags: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    nested: bool = False,
) -> Iterator[Any]:
    """``with tracked_run("meddiffuse-generator", "brain-mri") as run:`` — an MLflow run, params logged."""
    import mlflow

    exp_id = ensure_experiment(experiment, settings)
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags, nested=nested) as run:
        if params:
            mlflow.log_params({k: _param(v) for k, v in params.items()})
        yield run


def _param(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 500 else s[:497] + "..."
