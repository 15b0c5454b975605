"""The platform end to end, driven as a user would (``make e2e``; see docs/PLATFORM.md).

On a fresh stack (``python -m deploy.stack up`` on free ports, its own state folder and databases):

1. the stack is up, every component answers, and a second start is refused;
2. the ``study/local`` deployment runs through the Prefect API (create_flow_run, then poll) with tiny presets;
3. the registry holds the generator and the classifiers; the synthetic manifest pins the generator version;
4. the services serve the champions (``/generate``, ``/predict`` name their versions);
5. in headless Chromium the ``champion`` alias moves in the MLflow UI to another version, clicked and typed as a
   person would (screenshot docs/screenshots/mlflow-alias.png); the explainer names the new version within
   ``serve.reload_interval_s``; the Prefect UI shows the run (docs/screenshots/prefect-run.png);
6. S3 hangs (SIGSTOP: moto keeps objects in memory, so a restart would lose them) while a ``generate-dataset``
   run is in flight: its shard tasks retry, and after SIGCONT the run completes with exactly N images per class
   and no duplicates;
7. ``kill -9`` of the explainer; ``restart explainer``; it serves the champion again;
8. ``down`` leaves nothing running: no PID of the state file alive, every port free.

The timings go to docs/screenshots/e2e.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
STATE_DIR = ROOT / ".meddiffuse" / "e2e-stack"
SCREENSHOTS = ROOT / "docs" / "screenshots"
RESULTS_FILE = SCREENSHOTS / "e2e.json"
CHROMIUM = os.environ.get("MEDDIFFUSE_E2E_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
DOMAIN = "brain-mri"
CLASSIFIER = f"meddiffuse-classifier-{DOMAIN}"
GENERATOR = f"meddiffuse-generator-{DOMAIN}"
EXPERIMENT = "e2e"
RELOAD_INTERVAL_S = 5.0
FAULT_PER_CLASS = 8
FAULT_PREFIX = "synthetic/e2e-s3-outage"
S3_PAUSE_S = 25.0
# short S3 timeouts, so that a hung S3 fails a shard (and Prefect retries it) within seconds; more task retries
# than the default so that the shard outlives the outage
STACK_ENV = {
    "MEDDIFFUSE_S3__TIMEOUT_S": "5",
    "MEDDIFFUSE_S3__RETRIES": "2",
    "MEDDIFFUSE_S3__BACKOFF_S": "0.5",
    "MEDDIFFUSE_FLOWS__TASK_RETRIES": "8",
    "MEDDIFFUSE_FLOWS__RETRY_DELAY_S": "2",
    "MEDDIFFUSE_SERVE__RELOAD_INTERVAL_S": str(RELOAD_INTERVAL_S),
    "MEDDIFFUSE_SERVE__DOMAINS": json.dumps([DOMAIN]),
}
STUDY_CONFIG = {
    "name": EXPERIMENT, "phantoms_per_class": 16, "resolution": 32, "train_fraction": 0.5,
    "generator_preset": "tiny", "generator_steps": 20, "checkpoint_every": 10, "sampling_steps": 4,
    "archs": ["resnet18"], "weights": "none", "input_size": 32, "epochs": 1, "batch_size": 16,
    "early_stopping_patience": None, "explain_per_model": 0, "lime_samples": 10, "audit": False, "bootstrap": 0,
    "synthetic_multiple": 1.0,  # as many synthetic images as real ones, not the study recipe's 512 per class
}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

T0 = time.monotonic()  # the whole e2e, from the import of this module to the end of the stack's teardown
RESULTS: dict[str, Any] = {"steps": {}, "seconds": {}, "started_at": datetime.now(UTC).isoformat(timespec="seconds")}
DONE: set[str] = set()


def need(*steps: str) -> None:
    missing = [s for s in steps if s not in DONE]
    if missing:
        pytest.skip(f"needs the earlier step(s) {missing}, which did not pass")


def passed(step: str, seconds: float | None = None) -> None:
    DONE.add(step)
    RESULTS["steps"][step] = "passed"
    if seconds is not None:
        RESULTS["seconds"][step] = round(seconds, 1)


# -- the stack, through its command line ----------------------------------------------------------------------


def stack_cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "deploy.stack", "--state-dir", str(STATE_DIR), *args]
    return subprocess.run(cmd, cwd=ROOT, env=(env or os.environ.copy()), capture_output=True, text=True,
                          timeout=timeout, check=False)


def state() -> dict[str, Any]:
    return json.loads((STATE_DIR / "state.json").read_text())


def comp(name: str) -> dict[str, Any]:
    return state()["components"][name]


def client_env() -> dict[str, str]:
    """The client settings the stack wrote to stack.env (``source``-able), as a dict."""
    out = {}
    for line in (STATE_DIR / "stack.env").read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        out[key] = value.strip("'")
    return out


@pytest.fixture(scope="module")
def stack():
    t0 = time.monotonic()
    if (STATE_DIR / "state.json").exists():  # a previous e2e run that did not get to its teardown
        stack_cli("down", timeout=180)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDDIFFUSE_", "PREFECT_", "MLFLOW_"))}
    env |= STACK_ENV | {"MEDDIFFUSE_STACK_DB_PREFIX": "meddiffuse_e2e"}
    up = stack_cli("up", "--ports", "auto", timeout=900, env=env)
    (STATE_DIR / "e2e-up.out").write_text(up.stdout + up.stderr)
    RESULTS["seconds"]["stack_up"] = round(time.monotonic() - t0, 1)
    if up.returncode != 0:
        pytest.fail(f"make stack failed ({up.returncode}):\n{(up.stdout + up.stderr)[-6000:]}")
    print(up.stdout)
    saved = dict(os.environ)
    os.environ.update(client_env())  # this process is a client too (registry, store)
    try:
        yield state()
    finally:
        if (STATE_DIR / "state.json").exists():  # the teardown test did not run or did not finish
            stack_cli("down", timeout=300)
        os.environ.clear()
        os.environ.update(saved)
        RESULTS["seconds"]["stack_lifetime"] = round(time.monotonic() - t0, 1)
        RESULTS["seconds"]["total"] = round(time.monotonic() - T0, 1)
        RESULTS["target_total_s"] = 600
        RESULTS["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        RESULTS["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "load_average_1m_at_end": round(os.getloadavg()[0], 2)}
        RESULTS["passed"] = sorted(DONE)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        RESULTS_FILE.write_text(json.dumps(RESULTS, indent=2) + "\n")


# -- HTTP helpers ---------------------------------------------------------------------------------------------


def api(method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
    import httpx

    response = httpx.request(method, f"{state()['api']}{path}", json=body, timeout=timeout)
    response.raise_for_status()
    return response.json()


def key_header() -> dict[str, str]:
    return {"X-API-Key": client_env()["MEDDIFFUSE_SERVE__API_KEY"]}


def run_deployment(flow: str, deployment: str, parameters: dict[str, Any]) -> str:
    dep = api("GET", f"/deployments/name/{flow}/{deployment}")
    run = api("POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": parameters})
    return run["id"]


def wait_flow_run(run_id: str, timeout: float, on_poll=None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        run = api("GET", f"/flow_runs/{run_id}")
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        if on_poll is not None:
            on_poll(run)
        if time.monotonic() > deadline:
            pytest.fail(f"flow run {run_id} still {run['state']['type']} after {timeout:.0f} s; worker log:\n"
                        + Path(comp("worker")["log"]).read_text(errors="replace")[-5000:])
        time.sleep(2)


def task_runs(flow_run_id: str) -> list[dict[str, Any]]:
    return api("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200})


def wait_ready(name: str, timeout: float = 120) -> None:
    import httpx

    url = comp(name)["url"]
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=3).status_code == 200:
                return
        if time.monotonic() > deadline:
            pytest.fail(f"{name} not ready after {timeout:.0f} s; log:\n"
                        + Path(comp(name)["log"]).read_text(errors="replace")[-4000:])
        time.sleep(0.5)


def a_real_png() -> bytes:
    from meddiffuse.config import Settings
    from meddiffuse.data.dataset import open_dataset
    from meddiffuse.experiment import ExperimentPaths
    from meddiffuse.store import create_store

    store = create_store(Settings())
    prefix = ExperimentPaths(EXPERIMENT).real
    entry = open_dataset(store, prefix).manifest.select("test")[0]
    return store.get(f"{prefix}/{entry.key}")


def predict_version(png: bytes) -> str:
    import httpx

    response = httpx.post(f"{comp('explainer')['url']}/predict", params={"domain": DOMAIN}, headers=key_header(),
                          files=[("images", ("x.png", png, "image/png"))], timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body[0]["model_version"] == response.headers["X-Model-Version"]
    return body[0]["model_version"]


def champion(name: str) -> int:
    from meddiffuse.config import Settings
    from meddiffuse.registry import resolve

    return resolve(f"{name}@champion", Settings()).version


# -- the walk-through ---------------------------------------------------------------------------------------


def test_a_component_that_fails_to_start_is_named_and_the_rest_is_stopped():
    """A setting the services refuse (reload interval above 10 s) makes them exit at start-up: ``up`` names the
    component with its log's tail, stops what had started, and leaves no state behind."""
    from deploy.stack.stack import State, is_alive, port_bindable

    fail_dir = ROOT / ".meddiffuse" / "e2e-stack-fail"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDDIFFUSE_", "PREFECT_", "MLFLOW_"))}
    env |= {"MEDDIFFUSE_SERVE__RELOAD_INTERVAL_S": "50", "MEDDIFFUSE_STACK_DB_PREFIX": "meddiffuse_e2efail"}
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "deploy.stack", "--state-dir", str(fail_dir), "up", "--ports", "auto"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert re.search(r"error: (generator|trainer|explainer) exited with code 1", out.stderr), out.stderr[-3000:]
    assert "reload_interval_s" in out.stderr  # the log's tail names the cause
    started = {name: (int(pid), int(port)) for name, pid, port in
               re.findall(r"\[stack\] (\S+): started pid (\d+) on port (\d+)", out.stdout)}
    assert {"s3", "mlflow", "prefect"} <= set(started), out.stdout
    assert not [n for n, (pid, _) in started.items() if is_alive(pid)], "a component outlived the failed start"
    assert all(port_bindable(port) for _, port in started.values()), "a port is still in use"
    assert State.load(fail_dir) is None
    passed("failed_start", time.monotonic() - t0)


