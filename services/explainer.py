"""Explainer service: class probabilities and LIME explanations from ``meddiffuse-classifier-<domain>@champion``.

    bentoml serve services.explainer:Explainer --port 3003

``POST /predict`` (multipart, one or more ``images`` file parts; ``domain`` as a query or form field, default
the first served) is adaptively batched across requests: uploads are decoded and checked while the request
is parsed, so a bad image fails only its own request, never a batch. ``POST /explain`` (one ``image``)
answers probabilities, LIME weights per superpixel, the top segments, an overlay PNG (base64) and the
deletion faithfulness. ``GET /models`` lists the pinned versions served; a moved alias is served within
``serve.reload_interval_s``, or at once when MLflow's registry webhook calls ``POST /mlflow_webhook``.
Every answer names the version that produced it (``X-Model-Version: name/version`` and ``model_version``).
"""

import base64
import logging
from pathlib import Path
from typing import Annotated, Any

import bentoml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

from services.common import (
    DOMAIN_QUERY,
    MODEL_VERSION_HEADER,
    ClientError,
    ServedModels,
    ServiceMiddleware,
    Unavailable,
    fail_fast_registry,
    library_errors,
    models_app,
    openapi_models_path,
    request_field,
    service_options,
    settings,
    setup_logging,
    version_label,
)

log = logging.getLogger("services.explainer")
fail_fast_registry()
CFG = settings()
SERVE = CFG.serve
PREDICT_BATCH = max(2, SERVE.predict_batch)  # BentoML requires max_batch_size > 1
_current: dict[str, Any] = {"service": None}


class DecodedUpload:
    """An uploaded image decoded for the classifier that will see it (done while the request is parsed)."""

    __slots__ = ("array", "data", "domain", "pinned")

    def __init__(self, data: bytes, domain: str, array: Any, pinned: Any) -> None:
        self.data, self.domain, self.array, self.pinned = data, domain, array, pinned


def _decode(path: Path) -> DecodedUpload:
    from meddiffuse import tasks

    service = _current["service"]
    if service is None:
        raise Unavailable("the explainer is still starting")
    data = path.read_bytes()
    domain = service.models.resolve_domain(request_field("domain"))
    served = service.models.served(domain)
    try:
        with library_errors():
            array = tasks.decode_upload(served.model, data, CFG.ingest.max_pixels)
    except ClientError as exc:
        raise ClientError(f"image rejected: {exc.message}", 400) from None
    return DecodedUpload(data, domain, array, served.pinned)


ImageUpload = Annotated[Path, AfterValidator(_decode)]


class Prediction(BaseModel):
    model_version: str = Field(description="name/version of the classifier that answered.")
    domain: str
    predicted: str
    probabilities: dict[str, float]


class Explanation(BaseModel):
    model_version: str
    model: dict[str, Any] = Field(description="The pinned version: name, version, alias, uri, run_id.")
    domain: str
    predicted: str
    explained: str = Field(description="The class whose evidence the weights show.")
    probabilities: dict[str, float]
    weights: dict[int, float] = Field(description="LIME weight of each superpixel (segment id -> weight).")
    top_segments: list[int]
    segments: list[list[int]] = Field(description="Superpixel map: H x W segment ids (the classifier's input grid).")
    faithfulness: float = Field(description="Deletion faithfulness of the explanation.")
    num_samples: int
    overlay_png: str = Field(description="Base64 PNG: the image with the top superpixels outlined.")


class WebhookPayload(BaseModel):
    """What MLflow's registry webhook sends (``X-MLflow-Signature`` is checked before this is parsed)."""

    model_config = ConfigDict(extra="allow")
    entity: str = Field(max_length=100)
    action: str = Field(max_length=100)
    timestamp: str | None = Field(None, max_length=100)
    data: dict[str, Any] = Field(default_factory=dict)


