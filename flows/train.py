"""The ``train-classifier`` and ``train-generator`` flows: one model, trained, scored and registered.

``train-classifier`` trains one architecture on one or more datasets (``spec.train``), scores it on the real
test split of ``spec.test`` and registers it as a new version of ``meddiffuse-classifier-<domain>``; with
``promote=True`` it then runs the ``promote`` flow (champion moves only if the new version beats it on that
same test split). A retry after a crash re-uses the committed work and never registers a second version.
"""

from __future__ import annotations

from prefect import flow

from flows import tasks as t
from flows.artifacts import classifier_rows, pinned_models_markdown, publish_link, publish_results, store_link
from meddiffuse.config import ClassifierSpec, GeneratorSpec, Settings


@flow(name="train-classifier", flow_run_name="train-{spec.arch}-{spec.domain}")
def train_classifier(spec: ClassifierSpec, promote: bool = False, alias: str = "champion"):
    """Train one classifier, evaluate it on the real test split, register it (and optionally promote it)."""
    settings = Settings()
    result = t.configured(t.train_classifier, settings)(spec)
    publish_results(f"classifier-{spec.domain}-{spec.arch}", f"{spec.domain}: {spec.arch} on {result.train_data}",
                    classifier_rows([result]),
                    extra_markdown=pinned_models_markdown([(f"{spec.arch} · {result.train_data}", result.uri)]))
    publish_link(f"classifier-{spec.domain}-{spec.arch}-model", store_link(result.prefix, settings),
                 f"saved classifier {result.prefix}")
    if promote and result.uri:
        from flows.promote import promote as promote_flow

        promote_flow(challenger=result.uri, test_set=spec.test, alias=alias, bootstrap=spec.bootstrap, seed=spec.seed)
    return result


@flow(name="train-generator", flow_run_name="train-generator-{spec.domain}")
def train_generator(spec: GeneratorSpec):
    """Train (resuming from its checkpoints) and register a generator on a real Dataset's train split."""
    settings = Settings()
    result = t.configured(t.train_generator, settings)(spec)
    publish_results(f"generator-{spec.domain}", f"{spec.domain}: generator",
                    [{"domain": result.domain, "preset": result.preset, "steps": result.steps_trained,
                      "final_loss": result.final_loss, "alias": result.alias, "model": result.uri or result.prefix}],
                    extra_markdown=pinned_models_markdown([("generator", result.uri)]))
    return result
