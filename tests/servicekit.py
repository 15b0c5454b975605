"""Helpers for tests and benches that talk to real ``bentoml serve`` processes on loopback ports.

``start_service`` launches one service in its own process group with an explicit environment and a log
file; ``ServiceProcess.stop`` ends it by PID (SIGTERM, wait, then SIGKILL to its group) so nothing is left
running. ``build_models`` registers a tiny classifier (two versions) and a tiny generator in a fresh
embedded home, in about 30 s on 2 cores.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENTOML = Path(sys.executable).with_name("bentoml")
API_KEY = "test-key-0123456789"
RUN_MARKER = "MEDDIFFUSE_SERVICEKIT_RUN"
RUN_ID = uuid.uuid4().hex  # in the environment of every process this module starts (see leftover_pids)
OFFLINE_ENV = {
    "BENTOML_DO_NOT_TRACK": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    "TQDM_DISABLE": "1",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(home: Path, bentoml_home: Path, **serve: Any) -> dict[str, str]:
    """A clean environment for one service: no inherited MEDDIFFUSE_*/MLFLOW_* settings, telemetry off."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MEDDIFFUSE_", "MLFLOW_TRACKING", "MLFLOW_REGISTRY", "BENTOML_"))}
    env.update(OFFLINE_ENV)
    env[RUN_MARKER] = RUN_ID
    env["MEDDIFFUSE_HOME"] = str(home)
    env["BENTOML_HOME"] = str(bentoml_home)
    for key, value in serve.items():
        env[f"MEDDIFFUSE_SERVE__{key.upper()}"] = str(value)
    return env


@dataclass(eq=False)
class ServiceProcess:
    name: str
    url: str
    proc: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(repr=False, default_factory=dict)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the server (it stops its workers), wait, then SIGKILL whatever is left of its group."""
        pid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"{self.name} (pid {pid}) ignored SIGTERM for {timeout:.0f} s: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # workers that outlived their parent, if any


def stop_all(services: list[ServiceProcess], timeout: float = 20.0) -> list[int]:
    """SIGTERM every server at once, wait for each (SIGKILL what is left of its group), then end any
    process still carrying this run's marker: BentoML's workers live in sessions of their own, so a server
    killed before it could stop them leaves them behind. Returns the PIDs that had to be ended that way."""
    for svc in services:
        if svc.alive():
            svc.proc.terminate()
    for svc in services:
        svc.stop(timeout)
    return end_leftovers()


def leftover_pids(run_id: str = RUN_ID) -> list[int]:
    """PIDs of live processes started with this run's marker in their environment (Linux /proc)."""
    needle = f"{RUN_MARKER}={run_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def end_leftovers(grace: float = 5.0) -> list[int]:
    pids = leftover_pids()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while leftover_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not leftover_pids():
            break
    return pids


def start_service(target: str, port: int, env: dict[str, str], log_dir: Path, name: str | None = None
                  ) -> ServiceProcess:
    """``bentoml serve <target> --host 127.0.0.1 --port <port>`` in a new process group (not yet ready)."""
    name = name or target.rsplit(":", 1)[-1].lower()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{port}.log"
    out = open(log_path, "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        [str(BENTOML), "serve", target, "--host", "127.0.0.1", "--port", str(port), "--working-dir", str(ROOT)],
        cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )
    out.close()
    return ServiceProcess(name, f"http://127.0.0.1:{port}", proc, log_path, env)


def wait_ready(services: list[ServiceProcess], timeout: float = 180.0) -> None:
    """Poll every service's ``/readyz`` until all answer 200; fail with the log tail of one that died."""
    import httpx

    deadline = time.monotonic() + timeout
    pending = list(services)
    while pending:
        for svc in list(pending):
            if not svc.alive():
                raise RuntimeError(f"{svc.name} exited with {svc.proc.returncode}:\n{svc.log()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{svc.url}/readyz", timeout=2).status_code == 200:
                    pending.remove(svc)
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"not ready after {timeout:.0f} s: {[s.name for s in pending]}\n"
                               + "\n".join(s.log()[-3000:] for s in pending))
        if pending:
            time.sleep(0.5)


@dataclass
class Models:
    home: Path
    dataset: str
    classifier: str  # registered model name
    classifier_versions: list[int]
    generator: str
    generator_version: int


def build_models(home: Path, *, classifier_versions: int = 2) -> Models:
    """A phantom brain-mri dataset (16 per class, 32 px), ``classifier_versions`` tiny resnet18 classifiers
    (the first holds ``champion``) and a 20-step tiny generator (champion), registered under ``home``."""
    from meddiffuse import tasks
    from meddiffuse.config import ClassifierSpec, GeneratorSpec, Settings
    from meddiffuse.data.phantoms import phantom_dataset
    from meddiffuse.store import create_store

    cfg = Settings(home=home)
    store = create_store(cfg)
    phantom_dataset(store, "datasets/p", "brain-mri", n_per_class=16, resolution=32)
    versions = []
    for seed in range(classifier_versions):
        result = tasks.train_and_register_classifier(ClassifierSpec(
            domain="brain-mri", arch="resnet18", weights="none", input_size=32, epochs=1, bootstrap=0, seed=seed,
            train=["datasets/p"], test="datasets/p", alias="champion" if seed == 0 else None), settings=cfg)
        versions.append(result.version)
    gen = tasks.train_and_register_generator(GeneratorSpec(
        domain="brain-mri", dataset="datasets/p", generator_preset="tiny", generator_steps=20, checkpoint_every=10),
        settings=cfg)
    return Models(home, "datasets/p", result.name, versions, gen.name, gen.version)


def png(array: Any) -> bytes:
    from meddiffuse.data.dataset import encode_png

    return encode_png(array)
