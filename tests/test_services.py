"""The three BentoML services over HTTP (issue #12): real ``bentoml serve`` processes on loopback ports.

One module-scoped stack: a tiny registered classifier (two versions) and generator in a temporary home,
an ``mlflow server`` on the same SQLite registry, and the three services: generator and trainer on the
SQLite registry, the explainer on the MLflow server (1 s reload, webhook secret). Everything is stopped by
PID at the end. About 3-4 minutes on 2 cores.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.servicekit import (
    API_KEY,
    OFFLINE_ENV,
    ServiceProcess,
    build_models,
    free_port,
    leftover_pids,
    png,
    service_env,
    start_service,
    stop_all,
    wait_ready,
)

httpx = pytest.importorskip("httpx")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

KEY = {"X-API-Key": API_KEY}
BODY_LIMIT = 256 * 1024
WEBHOOK_SECRET = "webhook-secret-for-tests"
COMMON = {
    "api_key": API_KEY, "domains": '["brain-mri"]', "reload_interval_s": 1, "lime_samples": 100,
    "max_body_bytes": BODY_LIMIT, "threads": 4, "workers": 1, "max_images_per_request": 16,
    "max_images_per_task": 64, "predict_batch": 8, "max_concurrency": 32,
}
GENERATOR_CONCURRENCY = 4  # low on purpose: the 429 test fills it
TASKS: dict[str, str] = {}


@dataclass
class Stack:
    root: Path
    home: Path
    settings: Any
    models: Any
    generator: ServiceProcess
    trainer: ServiceProcess
    explainer: ServiceProcess  # follows the registry through the MLflow server (webhook, outage)
    mlflow: ServiceProcess

    @property
    def services(self) -> list[ServiceProcess]:
        return [self.generator, self.trainer, self.explainer]


def _start_mlflow(root: Path, home: Path, port: int, env: dict[str, str]) -> ServiceProcess:
    from cryptography.fernet import Fernet

    server_env = {**env, "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                  "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(),
                  "MLFLOW_WEBHOOK_CACHE_TTL": "1"}
    log_path = root / "logs" / f"mlflow-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
             f"sqlite:///{home / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=root, env=server_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return ServiceProcess("mlflow", f"http://127.0.0.1:{port}", proc, log_path, server_env)


def _wait_http(svc: ServiceProcess, path: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not svc.alive():
            raise RuntimeError(f"{svc.name} exited:\n{svc.log()[-3000:]}")
        try:
            if httpx.get(svc.url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{svc.name} not healthy:\n{svc.log()[-3000:]}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Servers start first (their imports take most of the time) while the models are built here; the
    generator and explainer pick up the champions within a reload interval of their registration."""
    from meddiffuse.config import Settings
    from meddiffuse.registry import registry_client

    root = tmp_path_factory.mktemp("services")
    home, bentoml_home, logs = root / "home", root / "bentoml", root / "logs"
    started: list[ServiceProcess] = []
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith(("MEDDIFFUSE_", "MLFLOW_TRACKING", "MLFLOW_REGISTRY")):
                mp.delenv(key)
        mp.setenv("MEDDIFFUSE_HOME", str(home))
        for key, value in OFFLINE_ENV.items():
            mp.setenv(key, value)
        try:
            settings = Settings(home=home)
            registry_client(settings).search_experiments()  # the SQLite schema exists before anyone else opens it
            ports = {name: free_port() for name in ("generator", "trainer", "explainer", "mlflow")}
            mlflow = _start_mlflow(root, home, ports["mlflow"], service_env(home, bentoml_home / "mlflow"))
            started.append(mlflow)
            # one BENTOML_HOME each: services sharing one share (and wipe) its Prometheus multiprocess folder
            env = {name: service_env(home, bentoml_home / name, **COMMON)
                   for name in ("generator", "trainer", "explainer")}
            env["generator"]["MEDDIFFUSE_SERVE__MAX_CONCURRENCY"] = str(GENERATOR_CONCURRENCY)
            env["explainer"].update(MEDDIFFUSE_TRACKING_URI=mlflow.url, MEDDIFFUSE_SERVE__WEBHOOK_SECRET=WEBHOOK_SECRET,
                                    MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
            procs = {name: start_service(f"services.{name}:{name.capitalize()}", ports[name], env[name], logs)
                     for name in ("generator", "trainer", "explainer")}
            started.extend(procs.values())
            t0 = time.monotonic()
            models = build_models(home)
            t1 = time.monotonic()
            _wait_http(mlflow, "/health")
            wait_ready(list(procs.values()), timeout=240)
            print(f"\nstack: models built in {t1 - t0:.0f} s, services ready {time.monotonic() - t0:.0f} s after start")
            yield Stack(root, home, settings, models, procs["generator"], procs["trainer"], procs["explainer"], mlflow)
        finally:
            leftovers = stop_all(started)
    for svc in started:
        assert not svc.alive(), f"{svc.name} still running"
    assert not leftover_pids(), "processes of this run are still running"
    if leftovers:
        warnings.warn(f"processes {leftovers} outlived their server and were ended by PID", stacklevel=1)


# -- helpers -----------------------------------------------------------------------------------------------


def _get(svc: ServiceProcess, path: str, **kw: Any) -> Any:
    return httpx.get(svc.url + path, headers={**KEY, **kw.pop("headers", {})}, timeout=60, **kw)


def _post(svc: ServiceProcess, path: str, **kw: Any) -> Any:
    return httpx.post(svc.url + path, headers={**KEY, **kw.pop("headers", {})}, timeout=120, **kw)


def _test_images(stack: Stack, n: int = 16) -> tuple[list[bytes], list[str]]:
    from meddiffuse.data.dataset import open_dataset
    from meddiffuse.store import create_store

    ds = open_dataset(create_store(stack.settings), stack.models.dataset)
    entries = ds.manifest.select("test")[:n]
    images, _ = ds.load_arrays(entries=entries)
    return [png(im) for im in images], [e.label for e in entries]


_classifiers: dict[int, Any] = {}


def _library_probs(stack: Stack, version: int, data: bytes) -> np.ndarray:
    """What the library computes in-process for this upload with this registered version."""
    from meddiffuse import tasks
    from meddiffuse.classify.registry import load_registered_classifier

    if version not in _classifiers:
        ref = f"{stack.models.classifier}/{version}"
        _classifiers[version] = load_registered_classifier(ref, stack.settings).optimize_for_inference()
    clf = _classifiers[version]
    return tasks.predict_images(clf, [tasks.decode_upload(clf, data)])[0]


def _served_version(svc: ServiceProcess) -> int:
    rows = _get(svc, "/models").json()["models"]
    return rows[0]["version"]


def _wait_task(svc: ServiceProcess, task: str, task_id: str, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _get(svc, f"/{task}/status", params={"task_id": task_id}).json()
        if status["status"] != "in_progress":
            break
        time.sleep(1)
    assert status["status"] == "completed", (status, svc.log()[-3000:])
    result = _get(svc, f"/{task}/get", params={"task_id": task_id})
    assert result.status_code == 200, result.text
    return result.json()


def _bomb_png() -> bytes:
    """A valid-looking PNG header claiming 100000 x 100000 pixels (PIL's bomb check refuses it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def _pil_png(mode: str) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    if mode == "I;16":
        image = Image.fromarray((rng.random((40, 40)) * 65535).astype(np.uint16))
    else:
        image = Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _raw_request(svc: ServiceProcess, head: str, body: bytes = b"", read: bool = True) -> tuple[int, socket.socket]:
    host, port = svc.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(head.encode() + b"\r\n" + body)
    if not read:
        return 0, sock
    data = sock.recv(65536)
    return int(data.split(b" ", 2)[1]), sock


# -- health, docs, metrics, auth -------------------------------------------------------------------------


def test_health_docs_and_metrics_are_open(stack):
    expected = {stack.generator: {"/generate", "/generate_dataset/submit", "/generate_dataset/status", "/models"},
                stack.trainer: {"/train_classifier/submit", "/train_generator/submit", "/train_classifier/get"},
                stack.explainer: {"/predict", "/explain", "/mlflow_webhook", "/models"}}
    for svc, paths in expected.items():
        for path in ("/healthz", "/livez", "/readyz"):
            assert httpx.get(svc.url + path, timeout=10).status_code == 200, (svc.name, path)
        metrics = httpx.get(svc.url + "/metrics", timeout=10)
        assert metrics.status_code == 200 and "# TYPE" in metrics.text
        docs = httpx.get(svc.url + "/docs.json", timeout=10)
        assert docs.status_code == 200
        doc = docs.json()
        assert paths <= set(doc["paths"]), (svc.name, sorted(doc["paths"]))
        assert doc["components"]["securitySchemes"]["ApiKey"]["name"] == "X-API-Key"
        text = json.dumps(doc)
        assert '"exclusiveMinimum": 0' not in text and '"exclusiveMaximum": 9' not in text  # OpenAPI 3.0 form


def test_api_key_is_required(stack):
    calls = [(stack.generator, "GET", "/models"), (stack.explainer, "GET", "/models"),
             (stack.trainer, "GET", "/train_classifier/status?task_id=x"),
             (stack.explainer, "POST", "/predict"), (stack.generator, "POST", "/generate")]
    for svc, method, path in calls:
        for headers in ({}, {"X-API-Key": "wrong"}):
            response = httpx.request(method, svc.url + path, headers=headers, timeout=10)
            assert response.status_code == 401, (svc.name, path, response.text)
            body = response.json()
            assert "API key" in body["error"] and body["request_id"] == response.headers["x-request-id"]
    assert _get(stack.generator, "/models").status_code == 200
    assert _get(stack.trainer, "/train_classifier/status", params={"task_id": "nope"}).status_code == 404


def test_request_id_is_echoed_or_generated_and_logged(stack):
    mine = _get(stack.explainer, "/models", headers={"X-Request-ID": "trace-me-123"})
    assert mine.headers["x-request-id"] == "trace-me-123"
    generated = _get(stack.explainer, "/models")
    assert len(generated.headers["x-request-id"]) == 32
    odd = _get(stack.explainer, "/models", headers={"X-Request-ID": "bad id with spaces"})
    assert odd.headers["x-request-id"] != "bad id with spaces"
    time.sleep(0.3)
    lines = [json.loads(line) for line in stack.explainer.log().splitlines() if "trace-me-123" in line]
    assert lines and lines[-1]["status"] == 200 and lines[-1]["path"] == "/models"


# -- tasks are submitted early and checked late, so they train while the rest runs --------------------------


def test_submit_tasks(stack):
    clf = {"domain": "brain-mri", "arch": "resnet18", "weights": "none", "input_size": 32, "epochs": 1,
           "bootstrap": 0, "seed": 11, "train": [stack.models.dataset], "test": stack.models.dataset}
    gen = {"domain": "brain-mri", "dataset": stack.models.dataset, "generator_preset": "tiny", "generator_steps": 10,
           "checkpoint_every": 5, "seed": 2}
    data = {"domain": "brain-mri", "per_class": 3, "prefix": "synthetic/svc", "sampling_steps": 4, "batch_size": 8,
            "shard_size": 2, "seed": 5}
    for svc, task, body in ((stack.trainer, "train_classifier", clf), (stack.trainer, "train_generator", gen),
                            (stack.generator, "generate_dataset", data)):
        response = _post(svc, f"/{task}/submit", json=body)
        assert response.status_code == 200, response.text
        TASKS[task] = response.json()["task_id"]


# -- generator ---------------------------------------------------------------------------------------------


def test_generate_one_png_reproducible(stack):
    from PIL import Image

    body = {"domain": "brain-mri", "label": "glioma", "n": 1, "steps": 4, "seed": 7}
    first = _post(stack.generator, "/generate", json=body)
    assert first.status_code == 200, first.text
    assert first.headers["content-type"] == "image/png"
    assert first.headers["x-model-version"] == f"{stack.models.generator}/{stack.models.generator_version}"
    image = Image.open(io.BytesIO(first.content))
    assert image.size == (32, 32) and image.mode == "L"
    again = _post(stack.generator, "/generate", json=body)
    assert again.content == first.content  # same seed, same bytes
    other = _post(stack.generator, "/generate", json={**body, "seed": 8})
    assert other.status_code == 200 and other.content != first.content


def test_generate_zip_of_the_requested_class(stack):
    from PIL import Image

    body = {"domain": "brain-mri", "label": "pituitary_tumor", "n": 5, "steps": 4, "seed": 3}
    response = _post(stack.generator, "/generate", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    manifest = json.loads(archive.read("manifest.json"))
    pngs = [n for n in archive.namelist() if n.endswith(".png")]
    assert len(pngs) == 5 and manifest["n"] == 5 and manifest["label"] == "pituitary"  # the alias, canonical
    assert manifest["model_version"] == response.headers["x-model-version"]
    assert manifest["model"]["version"] == stack.models.generator_version
    for i, row in enumerate(manifest["images"]):
        assert row["file"] == f"pituitary-{i}-seed{row['seed']}.png" == pngs[i]
        image = Image.open(io.BytesIO(archive.read(row["file"])))
        assert image.size == (32, 32)
    assert len({row["seed"] for row in manifest["images"]}) == 5
    again = zipfile.ZipFile(io.BytesIO(_post(stack.generator, "/generate", json=body).content))
    assert all(again.read(n) == archive.read(n) for n in pngs)  # reproducible image by image


def test_generate_refuses_bad_requests(stack):
    base = {"domain": "brain-mri", "label": "glioma", "n": 2, "steps": 4}
    cases = [({"n": 0}, 400), ({"n": 17}, 400), ({"domain": "nowhere"}, 400), ({"domain": "all"}, 404),
             ({"label": "banana"}, 400), ({"sampler": "nope"}, 400), ({"steps": 0}, 400), ({"guidance": -1}, 400),
             ({"seed": -1}, 400)]
    for change, status in cases:
        response = _post(stack.generator, "/generate", json={**base, **change})
        assert response.status_code == status, (change, response.text)
        assert response.json()["error"]
    garbage = _post(stack.generator, "/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert garbage.status_code == 400
    assert httpx.get(stack.generator.url + "/readyz", timeout=10).status_code == 200


# -- explainer ---------------------------------------------------------------------------------------------


def test_explain_returns_weights_overlay_and_version(stack):
    from PIL import Image

    images, _ = _test_images(stack, 1)
    response = _post(stack.explainer, "/explain", files={"image": ("x.png", images[0], "image/png")},
                     data={"domain": "brain-mri", "seed": "1"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == response.headers["x-model-version"]
    assert body["model"]["name"] == stack.models.classifier
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-4 and len(body["probabilities"]) == 4
    assert body["weights"] and set(map(int, body["weights"])) >= set(body["top_segments"])
    assert np.array(body["segments"]).shape == (32, 32)
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert overlay.format == "PNG" and overlay.size[0] >= 32
    assert isinstance(body["faithfulness"], float) and body["num_samples"] == 100
    expected = _library_probs(stack, body["model"]["version"], images[0])
    assert np.allclose(list(body["probabilities"].values()), expected, atol=1e-4)


def test_predict_under_concurrency_matches_the_library(stack):
    images, _ = _test_images(stack, 16)
    jobs = [[images[(i + k) % len(images)] for k in range(1 + i % 3)] for i in range(40)]

    def call(group: list[bytes]) -> tuple[Any, list[bytes]]:
        files = [("images", (f"{k}.png", data, "image/png")) for k, data in enumerate(group)]
        return _post(stack.explainer, "/predict", files=files), group

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, jobs))
    for response, group in results:
        assert response.status_code == 200, response.text
        rows = response.json()
        assert len(rows) == len(group)
        assert response.headers["x-model-version"] == rows[0]["model_version"]
        for row, data in zip(rows, group, strict=True):
            version = int(row["model_version"].rsplit("/", 1)[1])
            expected = _library_probs(stack, version, data)
            assert np.allclose(list(row["probabilities"].values()), expected, atol=1e-4), (row, expected)
    metrics = httpx.get(stack.explainer.url + "/metrics", timeout=10).text
    assert "adaptive_batch_size" in metrics


def test_moved_alias_is_served_within_the_reload_interval(stack):
    from meddiffuse.registry import promote

    name = stack.models.classifier
    before = _served_version(stack.explainer)
    target = next(v for v in stack.models.classifier_versions if v != before)
    images, _ = _test_images(stack, 2)
    seen: list[tuple[int, str, float]] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(timeout=60, headers=KEY) as client:
            while not stop.is_set():
                r = client.post(stack.explainer.url + "/predict", files=[("images", ("a.png", images[0], "image/png"))])
                seen.append((r.status_code, r.headers.get("x-model-version", ""), time.monotonic()))

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        promote(name, target, settings=stack.settings)
        t0 = time.monotonic()
        deadline = t0 + 20
        while time.monotonic() < deadline and not any(v == f"{name}/{target}" for _, v, _ in seen):
            time.sleep(0.05)
        served_after = next((ts for _, v, ts in seen if v == f"{name}/{target}"), None)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert served_after is not None, "the moved alias was never served"
    elapsed = served_after - t0
    assert elapsed <= 1 + 6, f"served {elapsed:.1f} s after the promotion (reload interval 1 s)"
    assert seen and all(status == 200 for status, _, _ in seen), [s for s in seen if s[0] != 200][:5]
    assert {v for _, v, _ in seen} <= {f"{name}/{before}", f"{name}/{target}"}
    assert _served_version(stack.explainer) == target
    print(f"alias move served after {elapsed:.2f} s, {len(seen)} requests, all 200")


# -- the bad-input corpus ----------------------------------------------------------------------------------


def test_bad_inputs_get_4xx_and_the_services_stay_ready(stack):
    images, _ = _test_images(stack, 1)
    good = images[0]
    exp = stack.explainer
    results: list[tuple[str, int, int | set[int]]] = []

    def check(name: str, response: Any, expected: int | set[int]) -> None:
        results.append((name, response.status_code, expected))

    def upload(path: str, field: str, data: bytes, ctype: str = "image/png", **kw: Any) -> Any:
        rid = kw.pop("rid")
        return _post(exp, path, files={field: ("upload.png", data, ctype)}, headers={"X-Request-ID": rid}, **kw)

    corpus = {
        "non-image": (b"this is plain text, not an image at all", 400),
        "truncated": (good[: len(good) // 2], 400),
        "zero-bytes": (b"", 400),
        "bomb": (_bomb_png(), 400),
        "png16": (_pil_png("I;16"), 200),
        "rgba": (_pil_png("RGBA"), 200),
        "palette": (_pil_png("P"), 200),
    }
    for path, field in (("/predict", "images"), ("/explain", "image")):
        for name, (data, status) in corpus.items():
            check(f"{path} {name}", upload(path, field, data, rid=f"bad-{path[1:]}-{name}"), status)
        check(f"{path} png-as-jpeg", upload(path, field, good, "image/jpeg", rid=f"bad-{path[1:]}-jpeg"), 415)
        check(f"{path} text-part", _post(exp, path, files={field: (None, "abc")}), 400)
        check(f"{path} urlencoded", _post(exp, path, data={field: "http://127.0.0.1:1/x.png"}), 415)
        check(f"{path} json", _post(exp, path, json={field: "abc" if field == "image" else ["abc"]}), 400)
        check(f"{path} json-object", _post(exp, path, json={field: {}}), 400)
        check(f"{path} no-boundary", _post(exp, path, content=b"--x\r\n\r\n",
                                           headers={"content-type": "multipart/form-data"}), 400)
        check(f"{path} broken-multipart", _post(exp, path, content=b"--XYZ\r\nContent-Disposition: form-data; nam",
                                                headers={"content-type": "multipart/form-data; boundary=XYZ"}),
              {400, 422})
        check(f"{path} missing-part", _post(exp, path, files={"other": ("a.png", good, "image/png")}), 400)
        check(f"{path} unknown-domain", _post(exp, path, files={field: ("a.png", good, "image/png")},
                                              params={"domain": "mars"}), 400)
        check(f"{path} unserved-domain", _post(exp, path, files={field: ("a.png", good, "image/png")},
                                               params={"domain": "covid-ct"}), 404)
        big = b"0" * (BODY_LIMIT + 1000)
        check(f"{path} oversize", _post(exp, path, files={field: ("a.png", big, "image/png")}), 413)

        def chunks():
            for _ in range(10):
                yield b"x" * (BODY_LIMIT // 8)

        check(f"{path} chunked-oversize", _post(exp, path, content=chunks(),
                                                headers={"content-type": "multipart/form-data; boundary=XYZ"}), 413)
        check(f"{path} no-key", httpx.post(exp.url + path, files={field: ("a.png", good)}, timeout=10), 401)
        check(f"{path} wrong-key", httpx.post(exp.url + path, files={field: ("a.png", good)}, timeout=10,
                                              headers={"X-API-Key": "nope"}), 401)
    check("too many images", _post(exp, "/predict", files=[("images", (f"{i}.png", good, "image/png"))
                                                           for i in range(9)]), 400)
    check("explain samples", _post(exp, "/explain", files={"image": ("a.png", good, "image/png")},
                                   data={"num_samples": "100000"}), 400)
    status, sock = _raw_request(exp, f"POST /predict HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\n"
                                     "Content-Type: multipart/form-data; boundary=XYZ\r\n"
                                     "Content-Length: 900000000\r\n")
    sock.close()
    results.append(("declared huge body", status, 413))
    wrong = [(name, got, want) for name, got, want in results
             if not (got in want if isinstance(want, set) else got == want)]
    assert not wrong, wrong
    assert all(got < 500 for _, got, _ in results)
    for svc in stack.services:
        assert httpx.get(svc.url + "/readyz", timeout=10).status_code == 200
    time.sleep(0.5)
    logged = [json.loads(line) for line in exp.log().splitlines() if '"bad-' in line and line.startswith("{")]
    assert logged and not [row for row in logged if "exc" in row], "a client error was logged with a traceback"
    assert {row["status"] for row in logged if "status" in row} <= {200, 400, 415}


# -- tasks: results and refusals ---------------------------------------------------------------------------


def test_task_results(stack):
    from meddiffuse.data.dataset import open_dataset
    from meddiffuse.registry import resolve
    from meddiffuse.store import create_store

    if len(TASKS) < 3:
        pytest.skip("the tasks were not submitted")
    data = _wait_task(stack.generator, "generate_dataset", TASKS["generate_dataset"])
    ds = open_dataset(create_store(stack.settings), "synthetic/svc")
    assert data["dataset_id"] == ds.id and data["n"] == len(ds.manifest.entries) == 12
    counts = {c: sum(e.label == c for e in ds.manifest.entries) for c in ds.classes}
    assert set(counts.values()) == {3}, counts
    pinned = f"models:/{stack.models.generator}/{stack.models.generator_version}"
    assert data["generator"] == pinned and {e.origin.generator for e in ds.manifest.entries} == {pinned}
    assert data["model_version"] == f"{stack.models.generator}/{stack.models.generator_version}"

    clf = _wait_task(stack.trainer, "train_classifier", TASKS["train_classifier"])
    assert clf["run_id"] and clf["model_version"] == f"{clf['name']}/{clf['version']}"
    assert clf["name"] == stack.models.classifier and clf["version"] not in stack.models.classifier_versions
    assert 0 <= clf["metrics"]["accuracy"] <= 1 and clf["evaluation"]["n"] > 0
    assert resolve(clf["uri"], stack.settings).run_id == clf["run_id"]

    gen = _wait_task(stack.trainer, "train_generator", TASKS["train_generator"])
    assert gen["run_id"] and gen["version"] and gen["alias"] == "challenger"  # champion untouched
    assert _served_version(stack.generator) == stack.models.generator_version


def test_invalid_task_bodies_are_refused_at_submit(stack):
    p = stack.models.dataset
    ok_clf = {"domain": "brain-mri", "arch": "resnet18", "train": [p], "test": p}
    ok_gen = {"domain": "brain-mri", "dataset": p, "generator_preset": "tiny"}
    ok_set = {"domain": "brain-mri", "per_class": 2, "prefix": "synthetic/x"}
    cases = [
        (stack.trainer, "/train_classifier/submit", {**ok_clf, "arch": "resnet1888"}, "unknown architecture"),
        (stack.trainer, "/train_classifier/submit", {**ok_clf, "train": ["datasets/none"]}, "no dataset"),
        (stack.trainer, "/train_classifier/submit", {**ok_clf, "test": "datasets/none"}, "no dataset"),
        (stack.trainer, "/train_classifier/submit", {**ok_clf, "domain": "mars"}, "unknown domain"),
        (stack.trainer, "/train_classifier/submit", {**ok_clf, "domain": "all"}, "not those of all"),
        (stack.trainer, "/train_classifier/submit", {**ok_clf, "epochs": 0}, "epochs"),
        (stack.trainer, "/train_classifier/submit", {"domain": "brain-mri"}, "train"),
        (stack.trainer, "/train_generator/submit", {**ok_gen, "generator_preset": "huge"}, "unknown generator preset"),
        (stack.trainer, "/train_generator/submit", {**ok_gen, "dataset": "datasets/none"}, "no dataset"),
        (stack.trainer, "/train_generator/submit", {**ok_gen, "domain": "covid-ct"}, "not those of covid-ct"),
        (stack.generator, "/generate_dataset/submit", {**ok_set, "per_class": 17}, "max_images_per_task"),
        (stack.generator, "/generate_dataset/submit", {**ok_set, "classes": ["banana"]}, "not a class"),
        (stack.generator, "/generate_dataset/submit", {**ok_set, "prefix": "../etc"}, "plain store path"),
        (stack.generator, "/generate_dataset/submit", {**ok_set, "generator": "meddiffuse-generator-all@champion"},
         "not a version"),
        (stack.generator, "/generate_dataset/submit", {**ok_set, "domain": "all"}, "not served"),
    ]
    for svc, path, body, words in cases:
        response = _post(svc, path, json=body)
        assert 400 <= response.status_code < 500, (path, body, response.text)
        assert words in response.json()["error"], (words, response.json())
    for svc, path in ((stack.trainer, "/train_classifier/submit"), (stack.generator, "/generate_dataset/submit")):
        assert _post(svc, path, content=b"[1,", headers={"content-type": "application/json"}).status_code == 400
    for svc, path in ((stack.trainer, "/train_classifier"), (stack.generator, "/generate_dataset")):
        response = _post(svc, path, json=ok_clf)
        assert response.status_code == 404 and "submit" in response.json()["error"]
    submitted = [line for line in stack.trainer.log().splitlines() if "is submitted" in line]
    assert len(submitted) == 2, submitted  # only the two valid tasks of test_submit_tasks were ever queued


def test_concurrency_limit_gives_429(stack):
    socks = []
    try:
        for _ in range(GENERATOR_CONCURRENCY):  # requests whose bodies never finish arriving
            _, sock = _raw_request(stack.generator, f"POST /generate HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\n"
                                   "Content-Type: application/json\r\nContent-Length: 1000\r\n", b'{"domain"',
                                   read=False)
            socks.append(sock)
        time.sleep(0.5)
        assert _get(stack.generator, "/models").status_code == 429
        assert httpx.get(stack.generator.url + "/readyz", timeout=10).status_code == 200  # probes bypass it
    finally:
        for sock in socks:
            sock.close()
    deadline = time.monotonic() + 10
    while _get(stack.generator, "/models").status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _get(stack.generator, "/models").status_code == 200


# -- schemathesis: no input makes a server error -----------------------------------------------------------


@pytest.mark.parametrize("name", ["generator", "trainer", "explainer"])
def test_schemathesis_finds_no_server_error(stack, name):
    svc = getattr(stack, name)
    cmd = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{svc.url}/docs.json",
           "--checks", "not_a_server_error", "-H", f"X-API-Key: {API_KEY}", "--max-examples", "15", "--seed", "1",
           "--workers", "1", "--request-timeout", "60", "--no-color"]
    t0 = time.monotonic()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=stack.root,
                         env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false", "NO_COLOR": "1"})
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "generated" in run.stdout and "failed" not in run.stdout.split("Test cases:")[-1]
    print(f"schemathesis {name}: {time.monotonic() - t0:.1f} s")
    assert httpx.get(svc.url + "/readyz", timeout=10).status_code == 200


# -- MLflow webhook and a registry outage -------------------------------------------------------------------


def _sign(body: bytes, delivery: str = "d-1", ts: str | None = None) -> dict[str, str]:
    from services.common import webhook_signature

    ts = ts or str(int(time.time()))
    return {"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": ts,
            "X-MLflow-Signature": webhook_signature(WEBHOOK_SECRET, delivery, ts, body),
            "content-type": "application/json"}


def test_mlflow_webhook_pushes_a_moved_alias(stack):
    """MLflow's real delivery reaches /mlflow_webhook with a valid signature and re-resolves the alias (the
    explainer polls every 0.5 s too, so this checks the delivery and the refresh, not that it was faster)."""
    from mlflow import MlflowClient

    name = stack.models.classifier
    client = MlflowClient(tracking_uri=stack.mlflow.url, registry_uri=stack.mlflow.url)
    client.create_webhook(name="explainer", url=f"{stack.explainer.url}/mlflow_webhook",
                          events=["model_version_alias.created"], secret=WEBHOOK_SECRET)
    before = _served_version(stack.explainer)
    target = next(v for v in stack.models.classifier_versions if v != before)
    client.set_registered_model_alias(name, "champion", str(target))
    t0 = time.monotonic()
    hooks: dict[str, Any] = {}
    while time.monotonic() - t0 < 20:
        hooks = _get(stack.explainer, "/models").json()["webhooks"]
        if hooks["received"] and hooks["last"].get("model_version") and _served_version(stack.explainer) == target:
            break
        time.sleep(0.1)
    assert _served_version(stack.explainer) == target, stack.explainer.log()[-3000:]
    assert hooks["received"] >= 1 and hooks["last"]["event"] == "model_version_alias.created", hooks
    assert hooks["last"].get("model_version") == f"{name}/{target}", hooks
    print(f"webhook delivered and served {time.monotonic() - t0:.2f} s after the alias moved")

    body = json.dumps({"entity": "model_version_alias", "action": "created",
                       "data": {"name": name, "alias": "champion", "version": str(target)}}).encode()
    url = stack.explainer.url + "/mlflow_webhook"
    assert httpx.post(url, content=body, headers=_sign(body), timeout=30).status_code == 200
    forged = {**_sign(body), "X-MLflow-Signature": "v1,AAAA"}
    assert httpx.post(url, content=body, headers=forged, timeout=30).status_code == 401
    stale = _sign(body, ts=str(int(time.time()) - 3600))
    assert httpx.post(url, content=body, headers=stale, timeout=30).status_code == 401
    assert httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30).status_code == 401
    other = json.dumps({"entity": "registered_model", "action": "created", "data": {"name": "x"}}).encode()
    ignored = httpx.post(url, content=other, headers=_sign(other), timeout=30)
    assert ignored.status_code == 200 and ignored.json()["ignored"]


def test_registry_outage_keeps_serving_the_loaded_version(stack):
    images, _ = _test_images(stack, 1)
    served = _served_version(stack.explainer)
    stack.mlflow.stop()
    body = json.dumps({"entity": "model_version_alias", "action": "created",
                       "data": {"name": stack.models.classifier, "alias": "champion", "version": "1"}}).encode()
    refresh = httpx.post(stack.explainer.url + "/mlflow_webhook", content=body, headers=_sign(body), timeout=60)
    assert refresh.status_code == 503, refresh.text  # MLflow retries a 5xx delivery
    time.sleep(1.5)  # a few refresher rounds against the dead registry
    assert httpx.get(stack.explainer.url + "/readyz", timeout=10).status_code == 200
    response = _post(stack.explainer, "/predict", files={"images": ("a.png", images[0], "image/png")})
    assert response.status_code == 200
    assert response.headers["x-model-version"] == f"{stack.models.classifier}/{served}"
    rows = [json.loads(line) for line in stack.explainer.log().splitlines() if line.startswith("{")]
    kept = [r for r in rows if r["logger"] == "meddiffuse.registry.handle" and r["level"] == "WARNING"
            and "cannot resolve" in r["msg"] and f"still serving {stack.models.classifier}/{served}" in r["msg"]]
    assert kept, "the outage was not logged"


def test_no_server_errors_in_the_logs(stack):
    for svc in stack.services:
        rows = [json.loads(line) for line in svc.log().splitlines() if line.startswith("{")]
        errors = [r for r in rows if r.get("status", 0) >= 500 and r.get("path") not in ("/mlflow_webhook", "/readyz")]
        assert not errors, (svc.name, errors[:3])
        assert "Traceback" not in svc.log(), (svc.name, svc.log()[-3000:])
