"""The whole platform on one machine without Docker: local processes on loopback.

    python -m deploy.stack up        # make stack
    python -m deploy.stack status
    python -m deploy.stack restart explainer
    python -m deploy.stack down      # make stack-down

``up`` starts, in this order, waiting for each health check:

1. an S3 server: MinIO when a ``minio`` binary is on PATH (data in ``<state>/minio-data``, kept across
   restarts), else moto's server (``moto_server``, in memory, IAM authentication on) — bucket ``meddiffuse``;
2. an MLflow server (``--serve-artifacts --artifacts-destination s3://meddiffuse/mlartifacts``) and a Prefect
   server, both on PostgreSQL when one is reachable (``MEDDIFFUSE_STACK_POSTGRES``, default
   ``postgresql://postgres@127.0.0.1:5432/postgres``; databases ``<prefix>_mlflow`` and ``<prefix>_prefect``
   are created when missing), else on SQLite files in the state folder;
3. the three BentoML services (generator, trainer, explainer) pointed at all of them, an MLflow registry
   webhook to the explainer, ``make prefect-deploy`` (work pools + every deployment of flows/prefect.yaml) and a
   process worker on the ``meddiffuse-process`` pool.

With moto the object store lives in memory, so ``up`` always starts from empty MLflow and Prefect databases
(a registry that outlived its artifacts would name models that are gone); with MinIO pass ``--fresh`` for that.

Everything runs as this user, bound to 127.0.0.1, each component in its own process group with its log in the
state folder (default ``.meddiffuse/stack/``, or ``MEDDIFFUSE_STACK_DIR``). ``state.json`` there records each
PID (with its kernel start time, so a recycled PID is never signalled), port, command and log; ``stack.env``
holds the client settings (``source .meddiffuse/stack/stack.env``); ``api-key`` the services' key (generated
unless ``MEDDIFFUSE_SERVE__API_KEY`` is set). Every process carries ``MEDDIFFUSE_STACK_ID`` in its environment,
so ``down`` can find (and end, by PID) anything a component left behind, e.g. a flow run of the worker.

``MEDDIFFUSE_*`` variables in the caller's environment are forwarded to every component (for example
``MEDDIFFUSE_S3__TIMEOUT_S=5``), except those the stack sets itself. Ports: ``MEDDIFFUSE_STACK_<NAME>_PORT``
(``S3``, ``S3_CONSOLE``, ``MLFLOW``, ``PREFECT``, ``GENERATOR``, ``TRAINER``, ``EXPLAINER``) or ``--ports auto``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
BUCKET = "meddiffuse"
POOL = "meddiffuse-process"
WORKER_NAME = "meddiffuse-stack-worker"
STACK_ID_ENV = "MEDDIFFUSE_STACK_ID"
COMPONENT_ENV = "MEDDIFFUSE_STACK_COMPONENT"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_PORTS = {"s3": 9000, "s3-console": 9001, "mlflow": 5000, "prefect": 4200,
                 "generator": 3001, "trainer": 3002, "explainer": 3003}
SERVICES = {"generator": "services.generator:Generator", "trainer": "services.trainer:Trainer",
            "explainer": "services.explainer:Explainer"}
#: start order; ``down`` stops in reverse (services, worker before the Prefect server, MLflow, S3)
ORDER = ["s3", "mlflow", "prefect", "generator", "trainer", "explainer", "worker"]
STOP_ORDER = ["explainer", "trainer", "generator", "worker", "prefect", "mlflow", "s3"]
STOP_TIMEOUT_S = {"worker": 30.0}
DEFAULT_STOP_TIMEOUT_S = 20.0
TELEMETRY_OFF = {
    "BENTOML_DO_NOT_TRACK": "true",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "TQDM_DISABLE": "1",
    "PYTHONUNBUFFERED": "1",
}
#: inherited variables that would point a component somewhere else; the stack sets its own
SCRUBBED_PREFIXES = ("MEDDIFFUSE_", "PREFECT_", "MLFLOW_", "BENTOML_", "AWS_", "MINIO_")


class StackError(RuntimeError):
    """The stack could not do what was asked; the message says which component and why."""


def log(msg: str) -> None:
    print(f"[stack] {msg}", flush=True)


# -- processes ---------------------------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, process group, start time in clock ticks)`` of ``pid``, or None when there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    rest = raw[raw.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return rest[0], int(rest[2]), int(rest[19])


def is_alive(pid: int, start_time: int | None = None) -> bool:
    """``pid`` runs (a zombie does not) and, if given, is the process started at ``start_time``."""
    stat = proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    return start_time is None or stat[2] == start_time


def group_members(pgid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = proc_stat(int(entry.name))
            if stat is not None and stat[1] == pgid and stat[0] not in ("Z", "X"):
                out.append(int(entry.name))
    return out


def marked_processes(stack_id: str, component: str | None = None) -> list[int]:
    """Live processes whose environment carries ``MEDDIFFUSE_STACK_ID=<stack_id>`` (only the stack's processes
    and their descendants have it), and, if given, ``MEDDIFFUSE_STACK_COMPONENT=<component>``."""
    needles = {f"{STACK_ID_ENV}={stack_id}".encode()}
    if component is not None:
        needles.add(f"{COMPONENT_ENV}={component}".encode())
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if needles <= env and is_alive(int(entry.name)):
            out.append(int(entry.name))
    return out


def has_marker(pid: int, stack_id: str) -> bool:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"{STACK_ID_ENV}={stack_id}".encode() in env


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_gone(pids: Callable[[], list[int]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pids():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def port_open(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def port_bindable(port: int, host: str = HOST) -> bool:
    """Whether a server could listen on ``port`` now (as servers do, with SO_REUSEADDR: connections of a
    stopped server lingering in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def log_tail(path: Path | str, n: int = 3000) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-n:] if text else "(empty log)"


