"""Generator service: images from ``meddiffuse-generator-<domain>@champion``.

    bentoml serve services.generator:Generator --port 3001

``POST /generate`` answers inline (``n`` up to ``serve.max_images_per_request``): one image as ``image/png``,
several as ``application/zip`` holding ``<label>-<i>-seed<image seed>.png`` files and a ``manifest.json``
(pinned version, request, per-image seeds). Larger sets run as a task, ``POST /generate_dataset/submit``,
which writes a committed synthetic Dataset to the store (``tasks.synthesize``) from the generator version
pinned at submit time. ``GET /models`` lists the pinned versions served. Every answer names its version
(``X-Model-Version: name/version``, and ``model_version`` in JSON).
"""

import io
import json
import logging
import re
import zipfile
from typing import Any

import bentoml
from pydantic import BaseModel, Field, field_validator
from starlette.responses import Response

from meddiffuse.config import SamplingRecipe, SynthesisSpec
from meddiffuse.tasks import SyntheticResult
from services.common import (
    MODEL_VERSION_HEADER,
    ClientError,
    ServedModels,
    ServiceMiddleware,
    Unavailable,
    fail_fast_registry,
    library_errors,
    models_app,
    openapi_models_path,
    service_options,
    settings,
    setup_logging,
    version_label,
)

log = logging.getLogger("services.generator")
fail_fast_registry()
CFG = settings()
SERVE = CFG.serve
_SAMPLING = SamplingRecipe()  # the one source of the sampling defaults
_current: dict[str, Any] = {"service": None}
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)*$")


class GenerateRequest(BaseModel):
    """Images of one class, answered inline."""

    domain: str = Field(max_length=100, description="A served domain, e.g. brain-mri.")
    label: str = Field(max_length=100, description="Class name (or an accepted alias of one).")
    n: int = Field(1, ge=1, le=SERVE.max_images_per_request,
                   description="Images to draw; more than the limit: use /generate_dataset/submit.")
    sampler: str = Field(_SAMPLING.sampler, max_length=50)
    steps: int = Field(_SAMPLING.sampling_steps, ge=1, le=1000)
    guidance: float = Field(_SAMPLING.guidance, ge=0, le=20)
    seed: int = Field(_SAMPLING.seed, ge=0, le=2**63 - 1, description="The same seed gives the same images.")


    @field_validator("n", mode="before")
    @classmethod
    def _inline_limit(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool) and v > SERVE.max_images_per_request:
            raise ValueError(f"n={v} is more than /generate answers inline (serve.max_images_per_request = "
                             f"{SERVE.max_images_per_request}); POST /generate_dataset/submit writes larger sets "
                             "to the store as a task")
        return v


class DatasetRequest(SynthesisSpec):
    """A synthetic Dataset written to the store by a task (``SynthesisSpec`` plus the domain)."""

    domain: str = Field(max_length=100)
    generator: str | None = Field(
        None, description="Default: the champion served now. Or a version/alias of meddiffuse-generator-<domain>; "
                          "it is pinned at submit time.")
    per_class: int = Field(ge=1, le=SERVE.max_images_per_task)


class DatasetResult(SyntheticResult):
    model_version: str


def _validate_dataset(body: bytes) -> bytes:
    """Before the task is queued: the domain is served, the classes exist, the size is allowed, the prefix
    is a plain store path; and the generator is pinned (``models:/name/version``) into the stored body."""
    from meddiffuse.registry import generator_model_name, parse_model_ref, resolve

    service = _current["service"]
    if service is None:
        raise Unavailable("the generator is still starting")
    req = DatasetRequest.model_validate_json(body or b"{}")
    domain = service.models.resolve_domain(req.domain)
    served = service.models.served(domain)
    with library_errors():
        if req.generator:
            try:
                ref = parse_model_ref(req.generator)
            except ValueError as exc:
                raise ClientError(str(exc)) from None
            if ref.name != generator_model_name(domain):
                raise ClientError(f"generator {req.generator!r} is not a version of {generator_model_name(domain)}")
            pinned = resolve(ref.uri, CFG)
        else:
            pinned = served.pinned
        classes = [served.model.domain.canonical_class(c) for c in req.classes] if req.classes else None
    count = len(classes or served.model.classes)
    if req.per_class * count > SERVE.max_images_per_task:
        raise ClientError(f"{req.per_class} per class x {count} classes = {req.per_class * count} images exceeds "
                          f"serve.max_images_per_task = {SERVE.max_images_per_task}")
    prefix = req.prefix.strip().strip("/")
    if not _PREFIX_RE.match(prefix) or ".." in prefix.split("/"):
        raise ClientError(f"prefix {req.prefix!r} is not a plain store path (letters, digits, . _ - and /)")
    pinned_req = req.model_copy(update={"generator": pinned.uri, "classes": classes, "prefix": prefix})
    return pinned_req.model_dump_json().encode()


