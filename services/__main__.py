"""``python -m services`` (``make serve``): the three services on localhost against the embedded defaults.

    generator  http://127.0.0.1:3001      trainer  http://127.0.0.1:3002      explainer  http://127.0.0.1:3003

Each runs as its own ``bentoml serve`` process (its own ``BENTOML_HOME`` under ``<home>/bentoml/<name>``, so
their task databases and Prometheus folders stay apart) with telemetry off; the configuration is the usual
``MEDDIFFUSE_*`` environment. Ctrl-C (or SIGTERM) stops them by PID: SIGTERM, wait, then SIGKILL.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

SERVICES = {"generator": ("services.generator:Generator", 3001), "trainer": ("services.trainer:Trainer", 3002),
            "explainer": ("services.explainer:Explainer", 3003)}
ROOT = Path(__file__).resolve().parents[1]


def _probe(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - a loopback URL we built
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    from meddiffuse.config import Settings

    p = argparse.ArgumentParser(prog="python -m services", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    for name, (_, port) in SERVICES.items():
        p.add_argument(f"--{name}-port", type=int, default=port)
    p.add_argument("--only", nargs="+", choices=list(SERVICES), default=list(SERVICES))
    a = p.parse_args(argv)

    settings = Settings()
    home = settings.home.resolve()
    bentoml = Path(sys.executable).with_name("bentoml")
    procs: dict[str, subprocess.Popen] = {}
    urls: dict[str, str] = {}
    for name in a.only:
        target, _ = SERVICES[name]
        port = getattr(a, f"{name}_port")
        env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "DO_NOT_TRACK": "true",
               "MLFLOW_DISABLE_TELEMETRY": "true", "BENTOML_HOME": str(home / "bentoml" / name)}
        procs[name] = subprocess.Popen([str(bentoml), "serve", target, "--host", a.host, "--port", str(port),
                                        "--working-dir", str(ROOT)], cwd=ROOT, env=env, start_new_session=True)
        urls[name] = f"http://{a.host}:{port}"
        print(f"[serve] {name:9s} pid {procs[name].pid}  {urls[name]}  (docs {urls[name]}/docs.json)", flush=True)

    stopping = {"now": False}

    def stop(*_: object) -> None:
        stopping["now"] = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    announced: dict[str, int | None] = {}
    auth = "X-API-Key required" if settings.serve.api_key.get_secret_value() else "no API key (serve.api_key is '')"
    print(f"[serve] home {home}; {auth}; Ctrl-C stops all", flush=True)
    try:
        while not stopping["now"]:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    print(f"[serve] {name} exited with {proc.returncode}; stopping the others", flush=True)
                    stopping["now"] = True
                    break
                status = _probe(f"{urls[name]}/readyz")
                if status != announced.get(name):
                    announced[name] = status
                    state = {200: "ready", 503: "up, not ready (no champion registered yet?)"}.get(
                        status or 0, "starting")
                    print(f"[serve] {name:9s} {urls[name]}  {state}", flush=True)
            time.sleep(1)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for name, proc in procs.items():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            print(f"[serve] {name} (pid {proc.pid}) stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