# -- HTTP --------------------------------------------------------------------------------------------------


def http(method: str, url: str, body: Any = None, timeout: float = 5.0, headers: dict[str, str] | None = None
         ) -> tuple[int, bytes]:
    """``(status, body)``; an HTTP error status is an answer too. Raises OSError when nothing answers."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_status(url: str, timeout: float = 3.0) -> int | None:
    try:
        return http("GET", url, timeout=timeout)[0]
    except OSError:
        return None


# -- state ----------------------------------------------------------------------------------------------------


@dataclass
class Component:
    """One process of the stack, as recorded in ``state.json``."""

    name: str
    cmd: list[str]
    env: dict[str, str]  # what the stack sets on top of the scrubbed caller environment
    port: int | None
    log: str
    health: str  # kind of health check, see ``health_status``
    url: str | None = None
    pid: int | None = None
    pgid: int | None = None
    start_time: int | None = None
    started_at: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def alive(self) -> bool:
        return self.pid is not None and is_alive(self.pid, self.start_time)

    def members(self, stack_id: str | None) -> list[int]:
        """Live processes of this component's process group. While the leader lives (its start time checked)
        the group is ours; once it is gone its id could be reused, so only members carrying the stack's id in
        their environment count."""
        if self.pgid is None:
            return []
        members = group_members(self.pgid)
        if self.alive():
            return members
        return [pid for pid in members if stack_id and has_marker(pid, stack_id)]


class State:
    """``<state_dir>/state.json``: everything ``down``, ``status`` and ``restart`` need (mode 0600)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.path = state_dir / "state.json"
        self.data: dict[str, Any] = {}
        self.components: dict[str, Component] = {}

    @classmethod
    def load(cls, state_dir: Path) -> State | None:
        state = cls(state_dir)
        try:
            state.data = json.loads(state.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise StackError(f"{state.path} is not valid JSON ({exc}); remove it once no stack runs") from None
        state.components = {name: Component(**rec) for name, rec in state.data.pop("components", {}).items()}
        return state

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        body = dict(self.data, components={n: vars(c) for n, c in self.components.items()})
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(body, fh, indent=2, default=str)
        os.replace(tmp, self.path)

    def alive(self) -> list[Component]:
        return [c for c in self.components.values() if c.alive()]


def write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")


def read_or_make_secret(path: Path, make: Callable[[], str]) -> str:
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        value = ""
    if not value:
        value = make()
        write_secret(path, value)
    return value


# -- configuration ----------------------------------------------------------------------------------------


@dataclass
class StackConfig:
    state_dir: Path
    ports: dict[str, int]
    db_prefix: str = "meddiffuse"
    postgres: str | None = DEFAULT_POSTGRES
    fresh: bool = False
    start_timeout_s: float = 240.0
    reload_interval_s: float = 5.0
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def api(self) -> str:
        return f"http://{HOST}:{self.ports['prefect']}/api"

    def url(self, name: str) -> str:
        return f"http://{HOST}:{self.ports[name]}"


def default_state_dir() -> Path:
    return Path(os.environ.get("MEDDIFFUSE_STACK_DIR") or ROOT / ".meddiffuse" / "stack").resolve()


def choose_ports(mode: str) -> dict[str, int]:
    ports = {}
    for name, default in DEFAULT_PORTS.items():
        env = os.environ.get(f"MEDDIFFUSE_STACK_{name.upper().replace('-', '_')}_PORT")
        ports[name] = int(env) if env else (free_port() if mode == "auto" else default)
    if len(set(ports.values())) != len(ports):
        raise StackError(f"two components would share a port: {ports}")
    return ports


def forwarded_env() -> dict[str, str]:
    """The caller's ``MEDDIFFUSE_*`` settings (not the stack's own ``MEDDIFFUSE_STACK_*``)."""
    return {k: v for k, v in os.environ.items()
            if k.startswith("MEDDIFFUSE_") and not k.startswith("MEDDIFFUSE_STACK")}


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED_PREFIXES)}
    # make's variables would make `make prefect-deploy` a sub-make of `make stack` with its flags
    for key in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES"):
        env.pop(key, None)
    # the venv first, so `prefect`, `mlflow` and `bentoml` are the ones of this environment
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(BIN.parent)
    return env | TELEMETRY_OFF


# -- backends: PostgreSQL or SQLite --------------------------------------------------------------------------


