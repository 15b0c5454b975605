"""Trainer service: train and register classifiers and generators as BentoML tasks.

    bentoml serve services.trainer:Trainer --port 3002

``POST /train_classifier/submit`` (a ``ClassifierSpec``) and ``POST /train_generator/submit`` (a
``GeneratorSpec``) answer ``{task_id}``; ``GET /<task>/status?task_id=`` and ``GET /<task>/get?task_id=`` follow
it to the result: run id, pinned version (``model_version``: name/version) and, for a classifier, metrics on
the real test split. A spec is checked before the task is queued (domain, datasets in the store and their
classes, architecture or preset): an invalid one gets a 4xx with the reason instead of a task that fails.
"""

import logging
from typing import Any

import bentoml

from meddiffuse.config import ClassifierSpec, GeneratorSpec
from meddiffuse.tasks import ClassifierResult, GeneratorResult
from services.common import (
    ClientError,
    ServiceMiddleware,
    library_errors,
    service_options,
    settings,
    setup_logging,
)

log = logging.getLogger("services.trainer")
CFG = settings()
SERVE = CFG.serve


class TrainedClassifier(ClassifierResult):
    model_version: str | None = None


class TrainedGenerator(GeneratorResult):
    model_version: str | None = None


def _store():
    from meddiffuse.store import create_store

    return create_store(CFG)


def _check_datasets(domain_name: str, prefixes: list[str], test: str | None = None) -> None:
    from meddiffuse.data.dataset import open_dataset
    from meddiffuse.domains import get_domain

    domain = get_domain(domain_name)
    store = _store()
    for prefix in prefixes:
        ds = open_dataset(store, prefix)
        if list(ds.classes) != list(domain.classes):
            raise ClientError(f"dataset {prefix!r} has classes {list(ds.classes)}, not those of {domain.name} "
                              f"({list(domain.classes)})")
        if prefix == test and not ds.manifest.select("test"):
            raise ClientError(f"dataset {prefix!r} has no `test` split to score on")


def validate_classifier_spec(body: bytes) -> None:
    """Refuse at submit what would fail later: unknown domain or architecture, missing or mismatched datasets."""
    from meddiffuse.classify.architectures import check_architecture

    spec = ClassifierSpec.model_validate_json(body or b"{}")
    with library_errors():
        check_architecture(spec.arch)
        _check_datasets(spec.domain, [*dict.fromkeys([*spec.train, spec.test])], test=spec.test)
    return None


def validate_generator_spec(body: bytes) -> None:
    """Refuse at submit: unknown domain or preset, a missing or mismatched dataset."""
    from meddiffuse.generate import PRESETS

    spec = GeneratorSpec.model_validate_json(body or b"{}")
    if spec.generator_preset not in PRESETS:
        raise ClientError(f"unknown generator preset {spec.generator_preset!r}; choose one of {list(PRESETS)}")
    with library_errors():
        _check_datasets(spec.domain, [spec.dataset])
    return None


def _label(result: Any) -> str | None:
    return f"{result.name}/{result.version}" if result.name and result.version else None


@bentoml.service(name="meddiffuse-trainer", **service_options(SERVE))
class Trainer:
    """Long-running training as tasks: submit -> task_id -> status -> result."""

    def __init__(self) -> None:
        setup_logging("trainer")
        from meddiffuse.classify.architectures import check_architecture
        from meddiffuse.registry import registry_client

        check_architecture("resnet18")  # imports timm now, not in the first request's validation
        registry_client(CFG)  # the registry is configured (and reachable) before we say ready
        self._ready = True

    def __is_ready__(self) -> bool:
        return self._ready

    @bentoml.task(input_spec=ClassifierSpec)
    def train_classifier(self, **fields: Any) -> TrainedClassifier:
        """Train a classifier on the training datasets, score it on the real test split, register it."""
        from meddiffuse import tasks

        spec = ClassifierSpec(**fields)
        log.info("training classifier %s for %s on %s", spec.arch, spec.domain, spec.train)
        with library_errors():
            result = tasks.train_and_register_classifier(spec, settings=CFG)
        return TrainedClassifier(**result.model_dump(), model_version=_label(result))

    @bentoml.task(input_spec=GeneratorSpec)
    def train_generator(self, **fields: Any) -> TrainedGenerator:
        """Train (resuming from checkpoints) a generator on a real dataset's train split and register it."""
        from meddiffuse import tasks

        spec = GeneratorSpec(**fields)
        log.info("training generator %s for %s on %s", spec.generator_preset, spec.domain, spec.dataset)
        with library_errors():
            result = tasks.train_and_register_generator(spec, settings=CFG)
        return TrainedGenerator(**result.model_dump(), model_version=_label(result))


Trainer.add_asgi_middleware(
    ServiceMiddleware,
    validators={"/train_classifier/submit": validate_classifier_spec,
                "/train_generator/submit": validate_generator_spec},
    task_routes={"/train_classifier", "/train_generator"},
)
