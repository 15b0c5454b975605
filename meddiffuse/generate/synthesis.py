"""Writing a labelled synthetic Dataset from a generator, in resumable shards.

A generation run is a *plan*: for each class, images 0..N-1 with per-image seeds from
``class_seeds(seed, class, i)``, cut into shards. Each shard writes its PNGs, then a small shard record
under ``<prefix>/shards/<plan>/`` (its commit point). The dataset manifest, written last from the shard
records, is the commit point of the whole run. Re-running the same plan skips committed shards, so a
killed run ends, on re-run, with exactly N images per class, unique seeds, and no half-written image in
the manifest. Shards are independent, so a flow can fan them out with ``run_shard`` and finish with
``commit_generation``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from meddiffuse.data.dataset import (
    Dataset,
    DatasetWriter,
    Entry,
    Origin,
    dataset_exists,
    open_dataset,
)
from meddiffuse.domains import Domain
from meddiffuse.generate.errors import InvalidGeneratorRequest
from meddiffuse.generate.metadata import GeneratorMeta
from meddiffuse.generate.pipeline import DiffusionGenerator
from meddiffuse.generate.samplers import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, get_sampler_spec
from meddiffuse.generate.seeding import class_seeds
from meddiffuse.store.base import ObjectStore

SHARDS_DIR = "shards"

ShardCallback = Callable[["ShardSpec", int, int], None]  # (shard, shards done, shards total)


class ShardSpec(BaseModel):
    label: str
    class_index: int
    start: int = Field(description="Index of the shard's first image within its class.")
    count: int

    @property
    def name(self) -> str:
        return f"{self.label}-{self.start:07d}"


class GenerationPlan(BaseModel):
    """Everything that determines a synthetic dataset's images; its fingerprint names the run."""

    domain: str
    classes: list[str]
    channels: int
    resolution: int
    generator_ref: str
    generator_id: str
    sampler: str
    steps: int
    guidance: float
    seed: int
    per_class: int
    shard_size: int
    batch_size: int
    labels: list[str] = Field(description="Classes to generate (all of the domain's by default).")

    @property
    def fingerprint(self) -> str:
        raw = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(raw).hexdigest()[:12]

    def shards(self) -> list[ShardSpec]:
        return [
            ShardSpec(label=label, class_index=self.classes.index(label), start=start,
                      count=min(self.shard_size, self.per_class - start))
            for label in self.labels
            for start in range(0, self.per_class, self.shard_size)
        ]


@dataclass(frozen=True)
class GeneratorSummary:
    """What a plan needs to know of a generator, without loading its UNet."""

    domain: Domain
    channels: int
    resolution: int
    id: str
    ref: str

    @classmethod
    def of(cls, generator: DiffusionGenerator | GeneratorSummary) -> GeneratorSummary:
        if isinstance(generator, GeneratorSummary):
            return generator
        return cls(generator.domain, generator.channels, generator.resolution, generator.id,
                   generator.ref or generator.id)

    @classmethod
    def from_meta(cls, meta: GeneratorMeta, ref: str) -> GeneratorSummary:
        domain = Domain(name=meta.domain, classes=list(meta.classes), channels=meta.channels)
        return cls(domain, meta.channels, meta.resolution, meta.weights_id, ref)


class ShardRecord(BaseModel):
    plan: str
    shard: ShardSpec
    entries: list[Entry]


