"""Helpers for the flow tests: processes started by PID (Prefect server, worker, a flow killed midway,
``bentoml serve``) and stopped by PID, small datasets and models, and reads from the Prefect REST API."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.servicekit import OFFLINE_ENV as SERVICE_ENV
from tests.servicekit import free_port  # noqa: F401 - re-exported for the flow tests

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OFFLINE_ENV = SERVICE_ENV | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without inherited MEDDIFFUSE_*/PREFECT_*/MLFLOW_* settings, telemetry off."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MEDDIFFUSE_", "PREFECT_", "MLFLOW_TRACKING", "MLFLOW_REGISTRY", "BENTOML_HOME"))}
    env |= OFFLINE_ENV
    env |= {k: str(v) for k, v in extra.items()}
    return env


@dataclass
class Proc:
    """A process we started in its own session (process group), stopped by its PID / group id only."""

    name: str
    proc: subprocess.Popen
    log_path: Path

    @classmethod
    def start(cls, name: str, cmd: list[str], env: dict[str, str], log_dir: Path, cwd: Path = ROOT) -> Proc:
        log_path = log_dir / f"{name}.log"
        log = log_path.open("wb")
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        return cls(name, proc, log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the whole group (the process and whatever it started), at once: a crash, not a stop."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, signals: tuple[int, ...] = (signal.SIGTERM,), grace: float = 15.0) -> None:
        """Send each signal in turn (to the PID), waiting up to ``grace`` s after each; then SIGKILL the group."""
        for sig in signals:
            if not self.alive():
                break
            try:
                os.kill(self.pid, sig)
                self.proc.wait(timeout=grace)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        if self.alive():
            self.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):  # children left in the group
            os.killpg(self.pid, signal.SIGKILL)


def wait_http(url: str, proc: Proc, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.proc.returncode}):\n{proc.log()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s:\n{proc.log()}")


def api(api_url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """POST ``{api_url}/{path}`` (the Prefect REST API) and return its JSON."""
    response = httpx.post(f"{api_url.rstrip('/')}/{path.lstrip('/')}", json=body or {}, timeout=30)
    response.raise_for_status()
    return response.json()


def artifacts(api_url: str, **filters: Any) -> list[dict[str, Any]]:
    return api(api_url, "artifacts/filter", {"artifacts": filters} if filters else {})


TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def task_runs(api_url: str, flow_run_id: str, timeout: float = 60.0) -> list[dict[str, Any]]:
    """The flow run's task runs once the API has caught up: Prefect 3 reports task run states as events,
    which the server records a little later, so poll until every run is terminal and two reads agree."""
    body = {"flow_runs": {"id": {"any_": [str(flow_run_id)]}}}
    deadline, last = time.monotonic() + timeout, None
    while True:
        runs = api(api_url, "task_runs/filter", body)
        seen = sorted((r["id"], r["state"]["type"] if r.get("state") else None, r["run_count"]) for r in runs)
        if seen == last and all(state in TERMINAL for _, state, _ in seen):
            return runs
        if time.monotonic() > deadline:
            return runs
        last = seen
        time.sleep(0.5)


# -- data and models ------------------------------------------------------------------------------------------


def tiny_study(name: str, **overrides: Any):
    """The seconds-scale study on brain-mri phantoms (tiny generator, one resnet18 from scratch)."""
    from meddiffuse.config import ExperimentConfig

    base = dict(domain="brain-mri", phantoms_per_class=12, resolution=16, generator_preset="tiny",
                generator_steps=20, checkpoint_every=10, sampling_steps=4, archs=["resnet18"], weights="none",
                input_size=32, epochs=1, early_stopping_patience=None, explain_per_model=0, audit=False,
                bootstrap=0, synthetic_multiple=1.0, name=name)
    return ExperimentConfig(**(base | overrides))


def intensity_dataset(store, prefix: str, n_per_class: int = 16, resolution: int = 16):
    """A committed brain-mri Dataset whose classes differ by mean intensity: a few epochs learn it, so a
    trained classifier is reliably better than one that was not (half train, half test)."""
    from meddiffuse.data.dataset import DatasetWriter
    from meddiffuse.domains import get_domain

    domain = get_domain("brain-mri")
    writer = DatasetWriter(store, prefix, domain, resolution)
    writer.withdraw()
    rng = np.random.default_rng(0)
    for ci, label in enumerate(domain.classes):
        for i in range(n_per_class):
            image = np.clip(rng.normal(30 + 65 * ci, 8, (resolution, resolution, 1)), 0, 255).astype(np.uint8)
            writer.add(image, label, "train" if i < n_per_class // 2 else "test", source=f"intensity/{label}/{i}",
                       key=f"images/{label}/{label}-{i:03d}.png")
    return writer.commit(meta={"test_fixture": "intensity"})


def shard_records(store, prefix: str) -> list[str]:
    return [k for k in store.list(f"{prefix}/shards/") if k.endswith(".json")]
