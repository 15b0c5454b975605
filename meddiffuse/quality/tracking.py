"""Audit results in MLflow: metrics in an ``meddiffuse-audit`` run, verdict tags on the generator version.

A synthetic manifest names its generator in each entry's ``origin.generator``. When that is a
registered model (``models:/name/3`` or ``models:/name@alias``) the version gets ``audit.*`` tags, so
whoever promotes it in the MLflow UI sees whether its samples passed. Anything else (a path, a
missing model) is skipped and the reason recorded: an audit never fails because of its bookkeeping.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import Any

from meddiffuse.config import Settings
from meddiffuse.quality.persist import save_audit
from meddiffuse.quality.result import AuditResult, Section
from meddiffuse.store.base import ObjectStore
from meddiffuse.store.tracking import configure_mlflow, tracked_run

log = logging.getLogger(__name__)

EXPERIMENT = "meddiffuse-audit"
_FIDELITY_METRICS = ("frechet_distance", "kid", "kid_std", "precision", "recall", "density", "coverage",
                     "c2st_accuracy", "c2st_p_value")


def _metric_key(*parts: str) -> str:
    # MLflow accepts letters, digits, _ - . space : /; anything else in a class or space name becomes _
    return "/".join(re.sub(r"[^A-Za-z0-9_\-. :]", "_", p) for p in parts)


def _section_metrics(section: Section) -> dict[str, float]:
    out: dict[str, float] = {}
    for space, scores in section.fidelity.items():
        for name in _FIDELITY_METRICS:
            value = getattr(scores, name)
            if value is not None:
                out[_metric_key(section.label, space, name)] = float(value)
    for name in ("synthetic_ms_ssim", "real_ms_ssim"):
        value = getattr(section.diversity, name)
        if value is not None:
            out[_metric_key(section.label, "diversity", name)] = float(value)
    out[_metric_key(section.label, "memorization", "flagged_share")] = section.memorization.flagged_share
    return out


def audit_metrics(result: AuditResult) -> dict[str, float]:
    """Flat ``{metric key: value}`` for MLflow: ``<class|overall>/<space>/<metric>`` plus the verdict."""
    metrics = {"passed": float(result.passed), "flagged_share": result.gate.flagged_share}
    for name, space in result.memorization.spaces.items():
        metrics[_metric_key("memorization", name, "threshold")] = space.threshold
        metrics[_metric_key("memorization", name, "flagged_share")] = space.flagged_share
    for section in (result.overall, *result.per_class.values()):
        metrics.update(_section_metrics(section))
    return metrics


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None] | None:
    """``models:/name/3`` -> (name, "3", None); ``models:/name@champion`` -> (name, None, "champion")."""
    if not uri.startswith("models:/"):
        return None
    rest = uri[len("models:/") :].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return (name, None, alias) if name and alias else None
    name, _, version = rest.rpartition("/")
    return (name, version, None) if name and version.isdigit() else None


def generator_tags(result: AuditResult, run_id: str | None) -> dict[str, str]:
    tags = {
        "audit.passed": str(result.passed).lower(),
        "audit.flagged_share": f"{result.gate.flagged_share:.6f}",
        "audit.gate": f"{result.gate.max_flagged_share:.6f}",
        "audit.synthetic_dataset": f"{result.synthetic.prefix}@{result.synthetic.id}",
        "audit.verdict": result.verdict(),
    }
    if run_id:
        tags["audit.run_id"] = run_id
    for space, scores in result.overall.fidelity.items():
        if scores.frechet_distance is not None:
            tags[f"audit.fd.{space}"] = f"{scores.frechet_distance:.6g}"
    return tags


def tag_generator_versions(
    result: AuditResult, settings: Settings | None = None, run_id: str | None = None
) -> dict[str, str]:
    """Tag every registered generator version the synthetic manifest names; ``{uri: outcome}``."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    outcomes: dict[str, str] = {}
    if not result.synthetic.generators:
        return outcomes
    configure_mlflow(settings)
    client = MlflowClient()
    for uri in result.synthetic.generators:
        parsed = parse_model_uri(uri)
        if parsed is None:
            outcomes[uri] = "skipped: not a registered model version (models:/name/<version> or @alias)"
            continue
        name, version, alias = parsed
        try:
            if alias is not None:
                version = client.get_model_version_by_alias(name, alias).version
            for key, value in generator_tags(result, run_id).items():
                client.set_model_version_tag(name, str(version), key, value)
            outcomes[uri] = f"tagged {name} version {version}"
        except MlflowException as exc:
            outcomes[uri] = f"skipped: {exc.message if hasattr(exc, 'message') else exc}"
            log.warning("audit: could not tag generator %s: %s", uri, exc)
    return outcomes


def log_audit(result: AuditResult, settings: Settings | None = None) -> str:
    """Log metrics, parameters and the audit files to an MLflow run; returns the run id."""
    import mlflow

    params: dict[str, Any] = {
        "synthetic": result.synthetic.prefix, "synthetic_id": result.synthetic.id,
        "real": result.real.prefix, "real_id": result.real.id, "domain": result.domain,
        "feature_spaces": ",".join(result.feature_spaces),
        "memorization_spaces": ",".join(result.memorization_spaces),
        "gate_flagged_share": result.gate.max_flagged_share, "percentile": result.memorization.percentile,
        "k": result.k, "seed": result.seed,
    }
    tags = {"domain": result.domain, "audit.passed": str(result.passed).lower(),
            "synthetic_dataset_id": result.synthetic.id, "real_dataset_id": result.real.id}
    with tracked_run(EXPERIMENT, f"audit {result.synthetic.name}", settings, tags=tags, params=params) as run:
        mlflow.log_metrics(audit_metrics(result))
        mlflow.log_text(result.model_dump_json(indent=2), "audit/audit.json")
        if result.pairs_png is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "closest-pairs.png"
                path.write_bytes(result.pairs_png)
                mlflow.log_artifact(str(path), "audit")
        return run.info.run_id


def record_audit(
    result: AuditResult, store: ObjectStore, settings: Settings | None = None, prefix: str | None = None
) -> str:
    """Save (under ``prefix``, default beside the dataset), log to MLflow, tag the generator version(s).

    Returns the key of ``audit.json``.

    Saved first so an unreachable tracking server never costs the audit itself; saved again at the
    end so ``audit.json`` names its MLflow run and the tagging outcome.
    """
    save_audit(result, store, prefix)
    run_id = log_audit(result, settings)
    result.tracking["run_id"] = run_id
    result.tracking["generator_tags"] = tag_generator_versions(result, settings, run_id)
    return save_audit(result, store, prefix)


__all__ = [
    "EXPERIMENT",
    "audit_metrics",
    "generator_tags",
    "log_audit",
    "parse_model_uri",
    "record_audit",
    "tag_generator_versions",
]