def postgres_admin(url: str | None) -> Any | None:
    """A psycopg2 connection (autocommit) to the admin database, or None (no driver, nothing listening)."""
    if not url:
        return None
    try:
        import psycopg2
    except ImportError:
        log("psycopg2 is not installed: MLflow and Prefect use SQLite (pip install psycopg2-binary for PostgreSQL)")
        return None
    try:
        conn = psycopg2.connect(url, connect_timeout=3)
    except psycopg2.Error as exc:
        log(f"PostgreSQL at {_redact(url)} is not reachable ({str(exc).strip().splitlines()[0]}): using SQLite")
        return None
    conn.autocommit = True
    return conn


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return url


def database_url(admin_url: str, db: str, driver: str = "postgresql") -> str:
    parts = urllib.parse.urlsplit(admin_url)
    return urllib.parse.urlunsplit(parts._replace(scheme=driver, path=f"/{db}"))


def ensure_database(conn: Any, db: str, fresh: bool) -> str:
    """Create ``db`` if missing (dropping it first when ``fresh``); returns what was done."""
    from psycopg2 import sql

    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
        exists = cur.fetchone() is not None
        if exists and fresh:
            cur.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))
            exists = False
            done = "recreated"
        else:
            done = "kept" if exists else "created"
        if not exists:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    return done


def choose_backends(cfg: StackConfig, fresh: bool) -> dict[str, str]:
    conn = postgres_admin(cfg.postgres)
    if conn is not None:
        try:
            out = {}
            for what in ("mlflow", "prefect"):
                db = f"{cfg.db_prefix}_{what}"
                done = ensure_database(conn, db, fresh)
                log(f"{what}: PostgreSQL database {db} ({done})")
                out[what] = database_url(cfg.postgres or "", db,
                                         "postgresql+psycopg2" if what == "mlflow" else "postgresql+asyncpg")
            return out
        finally:
            conn.close()
    paths = {"mlflow": cfg.state_dir / "mlflow.db", "prefect": cfg.state_dir / "prefect.db"}
    for what, path in paths.items():
        if fresh and path.exists():
            path.unlink()
        log(f"{what}: SQLite {path}")
    return {"mlflow": f"sqlite:///{paths['mlflow']}", "prefect": f"sqlite+aiosqlite:///{paths['prefect']}"}


# -- component definitions ---------------------------------------------------------------------------------


def s3_kind() -> tuple[str, str | None]:
    binary = shutil.which("minio")
    if binary and os.environ.get("MEDDIFFUSE_STACK_S3", "").lower() != "moto":
        return "minio", binary
    return "moto", None