@bentoml.service(name="meddiffuse-explainer", **service_options(SERVE))
class Explainer:
    """Predict and explain with the classifier champions."""

    def __init__(self) -> None:
        setup_logging("explainer")
        self.models = ServedModels("classifier", CFG)
        self.webhooks = {"received": 0, "last": None}
        _current["service"] = self
        self.models.load()
        self.models.start()

    def __is_ready__(self) -> bool:
        return self.models.ready

    @bentoml.on_shutdown
    def _stop(self) -> None:
        self.models.stop()

    @bentoml.api(batchable=True, max_batch_size=PREDICT_BATCH, max_latency_ms=60_000)
    def predict(
        self, images: Annotated[list[ImageUpload], Field(min_length=1, max_length=PREDICT_BATCH)]
    ) -> list[Prediction]:
        """Class probabilities for each uploaded image (multipart ``images``; ``?domain=`` optional).
        Requests are batched together; each answer names its model in ``model_version``."""
        from meddiffuse import tasks

        out: list[Prediction | None] = [None] * len(images)
        by_domain: dict[str, list[int]] = {}
        for i, item in enumerate(images):
            by_domain.setdefault(item.domain, []).append(i)
        for domain, rows in by_domain.items():
            served = self.models.served(domain)
            arrays = [self._array_for(images[i], served) for i in rows]
            probs = tasks.predict_images(served.model, arrays)
            label = version_label(served.pinned)
            classes = list(served.model.classes)
            for i, p in zip(rows, probs, strict=True):
                out[i] = Prediction(model_version=label, domain=domain, predicted=classes[int(p.argmax())],
                                    probabilities={c: float(v) for c, v in zip(classes, p, strict=True)})
        return out  # type: ignore[return-value]

    @staticmethod
    def _array_for(item: DecodedUpload, served: Any) -> Any:
        """The array decoded at parse time, or decoded again if the alias moved in between (the new version
        may take another size or channel count; the bytes already decoded once, so this cannot fail)."""
        from meddiffuse import tasks

        if item.pinned.version == served.pinned.version:
            return item.array
        return tasks.decode_upload(served.model, item.data, CFG.ingest.max_pixels)

    @bentoml.api
    def explain(
        self,
        image: ImageUpload,
        domain: Annotated[str | None, Field(max_length=100, description="Default: the first served.")] = None,
        num_samples: Annotated[int | None, Field(ge=10, le=SERVE.lime_samples)] = None,
        seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0,
    ) -> Explanation:
        """LIME for one image: probabilities, superpixel weights, top segments, an overlay PNG and the deletion
        faithfulness, from the champion of ``domain``."""
        from meddiffuse import tasks

        served = self.models.served(image.domain)
        samples = num_samples or SERVE.lime_samples
        with library_errors():
            result = tasks.explain_images(served.model, [self._array_for(image, served)], num_samples=samples,
                                          seed=seed)[0]
        label = version_label(served.pinned)
        body = Explanation(
            model_version=label, model=served.pinned.as_dict(), domain=image.domain, predicted=result.predicted,
            explained=result.explained, probabilities=result.probabilities, weights=result.weights,
            top_segments=result.top_segments, segments=result.segments, faithfulness=result.faithfulness,
            num_samples=samples, overlay_png=base64.b64encode(result.overlay_png).decode(),
        )
        return JSONResponse(body.model_dump(mode="json"), headers={MODEL_VERSION_HEADER: label})  # type: ignore

    @bentoml.api(route="/mlflow_webhook", input_spec=WebhookPayload)
    def mlflow_webhook(self, entity: str, action: str, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        """MLflow registry webhook (``model_version_alias.created``): re-resolve the alias now. The signature
        (``X-MLflow-Signature``, secret ``serve.webhook_secret``) is checked before this runs."""
        event = f"{entity}.{action}"
        answer: dict[str, Any] = {"event": event, "refreshed": False}
        handle = self.models.by_name(str(data.get("name", "")))
        if event != "model_version_alias.created" or handle is None or data.get("alias") != handle.ref.alias:
            answer["ignored"] = "not an alias move of a model served here"
        else:
            answer["refreshed"] = handle.refresh()
            if handle.last_error:
                self._record_webhook(answer | {"error": handle.last_error})
                raise Unavailable(f"cannot follow the alias now: {handle.last_error}")
            if handle.pinned is not None:
                answer["model_version"] = version_label(handle.pinned)
        self._record_webhook(answer)
        log.info("webhook %s: %s", event, answer)
        return answer

    def _record_webhook(self, answer: dict[str, Any]) -> None:
        self.webhooks = {"received": self.webhooks["received"] + 1, "last": answer}  # one assignment


def _models() -> ServedModels | None:
    service = _current["service"]
    return service.models if service is not None else None


def _webhooks() -> dict[str, Any]:
    service = _current["service"]
    return service.webhooks if service is not None else {}


# BentoML derives a list answer's media type from its JSON schema on every response (~0.6 ms here); fixing
# it up front is what BentoML itself does for streaming outputs.
Explainer.apis["predict"].output_spec.media_type = "application/json"
Explainer.mount_asgi_app(models_app(_models, extra=_webhooks), path="/")
Explainer.add_asgi_middleware(
    ServiceMiddleware, file_fields={"/predict": {"images"}, "/explain": {"image"}}, version_from_body={"/predict"},
    webhook=True,
    openapi_paths={**openapi_models_path("classifier"), "/predict": {"post": {"parameters": [DOMAIN_QUERY]}}},
)
