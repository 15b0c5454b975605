"""What the three services share: config, served models, errors, JSON logs and one ASGI middleware.

``ServiceMiddleware`` sits inside BentoML's own layers (metrics, timeout, ``traffic.max_concurrency`` -> 429)
and does, per HTTP request:

* a request id: ``X-Request-ID`` echoed when it is sane, else generated; on every response and log line;
* the API key (``X-API-Key``, ``serve.api_key``; '' = off): missing or wrong -> 401. Health, metrics and
  docs stay open; the MLflow webhook route is checked by its HMAC signature instead;
* the body limit (``serve.max_body_bytes``): ``Content-Length`` over it, or a chunked body that grows past
  it, -> 413. The body is buffered here and replayed to BentoML (raising inside ``receive`` would be a 500);
* multipart pre-parsing: a broken body, a text value where a file is expected, a form-urlencoded upload,
  or an image part whose declared type contradicts its bytes -> 4xx instead of BentoML's 500;
* validators run *before* BentoML queues a task (BentoML accepts any task body with 200 and fails later),
  and may rewrite the body (the generator pins its champion at submit time);
* error bodies in one shape: ``{"error", "status", "request_id"[, "detail"]}``;
* one JSON access-log line per request (probes excepted).

Client errors (4xx) are logged without a traceback (``ClientErrorFilter``); a 5xx keeps its traceback.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import hashlib
import hmac
import json
import logging
import re
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from functools import lru_cache
from http import HTTPStatus
from typing import Any

from bentoml.exceptions import BentoMLException

from meddiffuse.config import ServeConfig, Settings

log = logging.getLogger("services")

API_KEY_HEADER = "X-API-Key"
REQUEST_ID_HEADER = "X-Request-ID"
MODEL_VERSION_HEADER = "X-Model-Version"
OPEN_PATHS = frozenset({"/", "/healthz", "/livez", "/readyz", "/metrics", "/docs.json", "/schema.json"})
OPEN_PREFIXES = ("/static_content/", "/assets/")
PROBE_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics"})
WEBHOOK_PATH = "/mlflow_webhook"
WEBHOOK_MAX_AGE_S = 300  # replay protection: a signed delivery older than this is refused

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("meddiffuse_request_id", default=None)
REQUEST_FIELDS: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "meddiffuse_request_fields", default=None)
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def fail_fast_registry() -> None:
    """For the serving services: an MLflow REST call fails within seconds instead of retrying for ~4 minutes
    (MLflow's default of 7 retries with backoff). A failed re-resolve only means the loaded version keeps
    serving until the next one; a long one would hold the refresh lock that the webhook waits on. Explicit
    ``MLFLOW_HTTP_REQUEST_*`` settings win."""
    import os

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


@lru_cache(maxsize=1)
def settings() -> Settings:
    """The process's settings (``MEDDIFFUSE_*``), read once: decorators, middleware and services agree."""
    return Settings()


def service_options(serve: ServeConfig, *, timeout_s: float = 60.0) -> dict[str, Any]:
    """``@bentoml.service`` keyword arguments from config: threads and workers set deliberately (BentoML's
    default of 1 thread serialises every sync API), concurrency limit (-> 429), BentoML's access log off
    (``ServiceMiddleware`` writes a JSON one)."""
    return {
        "workers": serve.workers,
        "threads": serve.threads,
        "traffic": {"max_concurrency": serve.max_concurrency, "timeout": timeout_s},
        "logging": {"access": {"enabled": False}},
        "metrics": {"enabled": True},
    }


def request_field(name: str) -> str | None:
    """A query parameter or a multipart text field of the current request (e.g. ``domain``)."""
    fields = REQUEST_FIELDS.get()
    return None if fields is None else fields.get(name)


# -- errors --------------------------------------------------------------------------------------------


class ClientError(BentoMLException):
    """A request that cannot succeed as sent; BentoML answers with ``status`` and the message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message, error_code=HTTPStatus(status))


class Unavailable(BentoMLException):
    error_code = HTTPStatus.SERVICE_UNAVAILABLE


def _client_error_types() -> tuple[type[BaseException], ...]:
    from meddiffuse.classify.architectures import UnknownArchitectureError
    from meddiffuse.classify.weights import WeightsError
    from meddiffuse.data.dataset import DatasetNotFound
    from meddiffuse.data.ingest import ImageRejected
    from meddiffuse.domains import UnknownClassError
    from meddiffuse.generate.errors import InvalidGeneratorRequest

    return (ImageRejected, UnknownClassError, InvalidGeneratorRequest, UnknownArchitectureError, WeightsError,
            DatasetNotFound)


@contextlib.contextmanager
def library_errors() -> Iterator[None]:
    """The library's exceptions as HTTP answers: what the caller can fix -> 4xx, the registry gone -> 503.
    Anything else stays a 500 with its traceback in the log (a bug to fix, not a client error)."""
    from meddiffuse.domains import UnknownDomainError
    from meddiffuse.registry import ModelNotFound, ModelNotLoaded, RegistryUnavailable

    try:
        yield
    except (BentoMLException, ClientError):
        raise
    except UnknownDomainError as exc:
        raise ClientError(str(exc), 400) from None
    except ModelNotFound as exc:
        raise ClientError(str(exc), 404) from None
    except (ModelNotLoaded, RegistryUnavailable) as exc:
        raise Unavailable(str(exc)) from None
    except _client_error_types() as exc:
        raise ClientError(str(exc), 400) from None


def is_client_error(exc: BaseException | None) -> bool:
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException

    if isinstance(exc, ValidationError):
        return True
    if isinstance(exc, BentoMLException):
        return int(exc.error_code) < 500
    if isinstance(exc, HTTPException):
        return exc.status_code < 500
    return False


def error_body(status: int, message: str, detail: Any = None) -> bytes:
    body: dict[str, Any] = {"error": message, "status": status, "request_id": REQUEST_ID.get()}
    if detail is not None:
        body["detail"] = detail
    return json.dumps(body, default=str).encode()


def validation_detail(exc: Any) -> list[dict[str, Any]]:
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
            for e in exc.errors(include_context=False, include_input=False)]


# -- logging -------------------------------------------------------------------------------------------

_SERVICE_NAME = {"name": None}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, service, request_id, http fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if _SERVICE_NAME["name"]:
            out["service"] = _SERVICE_NAME["name"]
        rid = getattr(record, "request_id", None) or REQUEST_ID.get()
        if rid:
            out["request_id"] = rid
        http = getattr(record, "http", None)
        if isinstance(http, dict):
            out.update(http)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class ClientErrorFilter(logging.Filter):
    """BentoML logs every failed request at ERROR with a traceback; for a client error (INFO) or an expected
    outage such as the registry being down (``Unavailable``, WARNING), keep one line without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info and record.exc_info is not True else None
        if exc is not None and (is_client_error(exc) or isinstance(exc, Unavailable)):
            client = is_client_error(exc)
            record.msg = "client error: %s: %s" if client else "unavailable: %s: %s"
            record.args = (type(exc).__name__, str(exc).splitlines()[0][:500] if str(exc) else "")
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = (logging.INFO, "INFO") if client else (logging.WARNING, "WARNING")
        return True


def setup_logging(service: str) -> None:
    """JSON lines on stdout for this worker: BentoML's loggers, uvicorn's, MLflow's and ours."""
    import mlflow  # noqa: F401 - it installs its own handler on import: import it first, then take it over

    _SERVICE_NAME["name"] = service
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ClientErrorFilter())
    for name in ("", "bentoml", "uvicorn", "uvicorn.error", "uvicorn.access", "circus", "mlflow"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        if name:
            logger.propagate = False
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("meddiffuse", "services"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.captureWarnings(True)


# -- served models -------------------------------------------------------------------------------------


class ServedModels:
    """The champions one service serves, one ``ModelHandle`` per domain, kept fresh by a background thread
    (every ``reload_interval_s / 2``), so a moved alias is loaded off the request path and swapped at once."""

    def __init__(self, kind: str, cfg: Settings) -> None:
        from meddiffuse import tasks

        factory = {"classifier": tasks.classifier_handle, "generator": tasks.generator_handle}[kind]
        self.kind = kind
        self.interval = cfg.serve.reload_interval_s
        self.handles = {d: factory(d, settings=cfg) for d in cfg.serve.domains}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def load(self) -> None:
        from meddiffuse.registry import ModelNotLoaded

        for domain, handle in self.handles.items():
            try:
                handle.get()
            except ModelNotLoaded as exc:
                log.warning("%s for %s not served yet: %s", self.kind, domain, exc)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"refresh-{self.kind}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        period = max(0.2, self.interval / 2)
        while not self._stop.wait(period):
            for handle in self.handles.values():
                try:
                    handle.refresh()  # logs and keeps the loaded version when the registry is unreachable
                except Exception:  # noqa: BLE001 - the refresher must outlive any one failure
                    log.exception("refreshing %s failed", handle.ref.uri)

    @property
    def ready(self) -> bool:
        return any(h.ready for h in self.handles.values())

    def default_domain(self) -> str:
        for domain, handle in self.handles.items():
            if handle.ready:
                return domain
        raise Unavailable(f"no {self.kind} is loaded yet (domains {list(self.handles)})")

    def resolve_domain(self, domain: str | None) -> str:
        """``domain``, or the first served one when None/empty; 4xx when it is unknown or not served here."""
        from meddiffuse.domains import UnknownDomainError, get_domain

        if domain is None or domain == "":
            return self.default_domain()
        if domain not in self.handles:
            try:
                get_domain(domain)
            except UnknownDomainError as exc:
                raise ClientError(f"{exc}; this service serves {list(self.handles)}", 400) from None
            raise ClientError(f"domain {domain!r} is not served here; served: {list(self.handles)}", 404)
        return domain

    def handle(self, domain: str | None):
        return self.handles[self.resolve_domain(domain)]

    def served(self, domain: str | None):
        """``Served(model, pinned)`` for ``domain`` (None = the first served); 4xx when it cannot be."""
        from meddiffuse.registry import ModelNotLoaded

        handle = self.handle(domain)
        try:
            return handle.get()
        except ModelNotLoaded as exc:
            raise ClientError(str(exc), 404) from None

    def by_name(self, name: str):
        return next((h for h in self.handles.values() if h.ref.name == name), None)

    def describe(self) -> list[dict[str, Any]]:
        rows = []
        for domain, handle in self.handles.items():
            pinned = handle.pinned
            row: dict[str, Any] = {"domain": domain, "ref": handle.ref.uri, "ready": handle.ready,
                                   "last_error": handle.last_error}
            if pinned is not None:
                row.update(pinned.as_dict(), model_version=version_label(pinned))
            rows.append(row)
        return rows


def version_label(pinned: Any) -> str:
    """``name/version``: the value of ``X-Model-Version`` and of every ``model_version`` field."""
    return f"{pinned.name}/{pinned.version}"


def models_app(get_models: Callable[[], ServedModels | None],
               extra: Callable[[], dict[str, Any]] | None = None) -> Any:
    """A tiny Starlette app for ``GET /models`` (BentoML API routes are POST only)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def models(_request: Any) -> JSONResponse:
        served = get_models()
        rows = served.describe() if served is not None else []
        body: dict[str, Any] = {"models": rows, "reload_interval_s": served.interval if served else None}
        if extra is not None:
            body["webhooks"] = extra()
        return JSONResponse(body)

    return Starlette(routes=[Route("/models", models, methods=["GET"])])


# -- webhooks ------------------------------------------------------------------------------------------


def webhook_signature(secret: str, delivery_id: str, timestamp: str, body: bytes | str) -> str:
    """MLflow's ``X-MLflow-Signature``: ``v1,`` + base64(HMAC-SHA256(secret, f"{id}.{ts}.{body}"))."""
    payload = body.decode("utf-8") if isinstance(body, bytes) else body
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.{payload}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def check_webhook(secret: str, headers: Any, body: bytes, now: float | None = None) -> str | None:
    """None if the delivery is signed with ``secret`` and fresh, else the reason to refuse it."""
    signature = headers.get("x-mlflow-signature")
    delivery_id = headers.get("x-mlflow-delivery-id")
    timestamp = headers.get("x-mlflow-timestamp")
    if not (signature and delivery_id and timestamp):
        return "missing X-MLflow-Signature, X-MLflow-Delivery-Id or X-MLflow-Timestamp"
    try:
        age = abs((now or time.time()) - int(timestamp))
    except ValueError:
        return "X-MLflow-Timestamp is not a Unix timestamp"
    if age > WEBHOOK_MAX_AGE_S:
        return f"delivery timestamp is {age:.0f} s away from now (limit {WEBHOOK_MAX_AGE_S} s)"
    try:
        expected = webhook_signature(secret, delivery_id, timestamp, body)
    except UnicodeDecodeError:
        return "body is not UTF-8"
    if not hmac.compare_digest(expected.encode(), signature.strip().encode()):
        return "wrong signature"
    return None


# -- the middleware ------------------------------------------------------------------------------------

Validator = Callable[[bytes], bytes | None]  # raises ClientError / ValidationError; may return a new body

_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
          (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"))
_TYPE_ALIASES = {"jpg": "jpeg", "pjpeg": "jpeg", "x-png": "png", "tif": "tiff", "x-ms-bmp": "bmp", "x-bmp": "bmp"}


def sniff_image_format(head: bytes) -> str | None:
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


class _Reject(Exception):  # noqa: N818 - an answer, not a failure
    def __init__(self, status: int, message: str, detail: Any = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.detail, self.headers = status, message, detail, headers or {}


class ServiceMiddleware:
    """See the module docstring. Options (all keyword):

    ``file_fields``: path -> field names that must be file parts; ``validators``: path -> ``Validator``;
    ``task_routes``: bare task routes (``/train_classifier``) refused in favour of ``.../submit``;
    ``version_from_body``: paths whose JSON list answer names its model in ``model_version`` (batched
    ``/predict``): the middleware lifts it into ``X-Model-Version``; ``webhook``: verify MLflow signatures on
    ``/mlflow_webhook``.
    """

    def __init__(self, app: Any, *, file_fields: dict[str, set[str]] | None = None,
                 validators: dict[str, Validator] | None = None, task_routes: set[str] | None = None,
                 version_from_body: set[str] | None = None, webhook: bool = False,
                 openapi_paths: dict[str, Any] | None = None) -> None:
        self.app = app
        serve = settings().serve
        self.api_key = serve.api_key.get_secret_value().encode()
        self.webhook_secret = serve.webhook_secret.get_secret_value()
        self.limit = serve.max_body_bytes
        self.drain = min(4 * self.limit, self.limit + 64 * 1024 * 1024)
        self.file_fields = file_fields or {}
        self.validators = validators or {}
        self.task_routes = task_routes or set()
        self.version_from_body = version_from_body or set()
        self.webhook = webhook
        self.openapi_paths = openapi_paths or {}

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import Headers, QueryParams

        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        rid = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        rid_token = REQUEST_ID.set(rid)
        fields: dict[str, str] = dict(QueryParams(scope.get("query_string", b"")))
        fields_token = REQUEST_FIELDS.set(fields)
        path, method = scope.get("path", ""), scope.get("method", "")
        state = {"status": None, "t0": time.perf_counter(), "logged": False}
        transform = None
        if path == "/docs.json":
            transform = lambda doc: fix_openapi(doc, self.openapi_paths, bool(self.api_key))  # noqa: E731
        elif path in self.version_from_body:
            transform = _lift_version
        reply = _Replier(send, rid, path, state, transform=transform,
                         on_done=lambda: _access_log(method, path, state, headers))
        try:
            if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
                await self.app(scope, receive, reply)
                return
            self._check_key(path, headers)
            body = await self._read_body(headers, receive)
            if self.webhook and path == WEBHOOK_PATH:
                self._check_webhook(headers, body)
            if path in self.task_routes and method == "POST":
                raise _Reject(404, f"{path} runs as a task: POST {path}/submit, then GET {path}/status?task_id=..."
                                   f" and GET {path}/get?task_id=...")
            if method == "POST":
                await self._check_form(path, headers, body, fields)
                validator = self.validators.get(path)
                if validator is not None:
                    import anyio.to_thread

                    new = await anyio.to_thread.run_sync(_run_validator, validator, body)
                    if new is not None:
                        body = new
                        scope = _with_length(scope, len(body))
            await self.app(scope, _replay(body, receive), reply)
        except _Reject as rej:
            await reply.reject(rej)
        except _Disconnected:
            # answer anyway: BentoML's TimeoutMiddleware waits for a first `send` until its timeout, and an
            # unanswered request keeps the worker from shutting down (uvicorn drops sends after a disconnect)
            with contextlib.suppress(Exception):
                await reply.reject(_Reject(400, "client disconnected before the body was complete"))
            state["status"] = 499
        except Exception:
            if state["status"] is None:
                state["status"] = 500
            raise
        finally:
            if not state["logged"]:
                _access_log(method, path, state, headers)
            REQUEST_FIELDS.reset(fields_token)
            REQUEST_ID.reset(rid_token)

    def _check_key(self, path: str, headers: Any) -> None:
        if not self.api_key or (self.webhook and path == WEBHOOK_PATH):
            return
        given = headers.get("x-api-key", "").encode()
        if not given:
            raise _Reject(401, f"missing API key: send it in the {API_KEY_HEADER} header",
                          headers={"WWW-Authenticate": API_KEY_HEADER})
        if not hmac.compare_digest(given, self.api_key):
            raise _Reject(401, f"wrong API key in the {API_KEY_HEADER} header",
                          headers={"WWW-Authenticate": API_KEY_HEADER})

    async def _read_body(self, headers: Any, receive: Callable[[], Awaitable[dict]]) -> bytes:
        declared = headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise _Reject(400, "Content-Length is not a number") from None
            if size > self.drain:  # far too large to read at all: answer now and close
                raise _Reject(413, self._too_large(size), headers={"Connection": "close"})
        chunks: list[bytes] = []
        size, too_large = 0, False
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                too_large = True
                chunks.clear()
            elif chunk:
                chunks.append(chunk)
            if not message.get("more_body", False) or size > self.drain:
                break
        if too_large:  # read (up to a cap) and dropped, so the client sees the answer, not a reset
            raise _Reject(413, self._too_large(size), headers={"Connection": "close"})
        return b"".join(chunks)

    def _too_large(self, size: int) -> str:
        return (f"request body of {size} bytes or more exceeds the limit of {self.limit} "
                "(MEDDIFFUSE_SERVE__MAX_BODY_BYTES)")

    def _check_webhook(self, headers: Any, body: bytes) -> None:
        if not self.webhook_secret:
            raise _Reject(403, "the MLflow webhook is off: set MEDDIFFUSE_SERVE__WEBHOOK_SECRET")
        reason = check_webhook(self.webhook_secret, headers, body)
        if reason is not None:
            raise _Reject(401, f"webhook refused: {reason}")

    async def _check_form(self, path: str, headers: Any, body: bytes, fields: dict[str, str]) -> None:
        from starlette.datastructures import UploadFile
        from starlette.formparsers import FormParser, MultiPartParser

        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        wanted = self.file_fields.get(path, set())
        if content_type == "application/x-www-form-urlencoded" and wanted:
            raise _Reject(415, f"{path} takes a file upload: send multipart/form-data with a file part "
                               f"{sorted(wanted)}")
        if content_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
            return

        async def stream():
            yield body

        parser_cls = MultiPartParser if content_type == "multipart/form-data" else FormParser
        try:
            form = await parser_cls(headers, stream()).parse()
        except Exception as exc:  # noqa: BLE001 - any parser failure is the body's fault
            raise _Reject(400, f"malformed {content_type} body: {getattr(exc, 'message', exc)}") from None
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key not in wanted:  # BentoML would json.loads its bytes: a 500 on binary data
                        raise _Reject(400, f"unexpected file part {key!r}; {path} takes files in "
                                           f"{sorted(wanted) or 'no field'}")
                    await _check_part_type(key, value)
                elif key in wanted:
                    raise _Reject(400, f"field {key!r} must be a file part (with a filename), not a text value")
                else:
                    fields.setdefault(key, value)
        finally:
            await form.close()


def _run_validator(validator: Validator, body: bytes) -> bytes | None:
    from pydantic import ValidationError

    try:
        return validator(body)
    except ValidationError as exc:
        detail = validation_detail(exc)
        raise _Reject(400, "; ".join(_describe(d) for d in detail[:5]) or str(exc), detail) from None
    except BentoMLException as exc:
        status = int(exc.error_code)
        if status >= 500:
            raise
        raise _Reject(status, exc.message) from None


async def _check_part_type(key: str, part: Any) -> None:
    declared = (part.content_type or "").split(";")[0].strip().lower()
    if not declared.startswith("image/"):
        return  # application/octet-stream or none: judged by the bytes alone
    head = await part.read(16)
    await part.seek(0)
    actual = sniff_image_format(head)
    want = declared[len("image/"):]
    want = _TYPE_ALIASES.get(want, want)
    if actual is not None and want not in ("*", actual):
        raise _Reject(415, f"part {key!r} is declared {declared} but holds a {actual.upper()} image: "
                           f"send image/{actual} or application/octet-stream")


class _Disconnected(Exception):  # noqa: N818
    pass


def _replay(body: bytes, receive: Callable[[], Awaitable[dict]]) -> Callable[[], Awaitable[dict]]:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect like the server would

    return replay


def _with_length(scope: dict[str, Any], length: int) -> dict[str, Any]:
    raw = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-length", b"transfer-encoding")]
    return {**scope, "headers": [*raw, (b"content-length", str(length).encode())]}


class _Replier:
    """Wraps ``send``: adds the request id, normalises error bodies, lifts ``model_version`` into a header."""

    def __init__(self, send: Callable[[dict], Awaitable[None]], rid: str, path: str, state: dict[str, Any],
                 transform: Callable[[Any], tuple[Any, dict[str, str]]] | None, on_done: Callable[[], None]) -> None:
        self.send, self.rid, self.path, self.state = send, rid, path, state
        self.transform, self.on_done = transform, on_done
        self.start: dict[str, Any] | None = None
        self.chunks: list[bytes] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        from starlette.datastructures import MutableHeaders

        if message["type"] == "http.response.start":
            self.state["status"] = message["status"]
            headers = MutableHeaders(scope=message)
            headers[REQUEST_ID_HEADER] = self.rid
            json_body = headers.get("content-type", "").startswith("application/json")
            if json_body and (message["status"] >= 400 or self.transform is not None):
                self.start = message  # hold it: the body decides the final headers
                return
            await self.send(message)
            return
        if message["type"] == "http.response.body" and self.start is not None:
            self.chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(self.chunks)
            start, self.start = self.start, None
            headers = MutableHeaders(scope=start)
            if start["status"] >= 400:
                body = _normalise_error(body, start["status"], self.rid)
            elif self.transform is not None:
                with contextlib.suppress(ValueError):
                    data, extra = self.transform(json.loads(body))
                    body = json.dumps(data).encode()
                    for key, value in extra.items():
                        headers[key] = value
            headers["content-length"] = str(len(body))
            await self.send(start)
            await self.send({"type": "http.response.body", "body": body, "more_body": False})
            self._done()
            return
        await self.send(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self._done()

    def _done(self) -> None:  # logged when the answer is sent, not after a task's background work
        self.state["t1"] = time.perf_counter()
        if not self.state["logged"]:
            self.on_done()

    async def reject(self, rej: _Reject) -> None:
        body = error_body(rej.status, rej.message, rej.detail)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   *((k.lower().encode(), v.encode()) for k, v in rej.headers.items())]
        self.state["error"] = rej.message
        await self({"type": "http.response.start", "status": rej.status, "headers": headers})
        await self({"type": "http.response.body", "body": body, "more_body": False})


def _normalise_error(body: bytes, status: int, rid: str) -> bytes:
    try:
        data = json.loads(body or b"null")
    except ValueError:
        return body
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
        data = data[0]  # BentoML wraps a raised exception's body in a list
    if not isinstance(data, dict):
        data = {"error": data}
    message = data.pop("error", None) or HTTPStatus(status).phrase
    detail = data.get("detail")
    if isinstance(detail, list) and detail and all(isinstance(d, dict) and "msg" in d for d in detail):
        message = "; ".join(_describe(d) for d in detail[:5])  # pydantic's errors, readable in one line
    out = {"error": message, "status": status, "request_id": rid}
    if detail is not None:
        out["detail"] = detail
    return json.dumps(out, default=str).encode()


def _describe(error: dict[str, Any]) -> str:
    loc = ".".join(str(part) for part in error.get("loc") or ())
    return f"{loc}: {error['msg']}" if loc else str(error["msg"])


def _lift_version(data: Any) -> tuple[Any, dict[str, str]]:
    """A batched answer (a JSON list) names its model per row; the header names them all."""
    rows = data if isinstance(data, list) else [data]
    versions = sorted({r["model_version"] for r in rows if isinstance(r, dict) and "model_version" in r})
    return data, ({MODEL_VERSION_HEADER: ",".join(versions)} if versions else {})


def fix_openapi(doc: Any, extra_paths: dict[str, Any], api_key: bool) -> tuple[Any, dict[str, str]]:
    """BentoML labels its spec OpenAPI 3.0.2 but fills it with pydantic's JSON Schema 2020-12 numeric
    ``exclusiveMinimum``/``exclusiveMaximum``, which 3.0 tools (schemathesis) reject: rewrite them to the
    3.0 form. Add what BentoML cannot see: the API-key scheme and routes served beside it (``GET /models``)."""

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
                value = node.get(bound)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    node[limit], node[bound] = value, True
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    if isinstance(doc, dict):
        walk(doc)
        for path, item in extra_paths.items():
            for method, op in item.items():
                target = doc.setdefault("paths", {}).setdefault(path, {}).setdefault(method, {})
                for key, value in op.items():
                    if key == "parameters":
                        target.setdefault("parameters", []).extend(value)
                    else:
                        target[key] = value
        if api_key:
            doc.setdefault("components", {}).setdefault("securitySchemes", {})["ApiKey"] = {
                "type": "apiKey", "in": "header", "name": API_KEY_HEADER}
            doc["security"] = [{"ApiKey": []}]
    return doc, {}


DOMAIN_QUERY = {"name": "domain", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 100},
                "description": "Domain whose champion answers (default: the first served)."}


def openapi_models_path(kind: str) -> dict[str, Any]:
    """The ``GET /models`` entry for the docs (the route is mounted beside BentoML's)."""
    return {"/models": {"get": {
        "summary": f"The {kind} versions this service serves, pinned (name, version, alias, run id)",
        "operationId": "models", "tags": ["Service APIs"],
        "responses": {"200": {"description": "Served models", "content": {"application/json": {
            "schema": {"type": "object", "properties": {
                "models": {"type": "array", "items": {"type": "object"}},
                "reload_interval_s": {"type": "number"}}}}}}}}}}


def _access_log(method: str, path: str, state: dict[str, Any], headers: Any) -> None:
    state["logged"] = True
    if path in PROBE_PATHS and (state["status"] or 500) < 400:
        return
    status = state["status"] or 500
    end = state.get("t1") or time.perf_counter()
    http = {"method": method, "path": path, "status": status, "ms": round((end - state["t0"]) * 1000, 1),
            "bytes_in": headers.get("content-length")}
    if state.get("error"):
        http["error"] = state["error"]
    level = logging.ERROR if status >= 500 and path not in PROBE_PATHS else logging.INFO  # not ready is no error
    log.log(level, "%s %s %s", method, path, status, extra={"http": http})