def build_components(cfg: StackConfig, secrets_: dict[str, str], backends: dict[str, str], kind: str,
                     minio_binary: str | None, stack_id: str) -> dict[str, Component]:
    sd = cfg.state_dir
    mark = {STACK_ID_ENV: stack_id}
    s3_url = cfg.url("s3")
    comps: dict[str, Component] = {}

    if kind == "minio":
        data = sd / "minio-data"
        data.mkdir(parents=True, exist_ok=True)
        comps["s3"] = Component(
            "s3", [str(minio_binary), "server", str(data), "--address", f"{HOST}:{cfg.ports['s3']}",
                   "--console-address", f"{HOST}:{cfg.ports['s3-console']}", "--quiet"],
            mark | {"MINIO_ROOT_USER": secrets_["s3_access_key"], "MINIO_ROOT_PASSWORD": secrets_["s3_secret_key"],
                    "MINIO_UPDATE": "off"},
            cfg.ports["s3"], str(sd / "s3.log"), "s3-minio", s3_url,
            info={"kind": "minio", "console": cfg.url("s3-console"), "data": str(data)})
    else:
        moto = BIN / "moto_server"
        launcher = [str(moto)] if moto.exists() else [sys.executable, "-m", "moto.server"]
        comps["s3"] = Component("s3", [*launcher, "-H", HOST, "-p", str(cfg.ports["s3"])], dict(mark),
                                cfg.ports["s3"], str(sd / "s3.log"), "s3-moto", s3_url, info={"kind": "moto"})

    aws = {"AWS_ACCESS_KEY_ID": secrets_["s3_access_key"], "AWS_SECRET_ACCESS_KEY": secrets_["s3_secret_key"],
           "AWS_DEFAULT_REGION": "us-east-1"}
    comps["mlflow"] = Component(
        "mlflow",
        [str(BIN / "mlflow"), "server", "--host", HOST, "--port", str(cfg.ports["mlflow"]), "--workers", "2",
         "--backend-store-uri", backends["mlflow"], "--serve-artifacts",
         "--artifacts-destination", f"s3://{BUCKET}/mlartifacts"],
        mark | aws | {
            "MLFLOW_S3_ENDPOINT_URL": s3_url,
            "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": secrets_["mlflow_webhook_key"],
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
            "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        },
        cfg.ports["mlflow"], str(sd / "mlflow.log"), "mlflow", cfg.url("mlflow"),
        info={"backend": _redact(backends["mlflow"]), "artifacts": f"s3://{BUCKET}/mlartifacts"})

    prefect_home = sd / "prefect-home"
    prefect_env = {"PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    comps["prefect"] = Component(
        "prefect",
        [str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(cfg.ports["prefect"])],
        mark | prefect_env | {
            "PREFECT_API_DATABASE_CONNECTION_URL": backends["prefect"],
            "PREFECT_UI_API_URL": cfg.api,
            "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        },
        cfg.ports["prefect"], str(sd / "prefect.log"), "prefect", cfg.url("prefect"),
        info={"backend": _redact(backends["prefect"]), "api": cfg.api})

    # what every meddiffuse process (services, worker, its flow runs) reads
    meddiffuse = cfg.extra_env | {
        "MEDDIFFUSE_HOME": str(sd / "home"),
        "MEDDIFFUSE_STORE": f"s3://{BUCKET}/store",
        "MEDDIFFUSE_S3__ENDPOINT": f"{HOST}:{cfg.ports['s3']}",
        "MEDDIFFUSE_S3__ACCESS_KEY": secrets_["s3_access_key"],
        "MEDDIFFUSE_S3__SECRET_KEY": secrets_["s3_secret_key"],
        "MEDDIFFUSE_S3__SECURE": "false",
        "MEDDIFFUSE_S3__REGION": "us-east-1",
        "MEDDIFFUSE_TRACKING_URI": cfg.url("mlflow"),
        "MEDDIFFUSE_SERVE__API_KEY": secrets_["api_key"],
        "MEDDIFFUSE_SERVE__RELOAD_INTERVAL_S": str(cfg.extra_env.get("MEDDIFFUSE_SERVE__RELOAD_INTERVAL_S",
                                                                     cfg.reload_interval_s)),
        "MEDDIFFUSE_SERVE__WEBHOOK_SECRET": secrets_["webhook_secret"],
        "MEDDIFFUSE_FLOWS__GENERATOR_URL": cfg.url("generator"),
        "MEDDIFFUSE_FLOWS__TRAINER_URL": cfg.url("trainer"),
    }
    for name, target in SERVICES.items():
        comps[name] = Component(
            name,
            [str(BIN / "bentoml"), "serve", target, "--host", HOST, "--port", str(cfg.ports[name]),
             "--working-dir", str(ROOT)],
            mark | meddiffuse | {"BENTOML_HOME": str(sd / "bentoml" / name)},
            cfg.ports[name], str(sd / f"{name}.log"), "service", cfg.url(name),
            info={"docs": f"{cfg.url(name)}/docs.json"})

    comps["worker"] = Component(
        "worker",
        [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--name", WORKER_NAME,
         "--install-policy", "never"],
        mark | meddiffuse | prefect_env | {"PREFECT_API_URL": cfg.api, "PREFECT_WORKER_QUERY_SECONDS": "2",
                                           "PREFECT_LOGGING_EXTRA_LOGGERS": "meddiffuse"},
        None, str(sd / "worker.log"), "worker", None, info={"pool": POOL})
    return comps


def client_env(cfg: StackConfig, comps: dict[str, Component]) -> dict[str, str]:
    """What a user's shell needs to talk to the stack (written to ``stack.env``)."""
    worker_env = comps["worker"].env
    keys = [k for k in worker_env if k.startswith("MEDDIFFUSE_") and k != STACK_ID_ENV]
    out = {k: worker_env[k] for k in keys}
    out["PREFECT_API_URL"] = cfg.api
    return out | {k: v for k, v in TELEMETRY_OFF.items() if k != "PYTHONUNBUFFERED"}


# -- starting and health --------------------------------------------------------------------------------------


def spawn(comp: Component) -> subprocess.Popen:
    Path(comp.log).parent.mkdir(parents=True, exist_ok=True)
    with open(comp.log, "ab") as out:
        out.write(f"\n==== {datetime.now(UTC).isoformat(timespec='seconds')} {' '.join(comp.cmd)}\n".encode())
        out.flush()
        env = base_env() | comp.env | {COMPONENT_ENV: comp.name}
        proc = subprocess.Popen(comp.cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    stat = proc_stat(proc.pid)
    comp.pid, comp.pgid = proc.pid, proc.pid
    comp.start_time = stat[2] if stat else None
    comp.started_at = datetime.now(UTC).isoformat(timespec="seconds")
    return proc


def health_status(comp: Component, cfg_api: str | None = None) -> str | None:
    """A short status once ``comp`` answers its health check, else None."""
    if comp.health in ("s3-moto", "s3-minio"):
        path = "/moto-api/" if comp.health == "s3-moto" else "/minio/health/live"
        return "up" if http_status(f"{comp.url}{path}") is not None else None
    if comp.health == "mlflow":
        return "up" if http_status(f"{comp.url}/health") == 200 else None
    if comp.health == "prefect":
        return "up" if http_status(f"{comp.url}/api/health") == 200 else None
    if comp.health == "worker":
        api = cfg_api or comp.env.get("PREFECT_API_URL")
        try:
            status, body = http("POST", f"{api}/work_pools/{POOL}/workers/filter", {}, timeout=5)
        except OSError:
            return None
        if status != 200:
            return None
        workers = [w for w in json.loads(body) if w.get("name") == WORKER_NAME]
        return f"online, polling pool {POOL}" if workers and workers[0].get("status") == "ONLINE" else None
    if comp.health == "service":
        if http_status(f"{comp.url}/livez") != 200:
            return None
        return "ready" if http_status(f"{comp.url}/readyz") == 200 else "up, waiting for a champion"
    raise ValueError(f"unknown health check {comp.health!r}")


def wait_healthy(comps: list[Component], procs: dict[str, subprocess.Popen | None], timeout: float) -> None:
    """Poll until every component answers; a process that exits, or a timeout, is a StackError."""
    deadline = time.monotonic() + timeout
    pending = {c.name: c for c in comps}
    t0 = time.monotonic()
    while pending:
        for name, comp in list(pending.items()):
            proc = procs.get(name)
            exited = proc.poll() is not None if proc is not None else not comp.alive()
            if exited:
                code = proc.returncode if proc is not None else "?"
                raise StackError(f"{name} exited with code {code} before it was healthy; "
                                 f"tail of {comp.log}:\n{log_tail(comp.log)}")
            status = health_status(comp)
            if status is not None:
                comp.info["status"] = status
                log(f"{name}: {status} after {time.monotonic() - t0:.0f} s")
                del pending[name]
        if pending and time.monotonic() > deadline:
            names = ", ".join(pending)
            tails = "\n".join(f"--- {c.name} ({c.log}):\n{log_tail(c.log, 2000)}" for c in pending.values())
            raise StackError(f"{names}: no healthy answer within {timeout:.0f} s\n{tails}")
        if pending:
            time.sleep(0.5)


def wait_future(future: Any, watched: list[Component], procs: dict[str, subprocess.Popen | None]) -> Any:
    """``future.result()``, failing early if one of the ``watched`` components exits in the meantime."""
    while not future.done():
        for comp in watched:
            proc = procs.get(comp.name)
            if proc is not None and proc.poll() is not None:
                raise StackError(f"{comp.name} exited with code {proc.returncode}; tail of {comp.log}:\n"
                                 f"{log_tail(comp.log)}")
        time.sleep(0.5)
    return future.result()


def setup_s3(comp: Component, secrets_: dict[str, str]) -> None:
    """The bucket. (moto's server accepts any keys: its optional IAM authentication cannot check presigned
    URLs, KeyError 'HTTP_AUTHORIZATION' -> 500, and MLflow's artifact proxy hands clients presigned GETs.)"""
    import boto3

    s3 = boto3.client("s3", endpoint_url=comp.url, region_name="us-east-1",
                      aws_access_key_id=secrets_["s3_access_key"], aws_secret_access_key=secrets_["s3_secret_key"])
    try:
        s3.head_bucket(Bucket=BUCKET)
    except Exception:  # noqa: BLE001 - botocore's ClientError for 404; anything else fails create_bucket below
        s3.create_bucket(Bucket=BUCKET)


def register_webhook(cfg: StackConfig, secret: str) -> str:
    """An MLflow registry webhook: an alias move reaches the explainer at once (it polls as well)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cfg.url("mlflow"), registry_uri=cfg.url("mlflow"))
    url = f"{cfg.url('explainer')}/mlflow_webhook"
    name = "meddiffuse-explainer"
    events = ["model_version_alias.created"]
    for hook in client.list_webhooks():
        if hook.name == name:
            client.update_webhook(hook.webhook_id, url=url, events=events, secret=secret)
            return url
    client.create_webhook(name, url, events, description="meddiffuse stack: follow champion moves", secret=secret)
    return url


def deploy_flows(cfg: StackConfig, comps: dict[str, Component]) -> list[str]:
    """Work pools and deployments onto the stack's Prefect server: ``make prefect-deploy`` (the flows'
    own target) when the Makefile has it, else the same two steps for the process pool."""
    env = base_env() | comps["worker"].env
    log_path = cfg.state_dir / "prefect-deploy.log"
    makefile = (ROOT / "Makefile").read_text() if (ROOT / "Makefile").exists() else ""
    if "\nprefect-deploy:" in makefile and shutil.which("make"):
        commands = [["make", "--no-print-directory", "prefect-deploy"]]
    else:
        prefect = str(BIN / "prefect")
        commands = [[prefect, "work-pool", "create", POOL, "--type", "process", "--overwrite"],
                    [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "flows/prefect.yaml"]]
    with open(log_path, "ab") as out:
        for cmd in commands:
            out.write(f"\n==== {' '.join(cmd)}\n".encode())
            out.flush()
            done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=600, check=False)
            if done.returncode != 0:
                raise StackError(f"prefect-deploy: `{' '.join(cmd)}` exited with {done.returncode}; tail of "
                                 f"{log_path}:\n{log_tail(log_path)}")
    status, body = http("POST", f"{cfg.api}/deployments/filter", {}, timeout=10)
    if status != 200:
        raise StackError(f"prefect-deploy: listing deployments answered {status}: {body[:500]!r}")
    flows = {f["id"]: f["name"] for f in json.loads(http("POST", f"{cfg.api}/flows/filter", {}, timeout=10)[1])}
    return sorted(f"{flows.get(d['flow_id'], '?')}/{d['name']}" for d in json.loads(body))


# -- commands -------------------------------------------------------------------------------------------------


def _stop(comp: Component, stack_id: str | None = None, timeout: float | None = None) -> str:
    """SIGTERM the component's processes, wait, SIGKILL after ``timeout``; returns what happened.

    Its processes: its process group, plus anything carrying its environment markers. The markers matter after
    a ``kill -9`` of a leader: BentoML's worker processes leave the group and keep the port open as orphans."""
    timeout = STOP_TIMEOUT_S.get(comp.name, DEFAULT_STOP_TIMEOUT_S) if timeout is None else timeout
    if comp.pgid is None:
        return "never started"

    leader_alive = comp.alive()

    def processes() -> list[int]:
        return sorted(set(comp.members(stack_id)) | set(marked_processes(stack_id, comp.name) if stack_id else ()))

    pids = processes()
    if not pids:
        return "not running"
    t0 = time.monotonic()
    for sig in (signal.SIGCONT, signal.SIGTERM):  # a paused (SIGSTOPped) process cannot act on SIGTERM
        if leader_alive:
            _signal_group(comp.pgid, sig)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    what = "stopped" if leader_alive else f"ended {len(pids)} leftover process(es) {pids}"
    # a second SIGTERM after a few seconds: Prefect's process worker ignores the first one while idle
    # (its handler turns a second signal into SIGKILL of itself)
    gone = _wait_gone(processes, min(5.0, timeout))
    if not gone:
        for pid in processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        gone = _wait_gone(processes, max(0.0, timeout - 5.0))
    if gone:
        return f"{what} in {time.monotonic() - t0:.1f} s"
    for pid in processes():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait_gone(processes, 10)
    return f"killed after {timeout:.0f} s (SIGTERM was not enough)"


def stop_all(state: State, names: list[str] | None = None) -> list[str]:
    """Stop components in ``STOP_ORDER``; then end, by PID, any process still carrying the stack's id."""
    problems: list[str] = []
    for name in STOP_ORDER:
        comp = state.components.get(name)
        if comp is None or (names is not None and name not in names):
            continue
        outcome = _stop(comp, state.data.get("stack_id"))
        log(f"{name}: {outcome}")
        if comp.members(state.data.get("stack_id")):
            problems.append(f"{name}: processes {comp.members(state.data.get('stack_id'))} are still alive")
    stack_id = state.data.get("stack_id")
    if stack_id and names is None:
        leftovers = marked_processes(stack_id)
        if leftovers:
            log(f"ending {len(leftovers)} leftover process(es) of this stack: {leftovers}")
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            if not _wait_gone(lambda: [p for p in leftovers if is_alive(p)], 10):
                for pid in leftovers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                _wait_gone(lambda: [p for p in leftovers if is_alive(p)], 5)
            still = [p for p in leftovers if is_alive(p)]
            if still:
                problems.append(f"leftover processes {still} survived SIGKILL")
    return problems


def cmd_up(cfg: StackConfig) -> int:
    t_start = time.monotonic()
    existing = State.load(cfg.state_dir)
    if existing is not None:
        running = existing.alive()
        if running:
            names = ", ".join(f"{c.name} (pid {c.pid})" for c in running)
            raise StackError(f"a stack is already running from {existing.path}: {names}. "
                             f"Stop it first with `make stack-down` (python -m deploy.stack down).")
        log(f"removing the state of a stopped stack ({existing.path})")
        stop_all(existing)  # leftovers of a crashed run, if any, by PID
        existing.path.unlink()
    busy = {name: port for name, port in cfg.ports.items() if not port_bindable(port)}
    kind, minio_binary = s3_kind()
    if kind == "moto":
        busy.pop("s3-console", None)
    if busy:
        raise StackError("ports already in use: " + ", ".join(f"{n} {p}" for n, p in busy.items())
                         + " — stop what listens there, or choose others (MEDDIFFUSE_STACK_<NAME>_PORT, --ports auto)")

    sd = cfg.state_dir
    sd.mkdir(parents=True, exist_ok=True)
    fresh = cfg.fresh or kind == "moto"
    if kind == "moto" and not cfg.fresh:
        log("S3 is moto's server (in memory, no minio binary on PATH): MLflow and Prefect start from empty "
            "databases, since objects do not survive a restart")
    from cryptography.fernet import Fernet

    given_key = os.environ.get("MEDDIFFUSE_SERVE__API_KEY", "")
    api_key = given_key or read_or_make_secret(sd / "api-key", lambda: secrets.token_urlsafe(24))
    if given_key:
        write_secret(sd / "api-key", given_key)
    secrets_ = {
        "api_key": api_key,
        "webhook_secret": read_or_make_secret(sd / "webhook-secret", lambda: secrets.token_hex(24)),
        "mlflow_webhook_key": read_or_make_secret(sd / "mlflow-webhook-key", lambda: Fernet.generate_key().decode()),
        "s3_access_key": read_or_make_secret(sd / "s3-access-key", lambda: "meddiffuse-" + secrets.token_hex(4)),
        "s3_secret_key": read_or_make_secret(sd / "s3-secret-key", lambda: secrets.token_urlsafe(24)),
    }
    backends = choose_backends(cfg, fresh)
    stack_id = uuid.uuid4().hex
    state = State(sd)
    state.data = {"stack_id": stack_id, "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
                  "root": str(ROOT), "ports": cfg.ports, "s3_kind": kind, "backends": {
                      k: _redact(v) for k, v in backends.items()}, "api": cfg.api, "fresh": fresh}
    comps = build_components(cfg, secrets_, backends, kind, minio_binary, stack_id)
    procs: dict[str, subprocess.Popen | None] = {}

    def start(*names: str) -> None:
        for name in names:
            procs[name] = spawn(comps[name])
            state.components[name] = comps[name]
            port = f" on port {comps[name].port}" if comps[name].port else ""
            log(f"{name}: started pid {comps[name].pid}{port} (log {comps[name].log})")
        state.save()

    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefect-deploy")
    try:
        start("s3")
        wait_healthy([comps["s3"]], procs, 60)
        setup_s3(comps["s3"], secrets_)
        state.data["s3"] = {"endpoint": f"{HOST}:{cfg.ports['s3']}", "bucket": BUCKET,
                            "access_key": secrets_["s3_access_key"]}
        start("mlflow", "prefect")
        wait_healthy([comps["prefect"]], procs, cfg.start_timeout_s)
        t0 = time.monotonic()
        deploying = executor.submit(deploy_flows, cfg, comps)  # while MLflow migrates and the services boot
        wait_healthy([comps["mlflow"]], procs, cfg.start_timeout_s)
        state.data["webhook"] = register_webhook(cfg, secrets_["webhook_secret"])
        start(*SERVICES)
        deployments = wait_future(deploying, [comps[n] for n in ("s3", "mlflow", "prefect", *SERVICES)], procs)
        log(f"prefect-deploy: {len(deployments)} deployments in {time.monotonic() - t0:.0f} s: "
            + ", ".join(deployments))
        state.data["deployments"] = deployments
        start("worker")
        wait_healthy([comps[n] for n in (*SERVICES, "worker")], procs, cfg.start_timeout_s)
    except (StackError, Exception, KeyboardInterrupt) as exc:
        failed = exc if isinstance(exc, StackError) else StackError(f"{type(exc).__name__}: {exc}")
        log(f"start-up failed: {str(failed).splitlines()[0]}")
        log("stopping what already started")
        state.save()
        stop_all(state)
        executor.shutdown(wait=True)  # `prefect deploy` fails fast once its server is gone
        for proc in procs.values():
            if proc is not None:
                with contextlib.suppress(Exception):
                    proc.wait(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            state.path.unlink()
        raise failed from None

    executor.shutdown(wait=False)
    env = client_env(cfg, comps)
    env_path = sd / "stack.env"
    write_secret(env_path, "\n".join(f"export {k}={_shell_quote(v)}" for k, v in env.items()))
    state.data["env_file"] = str(env_path)
    state.data["up_seconds"] = round(time.monotonic() - t_start, 1)
    state.save()
    print_summary(state, api_key)
    return 0


def _shell_quote(value: str) -> str:
    import shlex

    return shlex.quote(value)


def print_summary(state: State, api_key: str | None = None) -> None:
    c = state.components
    rel = _rel(state.dir)
    lines = [f"meddiffuse stack is up in {state.data.get('up_seconds', '?')} s "
             f"(state {rel}/state.json, logs {rel}/<component>.log)"]

    def row(name: str, what: str, detail: str = "") -> None:
        comp = c.get(name)
        pid = f"pid {comp.pid}" if comp else ""
        status = comp.info.get("status", "") if comp else ""
        lines.append(f"  {name:<10} {what:<48} {pid:<10} {status}" + (f"\n  {'':<10} {detail}" if detail else ""))

    s3 = c["s3"]
    row("s3", f"{s3.info.get('kind')}  {s3.url}", f"bucket {BUCKET}; store s3://{BUCKET}/store")
    row("mlflow", f"MLflow UI      {c['mlflow'].url}", f"backend {c['mlflow'].info['backend']}, artifacts "
        f"{c['mlflow'].info['artifacts']}")
    row("prefect", f"Prefect UI     {c['prefect'].url}", f"backend {c['prefect'].info['backend']}")
    row("worker", f"pool {POOL}", "deployments: " + ", ".join(state.data.get("deployments", [])))
    for name in SERVICES:
        row(name, f"{c[name].url}/  (OpenAPI {c[name].url}/docs.json)")
    if api_key:
        lines.append(f"API key (header X-API-Key): {api_key}   (in {rel}/api-key)")
    lines.append(f"Client settings: source {rel}/stack.env")
    lines.append(f"Run the study:   PREFECT_API_URL={state.data['api']} .venv/bin/prefect deployment run 'study/local'")
    lines.append("Stop:            make stack-down")
    print("\n".join(lines), flush=True)


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def cmd_down(state_dir: Path) -> int:
    state = State.load(state_dir)
    if state is None:
        log(f"no stack state in {state_dir}: nothing to stop")
        return 0
    problems = stop_all(state)
    busy = [f"{n} {p}" for n, p in state.data.get("ports", {}).items()
            if n in state.components and not port_bindable(p)]
    if busy:
        problems.append("ports still in use: " + ", ".join(busy))
    if problems:
        for p in problems:
            log(f"problem: {p}")
        return 1
    state.path.unlink()
    log("stack stopped; nothing of it is running")
    return 0


def cmd_status(state_dir: Path, as_json: bool = False) -> int:
    state = State.load(state_dir)
    if state is None:
        print(f"no stack state in {state_dir}")
        return 3
    rows = {}
    for name in ORDER:
        comp = state.components.get(name)
        if comp is None:
            continue
        alive = comp.alive()
        status = (health_status(comp, state.data.get("api")) or "not answering") if alive else "not running"
        if alive and comp.pid is not None and (proc_stat(comp.pid) or ("",))[0] == "T":
            status = "paused (SIGSTOP)"
        rows[name] = {"pid": comp.pid, "alive": alive, "status": status, "url": comp.url, "log": comp.log}
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        for name, r in rows.items():
            print(f"{name:<10} pid {r['pid']!s:<8} {r['status']:<32} {r['url'] or ''}")
    return 0 if all(r["alive"] for r in rows.values()) else 1


def cmd_restart(state_dir: Path, name: str, timeout: float = 240.0) -> int:
    """Stop (if alive) and start one component with the command and environment recorded at ``up``."""
    state = State.load(state_dir)
    if state is None:
        raise StackError(f"no stack state in {state_dir}: start one with `make stack`")
    comp = state.components.get(name)
    if comp is None:
        raise StackError(f"no component {name!r}; the stack has {', '.join(state.components)}")
    log(f"{name}: {_stop(comp, state.data.get('stack_id'))}")  # also ends what a crashed leader left behind
    if comp.port is not None:
        _wait_bindable(comp.port, 20, name)
    proc = spawn(comp)
    state.save()
    log(f"{name}: started pid {comp.pid}")
    wait_healthy([comp], {name: proc}, timeout)
    state.save()
    return 0


def _wait_bindable(port: int, timeout: float, name: str) -> None:
    deadline = time.monotonic() + timeout
    while not port_bindable(port):
        if time.monotonic() > deadline:
            raise StackError(f"{name}: port {port} is still in use {timeout:.0f} s after the old process ended")
        time.sleep(0.2)


def cmd_signal(state_dir: Path, name: str, sig: int) -> int:
    """SIGSTOP/SIGCONT a component's whole process group (a fault drill: the server hangs, connections time out)."""
    state = State.load(state_dir)
    if state is None:
        raise StackError(f"no stack state in {state_dir}")
    comp = state.components.get(name)
    if comp is None or not comp.alive():
        raise StackError(f"{name} is not running")
    _signal_group(comp.pgid or comp.pid or 0, sig)
    log(f"{name}: {'paused' if sig == signal.SIGSTOP else 'resumed'} (process group {comp.pgid})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=None, help="default .meddiffuse/stack (MEDDIFFUSE_STACK_DIR)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the stack and wait until every component answers")
    up.add_argument("--ports", choices=["default", "auto"], default=os.environ.get("MEDDIFFUSE_STACK_PORTS",
                                                                                  "default"))
    up.add_argument("--db-prefix", default=os.environ.get("MEDDIFFUSE_STACK_DB_PREFIX", "meddiffuse"))
    up.add_argument("--postgres", default=os.environ.get("MEDDIFFUSE_STACK_POSTGRES", DEFAULT_POSTGRES),
                    help="admin URL of a PostgreSQL server, or 'none' for SQLite")
    up.add_argument("--fresh", action="store_true", help="start from empty MLflow and Prefect databases")
    up.add_argument("--timeout", type=float, default=float(os.environ.get("MEDDIFFUSE_STACK_TIMEOUT_S", 240)))
    sub.add_parser("down", help="stop everything the stack started")
    st = sub.add_parser("status", help="each component's PID and health")
    st.add_argument("--json", action="store_true")
    rs = sub.add_parser("restart", help="restart one component")
    rs.add_argument("component", choices=ORDER)
    for verb in ("pause", "resume"):
        p = sub.add_parser(verb, help=f"{verb} one component's processes (SIGSTOP/SIGCONT), for fault drills")
        p.add_argument("component", choices=ORDER)
    args = parser.parse_args(argv)
    state_dir = (args.state_dir or default_state_dir()).resolve()
    try:
        if args.command == "up":
            cfg = StackConfig(state_dir=state_dir, ports=choose_ports(args.ports), db_prefix=args.db_prefix,
                              postgres=None if args.postgres.lower() in ("", "none", "off") else args.postgres,
                              fresh=args.fresh, start_timeout_s=args.timeout, extra_env=forwarded_env())
            return cmd_up(cfg)
        if args.command == "down":
            return cmd_down(state_dir)
        if args.command == "status":
            return cmd_status(state_dir, args.json)
        if args.command == "restart":
            return cmd_restart(state_dir, args.component)
        return cmd_signal(state_dir, args.component, signal.SIGSTOP if args.command == "pause" else signal.SIGCONT)
    except StackError as exc:
        print(f"[stack] error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
