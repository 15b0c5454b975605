"""The GPU work pool's base job template (``k8s/prefect/gpu-job-template.json``), rendered offline.

The template is Prefect's default Kubernetes template (``prefect work-pool get-default-base-job-template
--type kubernetes``) plus the variables that the default lacks (PrefectHQ/prefect#19779 is open):

- ``gpu_count`` → the container's ``resources.limits["nvidia.com/gpu"]``
- ``node_selector`` → the pod spec's ``nodeSelector``
- ``tolerations`` → the pod spec's ``tolerations``
- ``env_from`` → the container's ``envFrom`` (credentials from a Secret, never in job variables)

Unset (``None``, the default), each is dropped from the rendered Job, so a deployment without them gets
Prefect's default Job. ``render_job_manifest`` renders exactly as the worker does (``apply_values`` with the variables'
defaults, ``KubernetesWorkerJobConfiguration`` and its manifest checks, ``prepare_for_flow_run``) without a
Prefect server: ``from_template_and_values`` needs its client only to resolve ``{{ prefect.blocks.* }}`` and
``{{ prefect.variables.* }}`` placeholders, which this template has none of, so a stub stands in for it.

Pod-level ``completions``/``parallelism``: Prefect's default keeps ``completions: 1`` and ``parallelism: 1``
inside the *pod* spec (``spec.template.spec``), and the worker refuses a template without them there
("Job is missing required attributes"). They are not PodSpec fields: the API server drops them (with a
warning under its default field validation) and the Job's own defaults are 1 and 1, so they are harmless but
fail a strict schema check. We keep them in the template, as the worker demands, and ``wire_manifest`` moves
them to the Job spec (``spec.completions``/``spec.parallelism``, same values) — the Job the cluster ends up
running — before a strict validation.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_PATH = REPO_ROOT / "k8s" / "prefect" / "gpu-job-template.json"
GPU_LIMIT = "nvidia.com/gpu"
KUBERNETES_VERSION = "1.31.0"
POD_LEVEL_JOB_FIELDS = ("completions", "parallelism")


def load_template(path: Path | str | None = None) -> dict[str, Any]:
    return json.loads(Path(path or TEMPLATE_PATH).read_text())


def default_template() -> dict[str, Any]:
    """Prefect's default Kubernetes base job template (the installed prefect-kubernetes)."""
    from prefect_kubernetes.worker import KubernetesWorker

    return KubernetesWorker.get_default_base_job_template()


TOLERATION_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "properties": {"key": {"type": "string"}, "operator": {"type": "string", "enum": ["Exists", "Equal"]},
                   "value": {"type": "string"},
                   "effect": {"type": "string", "enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
                   "tolerationSeconds": {"type": "integer"}},
}
ENV_FROM_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "properties": {"prefix": {"type": "string"},
                   "secretRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                 "properties": {"name": {"type": "string"}, "optional": {"type": "boolean"}}},
                   "configMapRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                    "properties": {"name": {"type": "string"}, "optional": {"type": "boolean"}}}},
}
VARIABLES: dict[str, dict[str, Any]] = {
    "gpu_count": {
        "anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}], "default": None, "title": "GPU Count",
        "description": "NVIDIA GPUs for the job's container: becomes resources.limits[\"nvidia.com/gpu\"] "
                       "(Kubernetes sets the request equal to the limit for extended resources). "
                       "Unset: no GPU is requested.",
    },
    "node_selector": {
        "anyOf": [{"type": "object", "additionalProperties": {"type": "string"}}, {"type": "null"}],
        "default": None, "title": "Node Selector",
        "description": "Node labels the job's pod must match (pod spec nodeSelector). Unset: any node.",
        "examples": [{"nvidia.com/gpu.present": "true"}],
    },
    "tolerations": {
        "anyOf": [{"type": "array", "items": TOLERATION_SCHEMA}, {"type": "null"}], "default": None,
        "title": "Tolerations",
        "description": "Taints the job's pod tolerates (pod spec tolerations), e.g. GPU nodes tainted "
                       "nvidia.com/gpu:NoSchedule. Unset: none.",
        "examples": [[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]],
    },
    "env_from": {
        "anyOf": [{"type": "array", "items": ENV_FROM_SCHEMA}, {"type": "null"}], "default": None,
        "title": "Environment From",
        "description": "Secrets/ConfigMaps whose keys become the container's environment (container envFrom), "
                       "e.g. the store and registry credentials (MEDDIFFUSE_S3__ACCESS_KEY, ...), which must not "
                       "sit in job variables. Unset: none.",
        "examples": [[{"configMapRef": {"name": "meddiffuse-config"}}, {"secretRef": {"name": "meddiffuse-secrets"}}]],
    },
}


def build_template(default: dict[str, Any] | None = None) -> dict[str, Any]:
    """Prefect's default Kubernetes template plus ``VARIABLES`` and their placeholders: the content of
    ``k8s/prefect/gpu-job-template.json`` (``python k8s/prefect/render_job.py --write-template`` rewrites it)."""
    t = copy.deepcopy(default or default_template())
    pod = t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    container["resources"]["limits"][GPU_LIMIT] = "{{ gpu_count }}"
    container["envFrom"] = "{{ env_from }}"
    pod["nodeSelector"] = "{{ node_selector }}"
    pod["tolerations"] = "{{ tolerations }}"
    t["variables"]["properties"] |= copy.deepcopy(VARIABLES)
    return t


class _NoServer:
    """Stands in for the Prefect client: the template resolves no blocks or variables, so none is needed."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("this job template references Prefect blocks/variables: render it against a server "
                           "(KubernetesWorkerJobConfiguration.from_template_and_values with a client)")


def render_job_configuration(values: dict[str, Any] | None = None, template: dict[str, Any] | None = None):
    """The worker's ``KubernetesWorkerJobConfiguration`` for these job variables (a deployment's
    ``job_variables`` over the template's defaults), by the worker's own ``from_template_and_values``."""
    import asyncio

    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = template or load_template()
    return asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
        template, dict(values or {}), client=_NoServer()))


def render_job_manifest(values: dict[str, Any] | None = None, template: dict[str, Any] | None = None, *,
                        flow_run_name: str = "sample-run") -> dict[str, Any]:
    """The Job manifest the worker would submit for a flow run of a deployment with these job variables."""
    from uuid import uuid4

    from prefect.client.schemas.objects import FlowRun

    config = render_job_configuration(values, template)
    config.prepare_for_flow_run(FlowRun(id=uuid4(), name=flow_run_name, flow_id=uuid4()))
    return config.job_manifest


def wire_manifest(job: dict[str, Any]) -> dict[str, Any]:
    """The Job as the cluster runs it: pod-level ``completions``/``parallelism`` moved to the Job spec, and a
    ``metadata.name`` beside ``generateName`` (the API server makes one up; schema validators want one)."""
    job = copy.deepcopy(job)
    pod = job["spec"]["template"]["spec"]
    for key in POD_LEVEL_JOB_FIELDS:
        if key in pod:
            job["spec"].setdefault(key, pod.pop(key))
    meta = job.setdefault("metadata", {})
    if "name" not in meta and meta.get("generateName"):
        meta["name"] = meta["generateName"] + "00000"
    return job


def validate_job(job: dict[str, Any], version: str = KUBERNETES_VERSION, strict: bool = True) -> None:
    """Validate against the Kubernetes schema (``kubernetes-validate``); raises ``ValidationError``."""
    import kubernetes_validate

    kubernetes_validate.validate(job, version, strict=strict)