def test_stack_is_up_and_a_second_start_is_refused(stack):
    import httpx

    for name in ("s3", "mlflow", "prefect", "generator", "trainer", "explainer", "worker"):
        rec = stack["components"][name]
        assert rec["pid"] and Path(f"/proc/{rec['pid']}").exists(), f"{name} is not running"
    assert httpx.get(f"{comp('mlflow')['url']}/health", timeout=10).status_code == 200
    assert httpx.get(f"{stack['api']}/health", timeout=10).status_code == 200
    for name in ("generator", "trainer", "explainer"):
        assert httpx.get(f"{comp(name)['url']}/livez", timeout=10).status_code == 200
    assert "study/local" in stack["deployments"] and "generate-dataset/local" in stack["deployments"]
    again = stack_cli("up", "--ports", "auto", timeout=120)
    assert again.returncode == 2, again.stdout + again.stderr
    assert "already running" in again.stderr
    passed("stack_up")


def test_study_deployment_runs_through_the_prefect_api(stack):
    need("stack_up")
    t0 = time.monotonic()
    run_id = run_deployment("study", "local", {"domains": [DOMAIN], "config": STUDY_CONFIG})
    RESULTS["study_flow_run"] = run_id
    run = wait_flow_run(run_id, timeout=900)
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n" + Path(comp("worker")["log"]).read_text()[-6000:]
    passed("study", time.monotonic() - t0)