@bentoml.service(name="meddiffuse-generator", **service_options(SERVE, timeout_s=300))
class Generator:
    """Sample images from the generator champions."""

    def __init__(self) -> None:
        setup_logging("generator")
        self.models = ServedModels("generator", CFG)
        _current["service"] = self
        self.models.load()
        self.models.start()

    def __is_ready__(self) -> bool:
        return self.models.ready

    @bentoml.on_shutdown
    def _stop(self) -> None:
        self.models.stop()

    @bentoml.api(input_spec=GenerateRequest)
    def generate(self, **fields: Any) -> bytes:
        """``n`` images of class ``label``: one PNG (``image/png``), or a ZIP (``application/zip``) of
        ``<label>-<i>-seed<image seed>.png`` plus ``manifest.json``. Same request, same bytes."""
        from meddiffuse import tasks
        from meddiffuse.data.dataset import encode_png
        from meddiffuse.generate.seeding import class_seeds

        req = GenerateRequest(**fields)
        served = self.models.served(req.domain)
        generator, pinned = served.model, served.pinned
        with library_errors():
            index = generator.class_index(req.label)
            label = generator.classes[index]
            images = tasks.sample_images(generator, label, req.n, seed=req.seed, sampler=req.sampler,
                                         steps=req.steps, guidance=req.guidance)
        seeds = class_seeds(req.seed, index, req.n)  # the per-image seeds sample_images used
        version = version_label(pinned)
        headers = {MODEL_VERSION_HEADER: version, "X-Image-Seeds": ",".join(map(str, seeds))}
        names = [f"{label}-{i}-seed{s}.png" for i, s in enumerate(seeds)]
        if req.n == 1:
            headers["Content-Disposition"] = f'inline; filename="{names[0]}"'
            return Response(encode_png(images[0]), media_type="image/png", headers=headers)  # type: ignore
        manifest = {
            "model_version": version, "model": pinned.as_dict(), "domain": req.domain, "label": label,
            "n": req.n, "resolution": generator.resolution, "channels": generator.channels,
            "request": req.model_dump(mode="json"),
            "images": [{"file": f, "index": i, "seed": s} for i, (f, s) in enumerate(zip(names, seeds, strict=True))],
        }
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, image in zip(names, images, strict=True):
                zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), encode_png(image))
            zf.writestr(zipfile.ZipInfo("manifest.json", date_time=(1980, 1, 1, 0, 0, 0)),
                        json.dumps(manifest, indent=2))
        headers["Content-Disposition"] = f'attachment; filename="{label}-{req.n}-seed{req.seed}.zip"'
        return Response(buffer.getvalue(), media_type="application/zip", headers=headers)  # type: ignore

    @bentoml.task(input_spec=DatasetRequest)
    def generate_dataset(self, **fields: Any) -> DatasetResult:
        """Write a synthetic Dataset (``per_class`` images of each class) to the store at ``prefix``, in
        resumable shards; answers its prefix, id, count and the pinned generator."""
        from meddiffuse import tasks

        req = DatasetRequest(**fields)
        spec = SynthesisSpec(**req.model_dump(exclude={"domain"}))
        with library_errors():
            result = tasks.synthesize(spec, settings=CFG)
        name, _, version = result.generator.removeprefix("models:/").rpartition("/")
        return DatasetResult(**result.model_dump(), model_version=f"{name}/{version}")


def _models() -> ServedModels | None:
    service = _current["service"]
    return service.models if service is not None else None


Generator.mount_asgi_app(models_app(_models), path="/")
Generator.add_asgi_middleware(
    ServiceMiddleware, validators={"/generate_dataset/submit": _validate_dataset},
    task_routes={"/generate_dataset"}, openapi_paths=openapi_models_path("generator"),
)