def plan_generation(
    generator: DiffusionGenerator | GeneratorSummary,
    per_class: int,
    *,
    sampler: str = DEFAULT_SAMPLER,
    steps: int = 20,
    guidance: float = DEFAULT_GUIDANCE,
    seed: int = 0,
    shard_size: int = 256,
    batch_size: int = 64,
    generator_ref: str | None = None,
    classes: Sequence[str] | None = None,
) -> GenerationPlan:
    """Validate a generation request and fix everything that determines its images."""
    if per_class <= 0:
        raise InvalidGeneratorRequest(f"images per class must be positive, got {per_class}")
    if steps <= 0:
        raise InvalidGeneratorRequest(f"sampling steps must be positive, got {steps}")
    if shard_size <= 0 or batch_size <= 0:
        raise InvalidGeneratorRequest(f"shard_size and batch_size must be positive, got {shard_size}, {batch_size}")
    if not guidance >= 0:
        raise InvalidGeneratorRequest(f"guidance must be >= 0, got {guidance}")
    if seed < 0:
        raise InvalidGeneratorRequest(f"seed must be >= 0, got {seed}")
    get_sampler_spec(sampler)
    generator = GeneratorSummary.of(generator)
    domain = generator.domain
    labels = list(domain.classes) if classes is None else [domain.canonical_class(c) for c in classes]
    if not labels:
        raise InvalidGeneratorRequest("no classes requested")
    if len(set(labels)) != len(labels):
        raise InvalidGeneratorRequest(f"classes requested twice: {list(classes or [])}")
    return GenerationPlan(
        domain=domain.name, classes=list(domain.classes), channels=generator.channels,
        resolution=generator.resolution,
        generator_ref=generator_ref or generator.ref, generator_id=generator.id,
        sampler=sampler, steps=steps, guidance=float(guidance), seed=seed, per_class=per_class,
        shard_size=shard_size, batch_size=batch_size, labels=labels,
    )


def generate_dataset(
    generator: DiffusionGenerator,
    store: ObjectStore,
    prefix: str,
    per_class: int,
    *,
    sampler: str = DEFAULT_SAMPLER,
    steps: int = 20,
    guidance: float = DEFAULT_GUIDANCE,
    seed: int = 0,
    shard_size: int = 256,
    generator_ref: str | None = None,
    batch_size: int = 64,
    classes: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    on_shard: ShardCallback | None = None,
) -> Dataset:
    """Generate (or finish generating) ``per_class`` images per class into a Dataset at ``prefix``.

    An existing synthetic dataset from the same plan is returned as is; one from another plan is
    replaced. A non-synthetic dataset at ``prefix`` is never replaced unless ``overwrite=True``.
    """
    prefix = prefix.strip("/")
    plan = plan_generation(
        generator, per_class, sampler=sampler, steps=steps, guidance=guidance, seed=seed,
        shard_size=shard_size, batch_size=batch_size, generator_ref=generator_ref, classes=classes,
    )
    existing = _existing(store, prefix, plan, overwrite)
    if existing is not None:
        _sweep_shards(store, prefix)
        return existing
    shards = plan.shards()
    done = {record.shard.name for record in committed_shards(store, prefix, plan)}
    total = sum(s.count for s in shards)
    bar = tqdm(total=total, initial=sum(s.count for s in shards if s.name in done), unit="img",
               desc=f"generating {plan.domain} ({plan.sampler}, {plan.steps} steps, w={plan.guidance:g})",
               disable=not progress, dynamic_ncols=True)
    with bar:
        for shard in shards:
            if shard.name in done:
                continue
            run_shard(generator, store, prefix, plan, shard)
            done.add(shard.name)
            bar.update(shard.count)
            if on_shard is not None:
                on_shard(shard, len(done), len(shards))
    return commit_generation(store, prefix, plan)


def run_shard(
    generator: DiffusionGenerator, store: ObjectStore, prefix: str, plan: GenerationPlan, shard: ShardSpec
) -> ShardRecord:
    """Sample one shard, write its PNGs, then commit its record. Safe to repeat."""
    if generator.id != plan.generator_id:
        raise InvalidGeneratorRequest(
            f"plan was made for generator {plan.generator_id}, not {generator.id}: make a new plan"
        )
    seeds = class_seeds(plan.seed, shard.class_index, shard.count, start=shard.start)
    images = generator.sample(
        [shard.class_index] * shard.count, seeds, sampler=plan.sampler, steps=plan.steps,
        guidance=plan.guidance, batch_size=plan.batch_size,
    )
    writer = DatasetWriter(store, prefix, generator.domain, plan.resolution)
    entries = []
    for i, (image, image_seed) in enumerate(zip(images, seeds, strict=True)):
        origin = Origin(kind="synthetic", generator=plan.generator_ref, sampler=plan.sampler,
                        steps=plan.steps, guidance=plan.guidance, seed=image_seed)
        # the plan's fingerprint in the key: another plan's shard can never alias these bytes
        key = f"images/{shard.label}/{shard.label}-{shard.start + i:07d}-{plan.fingerprint[:8]}.png"
        entries.append(writer.add(image, shard.label, "train", origin=origin, key=key))
    record = ShardRecord(plan=plan.fingerprint, shard=shard, entries=entries)
    store.put_text(_shard_key(prefix, plan, shard), record.model_dump_json())
    return record


