"""The ``study`` flow: the whole protocol for one or more domains, one ``study-domain`` subflow each.

Per domain it drives the stages of ``meddiffuse.experiment.Experiment`` as tasks — each resumable through
the stage markers the experiment commits to the store, so a re-run (or ``meddiffuse experiment`` with the
same name) skips what is done:

    ingest ─┬─ classifiers on real data (start at once, concurrently with the generator)
            └─ generator → synthetic set (shards as mapped tasks) → sample grids [→ filter]
                 → classifiers on synthetic / mixed data (concurrently)
    → audit → explain (LIME) → report → promote (champion moves only on evidence from the same real test split)

Every classifier is registered (``meddiffuse-classifier-<domain>``, and the generator as
``meddiffuse-generator-<domain>``); the run's artifacts are the results table, the pinned model versions,
the promotion decisions and a link to the report in the store.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows import tasks as t
from flows.artifacts import (
    classifier_rows,
    markdown_table,
    pinned_models_markdown,
    publish_link,
    publish_results,
    store_link,
)
from flows.backends import InProcessBackend
from flows.generate import run_synthesis
from meddiffuse.config import ExperimentConfig, Settings

SYNTHETIC_DATA = ("synthetic", "mixed")


def domain_config(base: ExperimentConfig, domain: str, several: bool) -> ExperimentConfig:
    """``base`` for one domain; with several domains a given name becomes ``<name>-<domain>``."""
    name = f"{base.name}-{domain}" if (base.name and several) else base.name
    return ExperimentConfig.model_validate(base.model_dump() | {"domain": domain, "name": name})


@flow(name="study-domain", task_runner=t.task_runner(), flow_run_name="study-{config.domain}")
def study_domain(config: ExperimentConfig) -> dict[str, Any]:
    """The protocol for one domain (see the module docstring); returns the report path, results, decisions."""
    from meddiffuse.experiment import ExperimentPaths

    settings = Settings()
    logger = get_run_logger()
    if settings.flows.backend != "inprocess":
        logger.warning("the study runs its stages in this process (backend %r applies to the generate-dataset and "
                       "train-* flows)", settings.flows.backend)
    c = config
    stage = t.configured(t.experiment_stage, settings)
    classifier = t.configured(t.classifier_stage, settings)

    stage(c, "ingest")
    needs_synthetic = any(td in SYNTHETIC_DATA for td in c.train_data)
    # as in Experiment.run: the filter's judge and the audit's domain features are the first arch on real data
    real_runs = [(arch, "real") for arch in c.archs if "real" in c.train_data]
    if needs_synthetic and (c.filter_synthetic or c.audit) and (c.archs[0], "real") not in real_runs:
        real_runs.insert(0, (c.archs[0], "real"))
    futures = {run: classifier.submit(c, *run) for run in real_runs}

    generator: dict[str, Any] | None = None
    if needs_synthetic:
        generator = stage(c, "train_generator")
        spec = t.configured(t.study_synthesis_spec, settings)(c, settings.flows.shard_size)
        if spec is not None:  # None: the synthesize stage is committed already
            result = run_synthesis(spec, settings, InProcessBackend(settings))
            t.configured(t.commit_stage, settings)(c, "synthesize", {
                "synthetic": result.dataset_id, "per_class": result.per_class, "n": result.n,
                "generator": result.generator})
        stage(c, "sample_grids")
        if c.filter_synthetic:
            futures[(c.archs[0], "real")].result()
            stage(c, "filter_synthetic")
        for arch in c.archs:
            for td in c.train_data:
                if td in SYNTHETIC_DATA:
                    futures[(arch, td)] = classifier.submit(c, arch, td)

    for future in futures.values():
        future.wait()
    rows = {run: future.result() for run, future in futures.items()}  # a failed classifier fails the flow here

    if needs_synthetic and c.audit:
        stage(c, "audit")
    if c.explain_per_model > 0:
        stage(c, "explain")
    report = stage(c, "write_report")
    decisions = stage(c, "promote").get("decisions", []) if (c.register_models and c.promote) else []

    # -- artifacts: results, pinned versions, promotion decisions, the report --------------------------------
    results = [{"domain": c.domain, **r} for r in report["results"]]
    pinned = [("generator", (generator or {}).get("uri"))] + [
        (f"{r['arch']} · {r['train_data']}", r.get("model_uri")) for r in report["results"]]
    promotion = ""
    if decisions:
        promotion = "### Promotion\n\n" + markdown_table(
            [{"challenger": d["challenger"], "champion before": d["champion"], "promoted": d["promoted"],
              "reason": d["reason"]} for d in decisions], ["challenger", "champion before", "promoted", "reason"])
    publish_results(f"study-{c.experiment_name}", f"{c.domain}: results on unseen real test images",
                    classifier_rows(results), extra_markdown=pinned_models_markdown(pinned) + "\n" + promotion)
    report_key = f"{ExperimentPaths(c.experiment_name).report}/report.html"
    publish_link(f"study-{c.experiment_name}-report", store_link(report_key, settings),
                 f"report of {c.experiment_name}", description=f"local copy: {report['report']}")
    logger.info("%s: report %s (store: %s)", c.experiment_name, report["report"], store_link(report_key, settings))
    return {"domain": c.domain, "name": c.experiment_name, "report": report["report"],
            "report_uri": store_link(report_key, settings), "results": results, "generator": generator,
            "promotion": decisions, "classifiers": {f"{a}-{td}": r.get("model_uri") for (a, td), r in rows.items()}}


@flow(name="study")
def study(domains: list[str] | None = None, config: ExperimentConfig | None = None) -> dict[str, Any]:
    """The study for each of ``domains`` (default: ``config.domain``) with ``config`` (default: the settings'
    ``experiment`` section, ``MEDDIFFUSE_EXPERIMENT__*``); one ``study-domain`` subflow per domain."""
    base = config or Settings().experiment
    domains = list(dict.fromkeys(domains or [base.domain]))
    states = {d: study_domain(domain_config(base, d, len(domains) > 1), return_state=True) for d in domains}
    failed = {d: s for d, s in states.items() if not s.is_completed()}
    out = {d: s.result() for d, s in states.items() if d not in failed}
    if len(domains) > 1 and out:
        rows = classifier_rows([r for d in out.values() for r in d["results"]])
        publish_results("study-all", f"results for {', '.join(out)}", rows)
    if failed:  # every domain ran; the flow still ends Failed, naming each failed domain and why
        for state in failed.values():
            try:
                state.result()
            except Exception as exc:  # noqa: BLE001 - collected and re-raised below
                get_run_logger().error("study of a domain failed: %r", exc)
        raise RuntimeError("study failed for " + ", ".join(f"{d} ({s.name}: {s.message})" for d, s in failed.items()))
    return out
