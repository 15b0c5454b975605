"""The explainer service under load, beside the same work done in-process.

    python bench/serve.py            # 1000 /predict + 200 /explain at concurrency 8 -> bench/results/serve.json
    python bench/serve.py --quick    # 100 + 10: a smoke check -> bench/results/serve-quick.json

It registers a tiny classifier (phantom brain MRI, resnet18 at 32 px, as the service tests do) in a
temporary home, starts ``bentoml serve services.explainer:Explainer`` on a free loopback port, sends the
requests from ``--concurrency`` threads (one keep-alive client each), and counts errors (any non-200; must
be 0) and p50/p95/p99 latency and throughput. Then it does the same work in-process: the library's
``decode_upload`` + ``predict_images`` (and ``explain_images``) on the same images from the same number of
threads, one image per call, and reports HTTP throughput / in-process throughput (target for /predict:
>= 0.8). The markdown table comes from ``markdown_table`` here (bench/render.py does not render it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402

PREDICT_TARGET = 0.8


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run_load(n: int, concurrency: int, call: Callable[[int], bool]) -> dict[str, Any]:
    """``n`` calls of ``call(i)`` (True = success) from ``concurrency`` threads; latency and throughput."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    counter = iter(range(n))

    def worker() -> None:
        nonlocal errors
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                ok = call(i)
            except Exception:  # noqa: BLE001 - a failed call is an error to count, not a crash
                ok = False
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                errors += 0 if ok else 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    wall = time.perf_counter() - t0
    return {
        "n": n, "concurrency": concurrency, "errors": errors, "wall_s": round(wall, 3),
        "throughput_per_s": round(n / wall, 2),
        "latency_ms": {"p50": round(percentile(latencies, 0.5) * 1000, 2),
                       "p95": round(percentile(latencies, 0.95) * 1000, 2),
                       "p99": round(percentile(latencies, 0.99) * 1000, 2),
                       "mean": round(statistics.fmean(latencies) * 1000, 2) if latencies else None},
    }


def batch_stats(metrics_text: str) -> dict[str, float] | None:
    """Mean requests per adaptive batch of /predict from the Prometheus text."""
    total = count = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("bentoml_service_adaptive_batch_size_sum") and 'method_name="predict"' in line:
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("bentoml_service_adaptive_batch_size_count") and 'method_name="predict"' in line:
            count += float(line.rsplit(" ", 1)[1])
    return {"batches": count, "mean_requests_per_batch": round(total / count, 2)} if count else None


