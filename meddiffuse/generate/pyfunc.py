"""The generator as an MLflow pyfunc model, and logging it into the registry.

The pyfunc's only artifact is the saved generator folder (the same files as ``<prefix>/model/``), so
``load_context`` is just ``load_generator(folder)``, and the registry serves exactly the images the
library makes for the same class and seed.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from meddiffuse.config import SamplingRecipe, Settings
from meddiffuse.generate.artifact import load_generator, write_generator_folder
from meddiffuse.generate.errors import InvalidGeneratorRequest
from meddiffuse.generate.metadata import GENERATOR_JSON, GeneratorMeta
from meddiffuse.generate.pipeline import DiffusionGenerator
from meddiffuse.store.base import ObjectStore

if TYPE_CHECKING:
    from meddiffuse.registry import ModelVersionInfo

try:  # mlflow is a dependency, but keep the library importable where it is absent
    import mlflow
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    mlflow = None
    PythonModel = object  # type: ignore[misc,assignment]

ARTIFACT_KEY = "generator"
EXPERIMENT = "meddiffuse-generator"
_SAMPLING = SamplingRecipe()
REQUEST_DEFAULTS: dict[str, Any] = {
    "n": 1, "seed": _SAMPLING.seed, "steps": _SAMPLING.sampling_steps, "guidance": _SAMPLING.guidance,
    "sampler": _SAMPLING.sampler, "batch_size": 64,
}


class GeneratorPyfunc(PythonModel):
    """``predict`` takes rows {class, n, seed, steps, guidance[, sampler, batch_size]} -> (N, H, W, C) uint8.

    Each row yields the ``n`` images a generated dataset with that ``seed`` (and batch size, default 64)
    would hold for that class (``DiffusionGenerator.sample_class``); rows are concatenated in order.
    A small ``batch_size`` makes a request for a few images cheap (the UNet always runs full batches).
    """

    # predict takes arrays/rows, not typed inputs: MLflow's type-hint validation (and its warning) does not apply
    _skip_type_hint_validation = True

    def __init__(self) -> None:
        self.generator: DiffusionGenerator | None = None

    def load_context(self, context):
        self.generator = load_generator(context.artifacts[ARTIFACT_KEY], store=None, device="cpu")

    # no type hints on predict: MLflow would try to derive a (wrong) signature from them
    def predict(self, context, model_input, params=None):
        if self.generator is None:
            self.load_context(context)
        assert self.generator is not None
        images = [self._row(row) for row in _rows(model_input)]
        if not images:
            raise InvalidGeneratorRequest("empty request: give at least one row {class, n, seed}")
        return np.concatenate(images)

    def _row(self, row: Mapping[str, Any]) -> np.ndarray:
        if "class" not in row:
            raise InvalidGeneratorRequest(f"each request row needs a 'class'; got columns {sorted(row)}")
        req = {**REQUEST_DEFAULTS, **{k: v for k, v in row.items() if v is not None and v == v}}
        label = req["class"]
        label = int(label) if isinstance(label, int | np.integer) else str(label)
        return self.generator.sample_class(
            label, int(req["n"]), int(req["seed"]), sampler=str(req["sampler"]), steps=int(req["steps"]),
            guidance=float(req["guidance"]), batch_size=int(req["batch_size"]),
        )


def _rows(model_input: Any) -> list[dict[str, Any]]:
    """Rows from a pandas DataFrame, a dict of columns, a dict for one row, or a list of dicts."""
    if hasattr(model_input, "to_dict"):
        return list(model_input.to_dict(orient="records"))
    if isinstance(model_input, Mapping):
        values = list(model_input.values())
        if values and all(isinstance(v, list | tuple | np.ndarray) for v in values):
            n = len(values[0])
            return [{k: v[i] for k, v in model_input.items()} for i in range(n)]
        return [dict(model_input)]
    if isinstance(model_input, list | tuple):
        return [dict(r) for r in model_input]
    raise InvalidGeneratorRequest(f"unsupported request type {type(model_input).__name__}")


def generator_signature(meta: GeneratorMeta) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema([
        ColSpec("string", "class"),
        ColSpec("long", "n", required=False),
        ColSpec("long", "seed", required=False),
        ColSpec("long", "steps", required=False),
        ColSpec("double", "guidance", required=False),
        ColSpec("string", "sampler", required=False),
        ColSpec("long", "batch_size", required=False),
    ])
    outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, meta.resolution, meta.resolution, meta.channels))])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_generator_model(
    generator: str,
    registered_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    *,
    store: ObjectStore | None = None,
    settings: Settings | None = None,
    alias: str | None = None,
) -> ModelVersionInfo:
    """Log a saved generator (store prefix or local folder) as a pyfunc and register a new version.

    The version (of ``meddiffuse-generator-<domain>`` by default) is tagged with domain, classes,
    resolution, dataset id and steps trained, plus ``tags``; ``alias`` (e.g. ``champion``) is optional.
    """
    from meddiffuse.registry import configure_mlflow, generator_model_name, register_logged_model
    from meddiffuse.registry.client import quiet_mlflow
    from meddiffuse.registry.versions import pinned_requirements
    from meddiffuse.store.tracking import tracked_run

    settings = settings or Settings()
    configure_mlflow(settings)
    with tempfile.TemporaryDirectory(prefix="meddiffuse-pyfunc-") as tmp:
        folder = write_generator_folder(generator, store, tmp)
        meta = GeneratorMeta.model_validate_json((folder / GENERATOR_JSON).read_text())
        name = registered_name or generator_model_name(meta.domain)
        version_tags = {
            "domain": meta.domain,
            "classes": ",".join(meta.classes),
            "resolution": str(meta.resolution),
            "channels": str(meta.channels),
            "dataset_id": meta.dataset_id or "",
            "steps_trained": str(meta.steps_trained),
            "generator_id": meta.weights_id,
            "preset": meta.config.preset,
            "source": generator,
            **{k: str(v) for k, v in (tags or {}).items()},
        }
        run = (tracked_run(EXPERIMENT, f"register-{name}", settings, tags={"kind": "generator-registration"})
               if mlflow.active_run() is None else contextlib.nullcontext())
        with run, warnings.catch_warnings(), quiet_mlflow():
            warnings.filterwarnings("ignore", message=".*An input example was not provided")
            logged = mlflow.pyfunc.log_model(
                name=ARTIFACT_KEY,
                python_model=GeneratorPyfunc(),
                artifacts={ARTIFACT_KEY: str(folder)},
                signature=generator_signature(meta),
                # given, not inferred: inference re-imports the model in a subprocess (slow, may try the network)
                pip_requirements=pinned_requirements("torch", "diffusers", "safetensors", "numpy", "pydantic"),
            )
    return register_logged_model(logged.model_uri, name, tags=version_tags, alias=alias, settings=settings)



