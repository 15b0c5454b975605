"""Where a flow's heavy steps run: one interface, two implementations, chosen by ``settings.flows.backend``.

- ``InProcessBackend`` (``inprocess``, the default): calls ``meddiffuse.tasks`` in this process. This is what
  runs on one machine with the embedded defaults, and inside a Kubernetes job that the ``meddiffuse-gpu`` work
  pool starts on a GPU node. It can also run a synthesis shard by shard, so a flow maps the shards.
- ``HTTPBackend`` (``http``): submits the same specs to the BentoML services' task endpoints
  (``POST {url}/<task>/submit`` → ``{task_id}``, ``GET {url}/<task>/status?task_id=`` until it is done,
  ``GET {url}/<task>/get?task_id=``) with the ``X-API-Key`` header; the trainer serves ``train_classifier``
  and ``train_generator``, the generator serves ``generate_dataset`` (which shards inside the service).

Both return the library's own result models, so a flow cannot tell them apart. Neither holds science:
the idempotence that makes a retry safe lives in ``meddiffuse.tasks`` (committed records and shard manifests
in the store, spec fingerprints on registered versions), whichever side of the wire runs it.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import BaseModel

from meddiffuse.config import ClassifierSpec, GeneratorSpec, Settings, SynthesisSpec

if TYPE_CHECKING:  # the result models import numpy and the data layer; the CLI should start fast
    from meddiffuse.tasks import ClassifierResult, GeneratorResult, SyntheticResult

M = TypeVar("M", bound=BaseModel)

# BentoML task routes (the service methods carry exactly these names; each takes its spec as the JSON body)
TRAIN_CLASSIFIER = "train_classifier"
TRAIN_GENERATOR = "train_generator"
GENERATE_DATASET = "generate_dataset"


class BackendError(RuntimeError):
    """A heavy step could not be run or did not succeed on the backend."""


class RemoteTaskFailed(BackendError):
    """The service ran the task and it failed (the service's error message is in the text)."""


class BadRequest(BackendError):
    """The service refused the request (4xx: an invalid spec, a wrong API key): retrying cannot help."""


class Backend(ABC):
    """What a flow's heavy steps need: train a classifier, train a generator, sample a synthetic dataset."""

    name: ClassVar[str]
    #: whether ``plan``/``pending``/``run_shard``/``commit`` run here, so a flow can map the shards itself
    shards_locally: ClassVar[bool] = False

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()

    @abstractmethod
    def train_classifier(self, spec: ClassifierSpec) -> ClassifierResult: ...

    @abstractmethod
    def train_generator(self, spec: GeneratorSpec) -> GeneratorResult: ...

    @abstractmethod
    def generate_dataset(self, spec: SynthesisSpec) -> SyntheticResult: ...


class InProcessBackend(Backend):
    """``meddiffuse.tasks`` in this process, on this machine's device (a GPU inside a GPU job)."""

    name = "inprocess"
    shards_locally = True

    def _store(self):
        from meddiffuse.store import create_store

        return create_store(self.settings)

    def train_classifier(self, spec: ClassifierSpec) -> ClassifierResult:
        from meddiffuse.tasks import train_and_register_classifier

        return train_and_register_classifier(spec, settings=self.settings, store=self._store())

    def train_generator(self, spec: GeneratorSpec) -> GeneratorResult:
        from meddiffuse.tasks import train_and_register_generator

        return train_and_register_generator(spec, settings=self.settings, store=self._store())

    def generate_dataset(self, spec: SynthesisSpec) -> SyntheticResult:
        from meddiffuse.tasks import synthesize

        return synthesize(spec, settings=self.settings, store=self._store())

    # -- the shards of one synthesis, for a flow that maps them -------------------------------------------
    def plan(self, spec: SynthesisSpec):
        from meddiffuse.tasks import plan_synthesis

        return plan_synthesis(spec, settings=self.settings, store=self._store())

    def pending(self, spec: SynthesisSpec, plan: Any) -> list[Any]:
        from meddiffuse.tasks import pending_synthesis_shards

        return pending_synthesis_shards(spec, plan, settings=self.settings, store=self._store())

    def run_shard(self, spec: SynthesisSpec, plan: Any, shard: Any) -> int:
        from meddiffuse.tasks import run_synthesis_shard

        return run_synthesis_shard(spec, plan, shard, settings=self.settings, store=self._store())

    def commit(self, spec: SynthesisSpec, plan: Any) -> SyntheticResult:
        from meddiffuse.tasks import commit_synthesis

        return commit_synthesis(spec, plan, settings=self.settings, store=self._store())


class HTTPBackend(Backend):
    """The BentoML services' task endpoints: submit, poll the status, fetch the result."""

    name = "http"
    DONE: ClassVar[frozenset[str]] = frozenset({"completed", "failed", "canceled", "cancelled"})

    def __init__(self, settings: Settings | None = None, *, timeout_s: float | None = None,
                 request_timeout_s: float = 30.0, transport: Any = None) -> None:
        super().__init__(settings)
        self.timeout_s = timeout_s  # None: wait as long as the task runs (a Prefect task timeout can cap it)
        self.request_timeout_s = request_timeout_s
        self._transport = transport  # tests may pass an httpx transport

    def train_classifier(self, spec: ClassifierSpec) -> ClassifierResult:
        from meddiffuse.tasks import ClassifierResult

        return self.run_task(self.settings.flows.trainer_url, TRAIN_CLASSIFIER, spec, ClassifierResult)

    def train_generator(self, spec: GeneratorSpec) -> GeneratorResult:
        from meddiffuse.tasks import GeneratorResult

        return self.run_task(self.settings.flows.trainer_url, TRAIN_GENERATOR, spec, GeneratorResult)

    def generate_dataset(self, spec: SynthesisSpec) -> SyntheticResult:
        """The generator service serves its domains' registered generators: ``spec.generator`` must be a
        version or alias of ``meddiffuse-generator-<domain>`` (the service pins it at submit time)."""
        from meddiffuse.registry import GENERATOR_PREFIX, is_registry_ref, parse_model_ref
        from meddiffuse.tasks import SyntheticResult

        name = parse_model_ref(spec.generator).name if is_registry_ref(spec.generator) else ""
        if not name.startswith(GENERATOR_PREFIX):
            raise BackendError(f"the generator service samples registered generators "
                               f"({GENERATOR_PREFIX}<domain>@alias or /version), not {spec.generator!r}")
        body = spec.model_dump(mode="json") | {"domain": name.removeprefix(GENERATOR_PREFIX)}
        return self.run_task(self.settings.flows.generator_url, GENERATE_DATASET, body, SyntheticResult)

    # -- the BentoML task protocol ------------------------------------------------------------------------
    def _client(self, base_url: str):
        import httpx

        headers = {"Accept": "application/json"}
        key = self.settings.serve.api_key.get_secret_value()
        if key:
            headers["X-API-Key"] = key
        transport = self._transport or httpx.HTTPTransport(retries=3)  # retries connect errors only
        return httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=self.request_timeout_s,
                            transport=transport)

    def run_task(self, base_url: str, task: str, spec: BaseModel | dict[str, Any], result_type: type[M]) -> M:
        """Submit ``spec`` (the JSON body) to ``{base_url}/{task}``, wait until the service reports the task
        done, and return its result as ``result_type``."""
        body = spec.model_dump(mode="json") if isinstance(spec, BaseModel) else spec
        with self._client(base_url) as client:
            submitted = self._json(client.post(f"/{task}/submit", json=body), f"submit {task}")
            task_id = submitted.get("task_id")
            if not task_id:
                raise BackendError(f"{base_url}/{task}/submit answered without a task_id: {submitted}")
            started = time.monotonic()
            while True:
                status = str(self._json(client.get(f"/{task}/status", params={"task_id": task_id}),
                                        f"status of {task} {task_id}").get("status", "")).lower()
                if status in self.DONE:
                    break
                if self.timeout_s is not None and time.monotonic() - started > self.timeout_s:
                    raise BackendError(f"{task} {task_id} on {base_url} still {status!r} after {self.timeout_s:.0f} s")
                time.sleep(self.settings.flows.poll_interval_s)
            response = client.get(f"/{task}/get", params={"task_id": task_id})
            if status != "completed":
                raise RemoteTaskFailed(f"{task} {task_id} on {base_url} ended {status}: {_error_text(response)}")
            return result_type.model_validate(self._json(response, f"result of {task} {task_id}"))

    @staticmethod
    def _json(response: Any, what: str) -> Any:
        if response.status_code in (401, 403):
            raise BadRequest(f"{what}: {response.status_code} from {response.request.url} — check "
                             "MEDDIFFUSE_SERVE__API_KEY (sent as X-API-Key)")
        if 400 <= response.status_code < 500 and response.status_code not in (404, 408, 429):
            raise BadRequest(f"{what}: HTTP {response.status_code} from {response.request.url}: "
                             f"{_error_text(response)}")
        if response.status_code >= 400:
            raise BackendError(f"{what}: HTTP {response.status_code} from {response.request.url}: "
                               f"{_error_text(response)}")
        try:
            return response.json()
        except ValueError:
            raise BackendError(f"{what}: {response.request.url} did not answer JSON: {response.text[:200]!r}") from None


def _error_text(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        return str(body.get("error") or body.get("detail") or body)[:500]
    return str(body)[:500]


BACKENDS: dict[str, type[Backend]] = {InProcessBackend.name: InProcessBackend, HTTPBackend.name: HTTPBackend}


def get_backend(settings: Settings | None = None) -> Backend:
    """The backend ``settings.flows.backend`` names (``MEDDIFFUSE_FLOWS__BACKEND``)."""
    settings = settings or Settings()
    return BACKENDS[settings.flows.backend](settings)
