"""The ``generate-dataset`` flow: a synthetic Dataset sampled in shards, each shard a mapped task.

plan (pins the generator version) → the shards the store has no committed record of → one ``run-shard``
task per shard (retried on failure; each commits its own record) → ``commit-synthesis`` writes the manifest.
Killed and re-run, or retried, the flow skips committed shards and ends with exactly ``per_class`` images
per class and unique seeds: what is done is read from the store, not from Prefect's cache.

With the HTTP backend the generator service shards and resumes inside itself: the flow submits one task.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, unmapped

from flows import tasks as t
from flows.artifacts import pinned_models_markdown, publish_link, publish_results, store_link
from flows.backends import Backend, get_backend
from meddiffuse.config import Settings, SynthesisSpec


def run_synthesis(spec: SynthesisSpec, settings: Settings | None = None, backend: Backend | None = None):
    """The body of the flow (also used by the study flow): returns the ``SyntheticResult``."""
    settings = settings or Settings()
    logger = get_run_logger()
    backend = backend or get_backend(settings)
    if not backend.shards_locally:
        return t.configured(t.generate_dataset, settings)(spec)
    plan = t.configured(t.plan_synthesis, settings)(spec)
    shards = t.configured(t.pending_shards, settings)(spec, plan)
    total = len(plan.shards())
    logger.info("%d of %d shards to run (%d committed before)", len(shards), total, total - len(shards))
    futures = t.configured(t.run_shard, settings).map(unmapped(spec), unmapped(plan), shards)
    futures.wait()
    written = futures.result()  # raises the first shard's error (after its retries): the flow ends Failed
    result = t.configured(t.commit_synthesis, settings)(spec, plan)
    logger.info("%s: %d images (%d written by this run) from %s", result.prefix, result.n, sum(written),
                result.generator)
    return result


@flow(name="generate-dataset", task_runner=t.task_runner(), flow_run_name="generate-{spec.prefix}")
def generate_dataset(spec: SynthesisSpec):
    """Sample a labelled synthetic Dataset (``spec.per_class`` images per class) from a registered generator.

    A spec that does not set ``shard_size`` gets ``MEDDIFFUSE_FLOWS__SHARD_SIZE`` (the shard size is part of the
    plan: keep it when resuming a run, or the new plan starts its shards afresh).
    """
    settings = Settings()
    if "shard_size" not in spec.model_fields_set:
        spec = spec.model_copy(update={"shard_size": settings.flows.shard_size})
    result = run_synthesis(spec, settings)
    publish_results(f"synthetic-{result.prefix}", f"Synthetic dataset {result.prefix}",
                    [{"prefix": result.prefix, "dataset_id": result.dataset_id, "images": result.n,
                      "per_class": result.per_class, "generator": result.generator, "plan": result.plan}],
                    extra_markdown=pinned_models_markdown([("generator", result.generator)]))
    publish_link(f"synthetic-{result.prefix}-manifest", store_link(f"{result.prefix}/manifest.json", settings),
                 f"manifest of {result.prefix}")
    return result