def markdown_table(result: dict[str, Any]) -> str:
    """The table printed at the end (and what a README section would show)."""
    rows = ["| work | where | requests | errors | throughput /s | p50 ms | p95 ms | p99 ms |",
            "|---|---|---|---|---|---|---|---|"]
    for work in ("predict", "explain"):
        block = result.get(work) or {}
        for where in ("http", "inprocess"):
            r = block.get(where)
            if not r:
                continue
            lat = r["latency_ms"]
            label = "HTTP (bentoml serve)" if where == "http" else "in-process (library)"
            rows.append(f"| /{work} | {label} | {r['n']} | {r['errors']} | {r['throughput_per_s']:.1f} | "
                        f"{lat['p50']:.1f} | {lat['p95']:.1f} | {lat['p99']:.1f} |")
    p = result.get("predict") or {}
    e = result.get("explain") or {}
    ratio = p.get("ratio")
    lines = ["\n".join(rows), ""]
    if ratio is not None:
        mark = "met" if p.get("target_met") else "NOT met"
        lines.append(f"/predict HTTP ÷ in-process throughput: **{ratio:.2f}×** (target ≥ {PREDICT_TARGET}: {mark}); "
                     f"/explain: {e.get('ratio', float('nan')):.2f}×.")
    cfg = result.get("config") or {}
    batching = (p.get("batching") or {}).get("mean_requests_per_batch")
    lines.append(f"Concurrency {cfg.get('concurrency')}, service threads {cfg.get('threads')}, workers "
                 f"{cfg.get('workers')}, predict_batch {cfg.get('predict_batch')}, LIME samples "
                 f"{cfg.get('lime_samples')}; {cfg.get('model')}" + (f"; {batching} requests per batch on average"
                                                                     if batching else "") + ".")
    m = result.get("machine") or {}
    load = cfg.get("load_average_1m") or {}
    lines.append(f"Measured {result.get('date', '')} on {m.get('cpu_model') or m.get('processor')}, "
                 f"{m.get('cpu_count')} CPUs, torch {((m.get('versions') or {}).get('torch'))}; 1-minute load "
                 f"average {load.get('before')} before, {load.get('after')} after (client, server and anything "
                 "else on the machine share its cores).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="100 /predict and 10 /explain (smoke check)")
    p.add_argument("--predict", type=int, default=None, help="/predict requests (default 1000; quick 100)")
    p.add_argument("--explain", type=int, default=None, help="/explain requests (default 200; quick 10)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--threads", type=int, default=4, help="service threads (serve.threads)")
    p.add_argument("--predict-batch", type=int, default=16, help="serve.predict_batch")
    p.add_argument("--lime-samples", type=int, default=200, help="LIME samples per /explain")
    p.add_argument("--home", type=Path, default=None, help="work folder (default: a temporary one)")
    a = p.parse_args(argv)
    n_predict = a.predict if a.predict is not None else (100 if a.quick else 1000)
    n_explain = a.explain if a.explain is not None else (10 if a.quick else 200)

    import httpx

    from meddiffuse import tasks
    from meddiffuse.config import Settings
    from meddiffuse.data.dataset import open_dataset
    from meddiffuse.store import create_store
    from tests.servicekit import (
        API_KEY,
        build_models,
        free_port,
        png,
        service_env,
        start_service,
        stop_all,
        wait_ready,
    )

    load_before = os.getloadavg()
    work = a.home or Path(tempfile.mkdtemp(prefix="bench-serve-"))
    home = work / "home"
    t0 = time.perf_counter()
    models = build_models(home, classifier_versions=1)
    print(f"[serve] tiny classifier registered in {time.perf_counter() - t0:.0f} s", flush=True)
    settings = Settings(home=home)
    ds = open_dataset(create_store(settings), models.dataset)
    arrays, _ = ds.load_arrays(entries=ds.manifest.select("test"))
    images = [png(x) for x in arrays]

    serve = {"api_key": API_KEY, "domains": '["brain-mri"]', "threads": a.threads, "workers": 1,
             "predict_batch": a.predict_batch, "lime_samples": a.lime_samples, "max_concurrency": 4 * a.concurrency}
    svc = start_service("services.explainer:Explainer", free_port(), service_env(home, work / "bentoml", **serve),
                        work / "logs", name="bench-explainer")
    result: dict[str, Any] = {
        "quick": a.quick,
        "config": {"concurrency": a.concurrency, "threads": a.threads, "workers": 1, "predict_batch": a.predict_batch,
                   "lime_samples": a.lime_samples, "images": len(images), "image_px": int(arrays.shape[1]),
                   "model": "resnet18 at 32 px, 4 classes (phantom brain MRI), CPU"},
    }
    try:
        t0 = time.perf_counter()
        wait_ready([svc], timeout=300)
        result["config"]["service_start_s"] = round(time.perf_counter() - t0, 1)
        local = threading.local()

        def client() -> httpx.Client:
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=svc.url, headers={"X-API-Key": API_KEY}, timeout=120)
            return local.client

        def http_predict(i: int) -> bool:
            r = client().post("/predict", files={"images": ("x.png", images[i % len(images)], "image/png")})
            return r.status_code == 200 and len(r.json()) == 1 and "x-model-version" in r.headers

        def http_explain(i: int) -> bool:
            r = client().post("/explain", files={"image": ("x.png", images[i % len(images)], "image/png")},
                              data={"seed": str(i)})
            return r.status_code == 200 and bool(r.json()["weights"])

        for i in range(2 * a.concurrency):  # warm-up: the batcher's first batches, LIME's first run
            http_predict(i)
        http_explain(0)
        print(f"[serve] /predict x{n_predict} over HTTP ...", flush=True)
        result["predict"] = {"http": run_load(n_predict, a.concurrency, http_predict)}
        result["predict"]["batching"] = batch_stats(httpx.get(svc.url + "/metrics", timeout=30).text)
        print(f"[serve] /explain x{n_explain} over HTTP ...", flush=True)
        result["explain"] = {"http": run_load(n_explain, a.concurrency, http_explain)}
    finally:
        leftovers = stop_all([svc])
    if leftovers:
        print(f"[serve] ended leftover processes {leftovers}", flush=True)

    clf = tasks.classifier_handle("brain-mri", settings=settings).get().model  # as the service loads it

    def local_predict(i: int) -> bool:
        probs = tasks.predict_images(clf, [tasks.decode_upload(clf, images[i % len(images)])])
        return probs.shape == (1, 4)

    def local_explain(i: int) -> bool:
        out = tasks.explain_images(clf, [tasks.decode_upload(clf, images[i % len(images)])],
                                   num_samples=a.lime_samples, seed=i)
        return bool(out[0].weights)

    for i in range(2 * a.concurrency):
        local_predict(i)
    local_explain(0)
    print("[serve] the same work in-process ...", flush=True)
    result["predict"]["inprocess"] = run_load(n_predict, a.concurrency, local_predict)
    result["explain"]["inprocess"] = run_load(n_explain, a.concurrency, local_explain)
    for work_name in ("predict", "explain"):
        block = result[work_name]
        block["ratio"] = round(block["http"]["throughput_per_s"] / block["inprocess"]["throughput_per_s"], 3)
    result["predict"]["target"] = PREDICT_TARGET
    result["predict"]["target_met"] = result["predict"]["ratio"] >= PREDICT_TARGET
    result["errors"] = result["predict"]["http"]["errors"] + result["explain"]["http"]["errors"]
    # other processes on the machine skew both sides: record the load the run saw
    result["config"]["load_average_1m"] = {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)}

    path = write_result("serve-quick" if a.quick else "serve", result)
    import json

    print(markdown_table(json.loads(path.read_text())))
    print(f"[serve] wrote {path.relative_to(ROOT)}", flush=True)
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