def committed_shards(store: ObjectStore, prefix: str, plan: GenerationPlan) -> list[ShardRecord]:
    """Shard records of this plan already committed at ``prefix``."""
    folder = f"{prefix}/{SHARDS_DIR}/{plan.fingerprint}/"
    records = [ShardRecord.model_validate_json(store.get(key)) for key in store.list(folder)
               if key.endswith(".json")]
    wanted = {s.name for s in plan.shards()}
    return [r for r in records if r.plan == plan.fingerprint and r.shard.name in wanted]


def commit_generation(
    store: ObjectStore, prefix: str, plan: GenerationPlan, extra_meta: dict | None = None
) -> Dataset:
    """Write the dataset manifest from all shard records (refusing if any is missing), then sweep shards."""
    records = {r.shard.name: r for r in committed_shards(store, prefix, plan)}
    missing = [s.name for s in plan.shards() if s.name not in records]
    if missing:
        raise InvalidGeneratorRequest(
            f"cannot commit {prefix!r}: {len(missing)} shard(s) not generated yet ({missing[:3]}...)"
        )
    domain = Domain(name=plan.domain, classes=plan.classes, channels=plan.channels)
    writer = DatasetWriter(store, prefix, domain, plan.resolution)
    writer.withdraw()
    for shard in plan.shards():
        for entry in records[shard.name].entries:
            writer.add_entry(entry)
    meta = {"synthetic": True, "plan": plan.fingerprint, "generation": plan.model_dump(mode="json"),
            "generator": plan.generator_ref, **(extra_meta or {})}
    dataset = writer.commit(meta=meta)
    _sweep_shards(store, prefix)
    return dataset


def _existing(store: ObjectStore, prefix: str, plan: GenerationPlan, overwrite: bool) -> Dataset | None:
    if not dataset_exists(store, prefix):
        return None
    dataset = open_dataset(store, prefix)
    meta = dataset.manifest.meta
    if meta.get("plan") == plan.fingerprint:
        return dataset
    if not meta.get("synthetic") and not overwrite:
        raise InvalidGeneratorRequest(
            f"{prefix!r} already holds a dataset that is not a generated one ({dataset!r}); choose another "
            "output prefix, or pass overwrite=True (--overwrite) to replace it"
        )
    return None  # another plan: it is replaced when the new manifest is committed


def _shard_key(prefix: str, plan: GenerationPlan, shard: ShardSpec) -> str:
    return f"{prefix}/{SHARDS_DIR}/{plan.fingerprint}/{shard.name}.json"


def _sweep_shards(store: ObjectStore, prefix: str) -> None:
    store.delete_prefix(f"{prefix}/{SHARDS_DIR}/")


def pending_shards(store: ObjectStore, prefix: str, plan: GenerationPlan) -> list[ShardSpec]:
    """The plan's shards not yet committed at ``prefix`` (none once the dataset itself is committed)."""
    prefix = prefix.strip("/")
    if dataset_exists(store, prefix) and open_dataset(store, prefix).manifest.meta.get("plan") == plan.fingerprint:
        return []
    done = {record.shard.name for record in committed_shards(store, prefix, plan)}
    return [s for s in plan.shards() if s.name not in done]


def shard_committed(store: ObjectStore, prefix: str, plan: GenerationPlan, shard: ShardSpec) -> bool:
    return store.exists(_shard_key(prefix.strip("/"), plan, shard))