def test_registry_holds_the_models_with_pinned_lineage(stack):
    need("study")
    from meddiffuse.config import Settings
    from meddiffuse.data.dataset import open_dataset
    from meddiffuse.experiment import ExperimentPaths
    from meddiffuse.registry import list_versions
    from meddiffuse.store import create_store

    settings = Settings()
    classifiers = list_versions(CLASSIFIER, settings)
    generators = list_versions(GENERATOR, settings)
    assert len(classifiers) >= 3, classifiers  # resnet18 on real, synthetic and mixed data
    assert generators, "no generator registered"
    gen_version = champion(GENERATOR)
    manifest = open_dataset(create_store(settings), ExperimentPaths(EXPERIMENT).synthetic).manifest
    origins = {e.origin.generator for e in manifest.entries}
    assert origins == {f"models:/{GENERATOR}/{gen_version}"}, origins
    RESULTS["registry"] = {"classifier_versions": sorted(v.version for v in classifiers),
                           "classifier_champion": champion(CLASSIFIER), "generator_champion": gen_version,
                           "synthetic_origin": sorted(origins)[0]}
    passed("registry")


def test_services_serve_the_champions(stack):
    need("registry")
    import httpx

    wait_ready("generator")
    wait_ready("explainer")
    response = httpx.post(f"{comp('generator')['url']}/generate", headers=key_header(), timeout=120,
                          json={"domain": DOMAIN, "label": "glioma", "n": 1, "steps": 4})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["X-Model-Version"] == f"{GENERATOR}/{champion(GENERATOR)}"
    assert httpx.post(f"{comp('generator')['url']}/generate", timeout=30, json={"domain": DOMAIN, "label": "glioma"}
                      ).status_code == 401  # no key, no images
    assert predict_version(a_real_png()) == f"{CLASSIFIER}/{champion(CLASSIFIER)}"
    passed("services")


