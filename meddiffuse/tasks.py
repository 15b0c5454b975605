"""The task functions every door calls: CLI commands, BentoML services, Prefect tasks and the experiment.

Each takes a spec from ``meddiffuse.config`` (or plain values), does one piece of the protocol through
the science modules, and returns a JSON-able result. They are idempotent: a retry after a crash finishes
the work without duplicating it, because every result is committed to the store (write, then a small
record last) and every registered version carries the fingerprint of the spec that made it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from meddiffuse.config import (
    CPU_STUDY,
    ClassifierSpec,
    GeneratorSpec,
    Settings,
    SynthesisSpec,
    without_added_defaults,
)
from meddiffuse.data.dataset import Dataset, TrainData, open_dataset, train_data_of
from meddiffuse.domains import get_domain
from meddiffuse.registry import (
    CHAMPION,
    SPEC_TAG,
    AliasMoved,
    ModelHandle,
    PinnedVersion,
    classifier_model_name,
    current_alias,
    describe_version,
    find_version_by_tag,
    generator_model_name,
    is_registry_ref,
    parse_model_ref,
    promote,
    resolve,
    tag_version,
)
from meddiffuse.store import ObjectNotFound, ObjectStore, create_store

log = logging.getLogger(__name__)

RECORD_FILE = "task.json"  # the commit point of a train-and-register task under its prefix


# spec fields added after records were fingerprinted, with the value they had implicitly before
ADDED_FIELDS: dict[str, Any] = {"augmentation_strength": 1.0, "mixup": 0.0, "cutmix": 0.0, "ema_decay": None}


def fingerprint(spec: BaseModel, *, exclude: set[str] | None = None, extra: dict[str, Any] | None = None) -> str:
    """A short content hash of what determines a task's result (``alias`` and ``prefix`` do not)."""
    payload = spec.model_dump(mode="json", exclude=(exclude or set()) | {"alias", "prefix", "register_model"})
    payload = without_added_defaults(payload, ADDED_FIELDS)  # older records keep matching their specs
    raw = json.dumps({"spec": payload, **(extra or {})}, sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def _ctx(settings: Settings | None, store: ObjectStore | None) -> tuple[Settings, ObjectStore]:
    settings = settings or Settings()
    return settings, store or create_store(settings)


def _read_record(store: ObjectStore, prefix: str) -> dict[str, Any] | None:
    try:
        return json.loads(store.get_text(f"{prefix}/{RECORD_FILE}"))
    except ObjectNotFound:
        return None


# -- classifiers ---------------------------------------------------------------------------------------


class ClassifierResult(BaseModel):
    """A trained, evaluated and (usually) registered classifier."""

    domain: str
    arch: str
    train_data: TrainData
    pretrained: str | None
    prefix: str = Field(description="Store prefix of the saved classifier.")
    fingerprint: str
    name: str | None = None
    version: int | None = None
    uri: str | None = Field(None, description="models:/name/version, pinned.")
    run_id: str | None = None
    metrics: dict[str, float]
    evaluation: dict[str, Any] = Field(description="EvalResult on the real test split (with intervals).")
    dataset_ids: dict[str, Any]
    n_train: int
    best_epoch: int | None = None
    reused: bool = Field(False, description="True when a retry found the work already done.")


def train_and_register_classifier(
    spec: ClassifierSpec,
    *,
    settings: Settings | None = None,
    store: ObjectStore | None = None,
    progress: bool = False,
) -> ClassifierResult:
    """Train ``spec.arch`` on the training datasets, score it on the real test split, save it to the store
    and register it as a new version of ``meddiffuse-classifier-<domain>``.

    Idempotent: the spec's fingerprint (datasets by content id) is recorded on the version and in a
    record committed last; a retry returns the committed result, re-uses a version registered before a
    crash (no second version), and re-uses saved weights instead of training again.
    """
    from meddiffuse.classify import create_classifier, evaluate, load_classifier, save_classifier, train_classifier
    from meddiffuse.classify.registry import register_classifier

    settings, store = _ctx(settings, store)
    domain = get_domain(spec.domain)
    train_sets = [open_dataset(store, prefix) for prefix in spec.train]
    test_set = open_dataset(store, spec.test)
    for ds in (*train_sets, test_set):
        if list(ds.classes) != list(domain.classes):
            raise ValueError(f"dataset {ds.prefix!r} has classes {ds.classes}, not those of {domain.name}")
    if not test_set.manifest.select("test"):
        raise ValueError(f"dataset {spec.test!r} has no `test` split to score on")
    train_data = train_data_of(train_sets)
    ids = {"train": [ds.id for ds in train_sets], "test": test_set.id}
    fp = fingerprint(spec, exclude={"train", "test"}, extra={"datasets": ids})
    prefix = (spec.prefix or f"classifiers/{domain.name}/{spec.arch}-{train_data}-{fp}").strip("/")

    record = _read_record(store, prefix)
    if record is not None and record.get("fingerprint") == fp:
        log.info("classifier %s already done: %s", prefix, record.get("uri") or prefix)
        return ClassifierResult.model_validate(record | {"reused": True})

    reused = False
    try:
        clf = load_classifier(prefix, store, settings)
        row = json.loads(store.get_text(f"{prefix}/classifier.json")).get("info", {})
        if row.get("fingerprint") != fp:
            raise ObjectNotFound(prefix)
        reused = True
        log.info("re-using the classifier saved at %s (a previous attempt stopped before registering)", prefix)
    except (ObjectNotFound, FileNotFoundError):
        weights = None if spec.weights == "none" else spec.weights
        clf = create_classifier(
            spec.arch, domain.num_classes, domain.channels, weights=weights, input_size=spec.input_size,
            classes=domain.classes, channels=domain.channels, weights_dir=settings.weights_dir, seed=spec.seed,
        )
        clf.resolution = max(ds.manifest.resolution for ds in train_sets)
        clf.to(settings.torch_device())
        train = train_classifier(
            clf, [(ds, "train") for ds in train_sets], domain=domain, epochs=spec.epochs,
            batch_size=spec.batch_size, lr=spec.lr, balanced=spec.balanced, val_fraction=spec.val_fraction,
            early_stopping_patience=spec.early_stopping_patience, augmentation_strength=spec.augmentation_strength,
            mixup=spec.mixup, cutmix=spec.cutmix, ema_decay=spec.ema_decay, seed=spec.seed, progress=progress,
        )
        result = evaluate(clf, test_set, "test", bootstrap=spec.bootstrap, seed=spec.seed)
        row = {
            "fingerprint": fp, "evaluation": result.model_dump(mode="json"), "metrics": result.scalars(),
            "n_train": sum(len(ds.manifest.select("train")) for ds in train_sets),
            "best_epoch": train.best_epoch,
        }
        save_classifier(clf, store, prefix, info=row)

    out = ClassifierResult(
        domain=domain.name, arch=spec.arch, train_data=train_data, pretrained=clf.pretrained_source, prefix=prefix,
        fingerprint=fp, metrics=row["metrics"], evaluation=row["evaluation"], dataset_ids=ids,
        n_train=row["n_train"], best_epoch=row.get("best_epoch"), reused=reused,
    )
    if spec.register_model:
        name = classifier_model_name(domain.name)
        found = find_version_by_tag(name, SPEC_TAG, fp, settings)
        if found is not None:
            version, run_id = found.version, found.run_id
            out.reused = True
            log.info("%s/%s already registered for this spec: not registering again", name, version)
        else:
            info = register_classifier(
                clf, domain=domain.name, train_data=train_data,
                dataset_ids={"train": ",".join(ids["train"]), "test": ids["test"]},
                metrics=_headline(row["metrics"]), extra_tags={SPEC_TAG: fp, "store_prefix": prefix},
                settings=settings,
            )
            version, run_id = info.version, info.run_id
        if spec.alias:
            promote(name, version, alias=spec.alias, settings=settings)
        out.name, out.version, out.uri, out.run_id = name, version, f"models:/{name}/{version}", run_id
    store.put_text(f"{prefix}/{RECORD_FILE}", out.model_dump_json(indent=2))  # the commit point
    return out


def _headline(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k in ("accuracy", "balanced_accuracy", "macro_f1", "auc")
            or k.endswith(("_ci95_low", "_ci95_high"))}


# -- generators ----------------------------------------------------------------------------------------


class GeneratorResult(BaseModel):
    domain: str
    prefix: str = Field(description="Store prefix of the generator run (model under <prefix>/model).")
    fingerprint: str
    dataset_id: str
    preset: str
    steps_trained: int
    parameters: int
    final_loss: float | None = None
    images_per_second: float | None = None
    stopped_by: str
    horizon: int | None = None
    mixed_precision: str = Field("no", description="What the run trained in: no (float32), bf16 or fp16.")
    name: str | None = None
    version: int | None = None
    uri: str | None = None
    run_id: str | None = None
    alias: str | None = None
    reused: bool = False


def train_and_register_generator(
    spec: GeneratorSpec,
    *,
    settings: Settings | None = None,
    store: ObjectStore | None = None,
    progress: bool = False,
) -> GeneratorResult:
    """Train (resuming from its checkpoints) a generator on ``spec.dataset``'s train split and register it
    as a new version of ``meddiffuse-generator-<domain>``. Idempotent like the classifier task.

    ``spec.alias`` is set on the new version; without one, ``champion`` is set only if the model has
    none yet (so the generator service has something to serve), else ``challenger``.
    """
    from meddiffuse.generate import create_generator_config, train_generator
    from meddiffuse.generate.checkpoint import latest_checkpoint
    from meddiffuse.generate.pyfunc import log_generator_model

    settings, store = _ctx(settings, store)
    domain = get_domain(spec.domain)
    dataset = open_dataset(store, spec.dataset)
    fp = fingerprint(spec, exclude={"dataset"}, extra={"dataset": dataset.id})
    prefix = (spec.prefix or f"generators/{domain.name}-{spec.generator_preset}-{fp}").strip("/")
    record = _read_record(store, prefix)
    if record is not None and record.get("fingerprint") == fp:
        return GeneratorResult.model_validate(record | {"reused": True})

    gcfg = create_generator_config(spec.generator_preset, domain, spec.resolution or dataset.manifest.resolution)
    resume = latest_checkpoint(store, prefix) is not None
    info = train_generator(
        dataset, gcfg, store, prefix, max_steps=spec.generator_steps, max_minutes=spec.generator_minutes,
        resume=resume, checkpoint_every=spec.checkpoint_every, seed=spec.seed, settings=settings,
        progress=progress, overwrite=not resume,
    )
    out = GeneratorResult(
        domain=domain.name, prefix=prefix, fingerprint=fp, dataset_id=dataset.id, preset=info.preset,
        steps_trained=info.steps_trained, parameters=info.parameters, final_loss=info.final_loss,
        images_per_second=info.images_per_second, stopped_by=info.stopped_by, horizon=info.horizon,
        mixed_precision=info.mixed_precision,
    )
    if spec.register_model:
        name = generator_model_name(domain.name)
        found = find_version_by_tag(name, SPEC_TAG, fp, settings)
        if found is not None:
            version, run_id = found.version, found.run_id
        else:
            registered = log_generator_model(prefix, store=store, settings=settings,
                                             tags={SPEC_TAG: fp, "dataset.train": dataset.id})
            version, run_id = registered.version, registered.run_id
        alias = spec.alias or (CHAMPION if current_alias(name, CHAMPION, settings) is None else "challenger")
        promote(name, version, alias=alias, settings=settings)
        out.name, out.version, out.uri, out.run_id, out.alias = (
            name, version, f"models:/{name}/{version}", run_id, alias)
    store.put_text(f"{prefix}/{RECORD_FILE}", out.model_dump_json(indent=2))
    return out


# -- synthetic datasets, in shards -----------------------------------------------------------------------


class SyntheticResult(BaseModel):
    prefix: str
    dataset_id: str
    n: int
    per_class: int
    generator: str = Field(description="The pinned generator (models:/name/version, or a store prefix).")
    generator_alias: str | None = None
    plan: str


_generators: dict[tuple[str, str], Any] = {}
_generators_lock = threading.Lock()


def load_generator_cached(ref: str, settings: Settings | None = None, store: ObjectStore | None = None) -> Any:
    """A generator loaded once per process (shards of one flow share it); ``ref`` should be pinned."""
    from meddiffuse.generate import load_generator

    settings, store = _ctx(settings, store)
    key = (ref, store.uri)
    with _generators_lock:
        if key not in _generators:
            _generators[key] = load_generator(ref, store, settings)
        return _generators[key]


def plan_synthesis(spec: SynthesisSpec, *, settings: Settings | None = None, store: ObjectStore | None = None):
    """The ``GenerationPlan`` of a synthesis spec, from the generator's metadata alone (no UNet loaded).

    A registry reference is resolved to its pinned version first: the plan, and every image's origin in the
    manifest, name ``models:/<name>/<version>``, never a moving alias.
    """
    from meddiffuse.generate.artifact import read_generator_meta
    from meddiffuse.generate.synthesis import GeneratorSummary, plan_generation

    settings, store = _ctx(settings, store)
    if is_registry_ref(spec.generator):
        pinned = resolve(spec.generator, settings)
        summary = _summary_from_tags(pinned, settings)
    else:
        meta = read_generator_meta(spec.generator, store)
        summary = GeneratorSummary.from_meta(meta, spec.generator.strip("/"))
    return plan_generation(
        summary, spec.per_class, sampler=spec.sampler, steps=spec.sampling_steps, guidance=spec.guidance,
        seed=spec.seed, shard_size=spec.shard_size, batch_size=spec.batch_size, classes=spec.classes,
    )


def _summary_from_tags(pinned: PinnedVersion, settings: Settings):
    from meddiffuse.domains import Domain
    from meddiffuse.generate.synthesis import GeneratorSummary

    tags = describe_version(pinned.uri, settings).tags
    try:
        channels = int(tags["channels"])
        domain = Domain(name=tags["domain"], classes=tags["classes"].split(","), channels=channels)
        return GeneratorSummary(domain, channels, int(tags["resolution"]), tags["generator_id"], pinned.uri)
    except KeyError as exc:
        raise ValueError(f"{pinned.uri} lacks the tag {exc}: it was not registered by meddiffuse") from None


def pending_synthesis_shards(spec: SynthesisSpec, plan: Any, *, store: ObjectStore | None = None,
                             settings: Settings | None = None) -> list[Any]:
    from meddiffuse.generate.synthesis import pending_shards

    _, store = _ctx(settings, store)
    return pending_shards(store, spec.prefix, plan)


def run_synthesis_shard(spec: SynthesisSpec, plan: Any, shard: Any, *, settings: Settings | None = None,
                        store: ObjectStore | None = None) -> int:
    """Sample and commit one shard; a committed shard is skipped. Returns the images written (0 if skipped)."""
    from meddiffuse.generate.synthesis import run_shard, shard_committed

    settings, store = _ctx(settings, store)
    if shard_committed(store, spec.prefix, plan, shard):
        return 0
    generator = load_generator_cached(plan.generator_ref, settings, store)
    run_shard(generator, store, spec.prefix.strip("/"), plan, shard)
    return shard.count


def commit_synthesis(spec: SynthesisSpec, plan: Any, *, settings: Settings | None = None,
                     store: ObjectStore | None = None) -> SyntheticResult:
    """Write the manifest from the committed shards (refuses while any is missing)."""
    from meddiffuse.data.dataset import dataset_exists
    from meddiffuse.generate.synthesis import commit_generation

    _, store = _ctx(settings, store)
    prefix = spec.prefix.strip("/")
    if dataset_exists(store, prefix) and open_dataset(store, prefix).manifest.meta.get("plan") == plan.fingerprint:
        ds = open_dataset(store, prefix)
    else:
        ds = commit_generation(store, prefix, plan, extra_meta=_alias_meta(spec))
    return _synthetic_result(spec, plan, ds)


def _alias_meta(spec: SynthesisSpec) -> dict[str, Any]:
    if is_registry_ref(spec.generator):
        ref = parse_model_ref(spec.generator)
        return {"generator_requested": spec.generator, "generator_alias": ref.alias}
    return {"generator_requested": spec.generator}


def _synthetic_result(spec: SynthesisSpec, plan: Any, ds: Dataset) -> SyntheticResult:
    return SyntheticResult(prefix=ds.prefix, dataset_id=ds.id, n=len(ds.manifest.entries), per_class=plan.per_class,
                           generator=plan.generator_ref, generator_alias=ds.manifest.meta.get("generator_alias"),
                           plan=plan.fingerprint)


def synthesize(spec: SynthesisSpec, *, settings: Settings | None = None, store: ObjectStore | None = None,
               on_shard: Callable[[int, int], None] | None = None) -> SyntheticResult:
    """Plan, run every pending shard, commit: a synthetic Dataset with exactly ``per_class`` per class."""
    settings, store = _ctx(settings, store)
    plan = plan_synthesis(spec, settings=settings, store=store)
    shards = pending_synthesis_shards(spec, plan, store=store)
    total = len(plan.shards())
    for i, shard in enumerate(shards):
        run_synthesis_shard(spec, plan, shard, settings=settings, store=store)
        if on_shard is not None:
            on_shard(total - len(shards) + i + 1, total)
    return commit_synthesis(spec, plan, settings=settings, store=store)


def sample_images(generator: Any, label: str, n: int, *, seed: int = 0, sampler: str = CPU_STUDY["sampler"],
                  steps: int = 20, guidance: float = CPU_STUDY["guidance"]) -> np.ndarray:
    """``n`` images of class ``label`` (N x H x W x C uint8); the same seed gives the images a synthetic
    dataset with that seed holds (batch width 8 keeps a small request cheap and still reproducible)."""
    return generator.sample_class(label, n, seed, sampler=sampler, steps=steps, guidance=guidance,
                                  batch_size=min(64, max(8, -(-n // 8) * 8)))


# -- comparing and promoting classifiers -------------------------------------------------------------------


class PromotionDecision(BaseModel):
    name: str
    alias: str
    challenger: int
    champion: int | None = Field(description="The version that held the alias when the decision was made.")
    promoted: bool
    reason: str
    metric: str
    test_set: str
    comparison: dict[str, Any] | None = None


def _predictions(ref: str, test_set: Dataset, settings: Settings) -> tuple[np.ndarray, np.ndarray, Any]:
    from meddiffuse.classify.registry import load_registered_classifier

    clf = load_registered_classifier(ref, settings)
    images, labels = test_set.load_arrays(entries=test_set.manifest.select("test"))
    return clf.optimize_for_inference().predict(images), labels, clf


def compare_versions(
    a: str, b: str, test_set: str, *, metric: str = "balanced_accuracy", bootstrap: int = 1000, seed: int = 0,
    settings: Settings | None = None, store: ObjectStore | None = None,
) -> dict[str, Any]:
    """B against A on the same real test split: a paired bootstrap of the metric difference (B - A)."""
    from meddiffuse.classify.metrics import paired_bootstrap

    settings, store = _ctx(settings, store)
    ds = open_dataset(store, test_set)
    pred_a, labels, clf_a = _predictions(a, ds, settings)
    pred_b, _, clf_b = _predictions(b, ds, settings)
    result = paired_bootstrap(labels, pred_a, pred_b, len(ds.classes), metric=metric, resamples=bootstrap, seed=seed)
    return result.model_dump() | {"a_ref": clf_a.registered.uri, "b_ref": clf_b.registered.uri,
                                  "test_set": ds.id, "significant": result.significant}


def promote_if_better(
    challenger: str,
    test_set: str,
    *,
    alias: str = CHAMPION,
    metric: str = "balanced_accuracy",
    min_delta: float = 0.0,
    bootstrap: int = 1000,
    seed: int = 0,
    settings: Settings | None = None,
    store: ObjectStore | None = None,
) -> PromotionDecision:
    """Move ``alias`` to ``challenger`` only when it beats the alias's current holder on the same real test
    split by more than ``min_delta``; the evidence is recorded as ``promotion.*`` tags on the challenger.

    Refuses when the champion was scored on another test set (its training images may overlap this one),
    and raises ``AliasMoved`` when someone moves the alias while the comparison runs.
    """
    settings, store = _ctx(settings, store)
    pinned = resolve(challenger, settings)
    ds = open_dataset(store, test_set)
    holder = current_alias(pinned.name, alias, settings)
    base = {"name": pinned.name, "alias": alias, "challenger": pinned.version, "champion": holder,
            "metric": metric, "test_set": ds.id}
    if holder is None:
        decision = PromotionDecision(**base, promoted=True, reason=f"no version held {alias!r}")
    elif holder == pinned.version:
        decision = PromotionDecision(**base, promoted=False, reason=f"version {holder} already holds {alias!r}")
    else:
        tags = {v: describe_version(f"{pinned.name}/{v}", settings).tags for v in (holder, pinned.version)}
        other = [v for v, t in tags.items() if t.get("dataset.test") not in (None, ds.id)]
        if other:
            decision = PromotionDecision(**base, promoted=False, reason=(
                f"version(s) {other} were scored on another test set than {ds.id}: not comparable"))
        else:
            cmp = compare_versions(f"{pinned.name}/{holder}", pinned.uri, test_set, metric=metric,
                                   bootstrap=bootstrap, seed=seed, settings=settings, store=store)
            better = cmp["difference"] > min_delta
            reason = (f"{metric} {cmp['b']:.4f} vs {cmp['a']:.4f} (difference {cmp['difference']:+.4f}, 95% CI "
                      f"{cmp['ci95'][0]:+.4f}..{cmp['ci95'][1]:+.4f}) on {cmp['n']} test images")
            decision = PromotionDecision(**base, promoted=better, comparison=cmp,
                                         reason=("better: " if better else "not better: ") + reason)
    evidence = {"promotion.decision": "promoted" if decision.promoted else "kept",
                "promotion.compared_with": str(holder), "promotion.metric": metric,
                "promotion.test_set": ds.id, "promotion.reason": decision.reason[:4000]}
    tag_version(pinned.name, pinned.version, evidence, settings)
    if decision.promoted:
        try:
            promote(pinned.name, pinned.version, alias=alias, expected_current=holder, settings=settings)
        except AliasMoved:
            tag_version(pinned.name, pinned.version, {"promotion.decision": "refused: alias moved"}, settings)
            raise
    log.info("%s/%s: %s", pinned.name, pinned.version, decision.reason)
    return decision


# -- serving: handles, uploads, predictions, explanations -------------------------------------------------


def classifier_handle(domain: str, *, alias: str = CHAMPION, settings: Settings | None = None,
                      reload_interval_s: float | None = None) -> ModelHandle:
    """A ``ModelHandle`` serving ``meddiffuse-classifier-<domain>@<alias>``, frozen for inference at load."""
    from meddiffuse.classify.registry import load_registered_classifier

    settings = settings or Settings()

    def load(pinned: PinnedVersion):
        return load_registered_classifier(pinned, settings).optimize_for_inference()

    interval = reload_interval_s if reload_interval_s is not None else settings.serve.reload_interval_s
    return ModelHandle(f"{classifier_model_name(domain)}@{alias}", load, settings=settings,
                       reload_interval_s=interval)


def generator_handle(domain: str, *, alias: str = CHAMPION, settings: Settings | None = None,
                     reload_interval_s: float | None = None) -> ModelHandle:
    """A ``ModelHandle`` serving ``meddiffuse-generator-<domain>@<alias>``."""
    from meddiffuse.generate import load_generator

    settings = settings or Settings()

    def load(pinned: PinnedVersion):
        generator = load_generator(pinned.uri, settings=settings)
        generator.pinned = pinned
        return generator

    interval = reload_interval_s if reload_interval_s is not None else settings.serve.reload_interval_s
    return ModelHandle(f"{generator_model_name(domain)}@{alias}", load, settings=settings,
                       reload_interval_s=interval)


def decode_upload(clf: Any, data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """An uploaded file as the classifier's training images were made: decoded (any format ingest takes),
    converted to its channels, centre-cropped and resized to its dataset resolution. Raises
    ``ImageRejected`` (a ``ValueError``) with the reason when the bytes are not a usable image."""
    from meddiffuse.data.ingest import load_image_file

    max_pixels = max_pixels or Settings().ingest.max_pixels
    resolution = clf.resolution
    if resolution is None:  # saved before the input contract recorded it: keep the image's own scale
        resolution = _square_side(data)
    image, _notes = load_image_file(data, clf.channels, resolution, max_pixels)
    return image if image.ndim == 3 else image[..., None]


def _square_side(data: bytes) -> int:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:  # the header only; load_image_file judges the rest
            return max(8, min(im.size))
    except Exception:  # noqa: BLE001 - unreadable: let load_image_file give the reason
        return 64


def predict_images(clf: Any, images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """(N, K) class probabilities for N decoded images (N x H x W x C uint8)."""
    return clf.predict_proba(np.stack(list(images)) if not isinstance(images, np.ndarray) else images)


class ImageExplanation(BaseModel):
    probabilities: dict[str, float]
    predicted: str
    explained: str
    weights: dict[int, float] = Field(description="LIME weight of each superpixel (segment id -> weight).")
    top_segments: list[int]
    segments: list[list[int]] = Field(description="The superpixel map (H x W segment ids).")
    faithfulness: float = Field(description="Deletion faithfulness: drop of the explained class's probability "
                                            "when its top superpixels go, beyond random orders.")
    mask_share: float | None = Field(None, description="Share of the positive LIME weight inside the lesion mask.")
    overlay_png: bytes = Field(repr=False)


def explain_images(
    clf: Any, images: Sequence[np.ndarray] | np.ndarray, *, num_samples: int = 1000, seed: int = 0,
    labels: Sequence[int] | None = None, top_k: int = 5, overlay_scale: int = 4,
    masks: Sequence[np.ndarray | None] | None = None,
) -> list[ImageExplanation]:
    """LIME for each image (of the predicted class, or of ``labels``), with an overlay PNG and the
    deletion-faithfulness score: the one explain loop of the CLI, the experiment, the explainer service."""
    from meddiffuse.explain import classifier_predict_fn, deletion_curve, explain_with_classifier, mask_share
    from meddiffuse.explain.overlay import overlay_png

    batch = np.stack(list(images)) if not isinstance(images, np.ndarray) else images
    probs = clf.predict_proba(batch)
    kwargs: dict[str, Any] = {"num_samples": num_samples, "seed": seed, "top_k": top_k}
    if labels is not None:
        kwargs["labels"] = list(labels)
    exps = explain_with_classifier(clf, batch, **kwargs)
    fn = classifier_predict_fn(clf)
    out = []
    masks = list(masks) if masks is not None else [None] * len(batch)
    for image, p, exp, mask in zip(batch, probs, exps, masks, strict=True):
        deletion = deletion_curve(fn, image, exp, seed=seed)
        share = float(mask_share(exp, mask)) if mask is not None and np.asarray(mask).any() else None
        out.append(ImageExplanation(
            probabilities={c: float(v) for c, v in zip(clf.classes, p, strict=True)},
            predicted=clf.classes[int(p.argmax())], explained=clf.classes[exp.label],
            weights={i: float(v) for i, v in enumerate(exp.weights)},
            top_segments=[int(s) for s in exp.top(top_k)], segments=exp.segments.astype(int).tolist(),
            faithfulness=float(deletion.faithfulness), mask_share=share,
            overlay_png=overlay_png(image, exp, scale=overlay_scale),
        ))
    return out