def _close_assistant(page) -> None:
    """MLflow 3.17 opens an "MLflow Assistant" side panel by default; a person would close it."""
    with contextlib.suppress(Exception):
        page.locator("[data-assistant-ui] button[aria-label*='lose']").first.click(timeout=2000)


def test_champion_moves_in_the_mlflow_ui_and_the_explainer_follows(stack):
    need("services")
    from playwright.sync_api import sync_playwright

    from meddiffuse.config import Settings
    from meddiffuse.registry import list_versions

    before = champion(CLASSIFIER)
    target = max(v.version for v in list_versions(CLASSIFIER, Settings()) if v.version != before)
    png = a_real_png()
    url = f"{comp('mlflow')['url']}/#/models/{CLASSIFIER}/versions/{target}"
    t0 = time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            aliases = page.locator("[data-testid=descriptions-item]", has_text="Aliases")
            aliases.wait_for(timeout=60_000)
            _close_assistant(page)
            aliases.locator("button[title$='aliases']").first.click()  # "Add" (title "Add aliases") or the pencil
            dialog = page.get_by_role("dialog")
            box = dialog.get_by_role("combobox")
            box.click()
            box.press_sequentially("champion", delay=40)
            box.press("Enter")
            dialog.get_by_text(f"also being used on version {before}").wait_for(timeout=10_000)
            page.screenshot(path=str(SCREENSHOTS / "mlflow-alias-dialog.png"))
            dialog.get_by_role("button", name="Save aliases").click()
            dialog.wait_for(state="hidden", timeout=30_000)
            saved_at = time.monotonic()
            aliases.get_by_text("champion").wait_for(timeout=30_000)
            page.get_by_text(f"Version {target}").first.wait_for()
            page.screenshot(path=str(SCREENSHOTS / "mlflow-alias.png"))
        finally:
            browser.close()
    assert champion(CLASSIFIER) == target
    while (version := predict_version(png)) != f"{CLASSIFIER}/{target}":
        assert time.monotonic() - saved_at < RELOAD_INTERVAL_S + 3, (
            f"the explainer still serves {version} {time.monotonic() - saved_at:.1f} s after the alias moved")
        time.sleep(0.25)
    followed = time.monotonic() - saved_at
    import httpx

    models = httpx.get(f"{comp('explainer')['url']}/models", headers=key_header(), timeout=30).json()
    RESULTS["alias_move"] = {"from": before, "to": target, "explainer_followed_after_s": round(followed, 2),
                             "reload_interval_s": RELOAD_INTERVAL_S,
                             "webhook_deliveries": (models.get("webhooks") or {}).get("received")}
    RESULTS["promoted_version"] = target
    assert followed <= RELOAD_INTERVAL_S + 3
    passed("ui_promote", time.monotonic() - t0)


def test_prefect_ui_shows_the_study_run(stack):
    need("study")
    from playwright.sync_api import sync_playwright

    run_id = RESULTS["study_flow_run"]
    run = api("GET", f"/flow_runs/{run_id}")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{comp('prefect')['url']}/runs/flow-run/{run_id}")
            page.get_by_text(run["name"]).first.wait_for(timeout=60_000)
            page.get_by_text("Completed").first.wait_for(timeout=60_000)
            time.sleep(2)  # the timeline and the logs render after the header
            page.screenshot(path=str(SCREENSHOTS / "prefect-run.png"))
        finally:
            browser.close()
    passed("prefect_ui")


def test_s3_outage_during_generate_dataset_is_retried_to_exact_counts(stack):
    need("registry")
    from meddiffuse.config import Settings
    from meddiffuse.data.dataset import open_dataset
    from meddiffuse.store import create_store

    spec = {"generator": f"{GENERATOR}@champion", "per_class": FAULT_PER_CLASS, "prefix": FAULT_PREFIX,
            "shard_size": 2, "batch_size": 8, "sampling_steps": 8, "seed": 7}
    t0 = time.monotonic()
    run_id = run_deployment("generate-dataset", "local", {"spec": spec})
    s3 = comp("s3")
    fault: dict[str, Any] = {}

    def maybe_pause(run: dict[str, Any]) -> None:
        if fault or run["state"]["type"] != "RUNNING":
            return
        shards = [t for t in task_runs(run_id) if t["name"].startswith("shard-")]
        if any(t["state"]["type"] == "COMPLETED" for t in shards):  # the model is loaded; shards are writing
            paused = stack_cli("pause", "s3", timeout=30)
            assert paused.returncode == 0, paused.stderr
            fault["paused_at"] = time.monotonic() - t0
            fault["shards_done_before"] = sum(t["state"]["type"] == "COMPLETED" for t in shards)
            time.sleep(S3_PAUSE_S)
            resumed = stack_cli("resume", "s3", timeout=30)
            assert resumed.returncode == 0, resumed.stderr
            fault["resumed_at"] = time.monotonic() - t0

    try:
        run = wait_flow_run(run_id, timeout=600, on_poll=maybe_pause)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(s3["pgid"], signal.SIGCONT)
    assert fault, "the run finished before any shard was written: S3 was never paused"
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n" + Path(comp("worker")["log"]).read_text()[-6000:]
    shards = [t for t in task_runs(run_id) if t["name"].startswith("shard-")]
    retried = [t["name"] for t in shards if t["run_count"] > 1]
    assert retried, "no shard task retried during the S3 outage"
    manifest = open_dataset(create_store(Settings()), FAULT_PREFIX).manifest
    counts = Counter(e.label for e in manifest.entries)
    assert set(counts.values()) == {FAULT_PER_CLASS}, counts
    assert len({e.key for e in manifest.entries}) == len(manifest.entries), "duplicate keys"
    assert len({e.sha256 for e in manifest.entries}) == len(manifest.entries), "duplicate images"
    seeds = [(e.label, e.origin.seed) for e in manifest.entries]
    assert len(set(seeds)) == len(seeds), "duplicate seeds"
    RESULTS["s3_outage"] = fault | {"pause_s": S3_PAUSE_S, "shards": len(shards), "retried_shards": len(retried),
                                    "max_run_count": max(t["run_count"] for t in shards),
                                    "images_per_class": dict(counts), "s3_kind": state()["s3_kind"]}
    passed("s3_outage", time.monotonic() - t0)


def test_explainer_survives_kill_9_and_serves_the_champion_again(stack):
    need("services")
    import httpx

    old = comp("explainer")
    os.kill(old["pid"], signal.SIGKILL)  # as `kill -9 <pid>` would: BentoML's worker processes are orphaned
    deadline = time.monotonic() + 30
    while Path(f"/proc/{old['pid']}").exists() and (Path(f"/proc/{old['pid']}/stat").read_text().split(") ")[1][0]
                                                    not in "ZX"):
        assert time.monotonic() < deadline, "the explainer did not die of SIGKILL"
        time.sleep(0.1)
    t0 = time.monotonic()
    restarted = stack_cli("restart", "explainer", timeout=300)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    RESULTS["explainer_restart"] = {"output": [line for line in restarted.stdout.splitlines() if line]}
    new = comp("explainer")
    assert new["pid"] != old["pid"]
    wait_ready("explainer")
    expected = f"{CLASSIFIER}/{champion(CLASSIFIER)}"
    if "promoted_version" in RESULTS:
        assert expected == f"{CLASSIFIER}/{RESULTS['promoted_version']}"
    assert predict_version(a_real_png()) == expected
    assert httpx.get(f"{new['url']}/readyz", timeout=10).status_code == 200
    passed("explainer_restart", time.monotonic() - t0)


def test_teardown_leaves_nothing_running(stack):
    need("stack_up")
    from deploy.stack.stack import group_members, is_alive, marked_processes, port_bindable

    before = state()
    t0 = time.monotonic()
    down = stack_cli("down", timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    RESULTS["seconds"]["teardown"] = round(time.monotonic() - t0, 1)
    alive = {n: c["pid"] for n, c in before["components"].items() if is_alive(c["pid"])}
    assert not alive, f"still alive: {alive}"
    groups = {n: group_members(c["pgid"]) for n, c in before["components"].items() if group_members(c["pgid"])}
    assert not groups, f"process groups still populated: {groups}"
    assert not marked_processes(before["stack_id"]), "processes of the stack are still running"
    busy = {n: p for n, p in before["ports"].items() if n in before["components"] and not port_bindable(p)}
    assert not busy, f"ports still in use: {busy}"
    assert not (STATE_DIR / "state.json").exists()
    passed("teardown", time.monotonic() - t0)
