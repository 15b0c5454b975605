"""Prefect task wrappers: each calls exactly one function of ``meddiffuse.tasks`` (through the backend, for
the heavy steps) or one stage of ``meddiffuse.experiment.Experiment``, and nothing else.

Caching is off on purpose (``cache_policy=NO_CACHE``): whether a piece of work is done is decided by the
store's committed records (shard records, dataset manifests, task records, registered spec fingerprints),
which every pod and process sees, never by Prefect's result cache, which separate Kubernetes pods do not
share. A retried or re-run task therefore calls the library again, and the library skips what is committed.

Retries come from ``settings.flows`` (``task_retries``, ``retry_delay_s``): flows call ``configured(task)``.

Fault injection (for tests and drills, off unless set): ``MEDDIFFUSE_FLOW_FAULTS="run_shard=1:after,
train_classifier=always"`` makes the named wrappers raise ``InjectedFault`` — ``N`` times in all (counted in
``MEDDIFFUSE_FLOW_FAULTS_DIR``, so across threads, processes and retries) or ``always``; ``:before`` (the
default) fails before the library call, ``:after`` after it returned, i.e. after its work was committed.
Names: ``plan_synthesis``, ``pending_shards``, ``run_shard``, ``commit_synthesis``, ``generate_dataset``,
``train_generator``, ``train_classifier``, ``promote_if_better``, ``commit_stage``, ``train_one`` and the
study's stage names (``ingest``, ``train_generator``, ``sample_grids``, ``audit``, ``write_report``, ...).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.backends import BadRequest, InProcessBackend, get_backend
from meddiffuse.config import ClassifierSpec, ExperimentConfig, GeneratorSpec, Settings, SynthesisSpec

FAULTS_ENV = "MEDDIFFUSE_FLOW_FAULTS"
FAULTS_DIR_ENV = "MEDDIFFUSE_FLOW_FAULTS_DIR"


class InjectedFault(RuntimeError):
    """Raised where ``MEDDIFFUSE_FLOW_FAULTS`` asks for a failure."""


def _fault_rules() -> dict[str, tuple[int | None, str]]:
    rules: dict[str, tuple[int | None, str]] = {}
    for item in filter(None, (part.strip() for part in os.environ.get(FAULTS_ENV, "").split(","))):
        name, _, rest = item.partition("=")
        times, _, when = (rest or "always").partition(":")
        if when not in ("", "before", "after"):
            raise ValueError(f"{FAULTS_ENV}: {item!r}: the phase must be before or after")
        rules[name.strip()] = (None if times in ("always", "*") else int(times), when or "before")
    return rules


def inject_fault(name: str, phase: str) -> None:
    """Raise ``InjectedFault`` if ``MEDDIFFUSE_FLOW_FAULTS`` asks for one at ``name`` in this ``phase``."""
    rule = _fault_rules().get(name)
    if rule is None or rule[1] != phase:
        return
    times, _ = rule
    if times is not None:
        spec = os.environ.get(FAULTS_ENV, "")
        folder = Path(os.environ.get(FAULTS_DIR_ENV) or Path(tempfile.gettempdir()) /
                      f"meddiffuse-faults-{hashlib.sha256(spec.encode()).hexdigest()[:8]}")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(times):  # claim one of the N failures atomically (O_EXCL), or none if all are spent
            try:
                os.close(os.open(folder / f"{name}.{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            raise InjectedFault(f"injected fault {i + 1}/{times} at {name} ({phase})")
        return
    raise InjectedFault(f"injected fault at {name} ({phase}, always)")


def _call(name: str, fn, *args: Any, **kwargs: Any) -> Any:
    inject_fault(name, "before")
    out = fn(*args, **kwargs)
    inject_fault(name, "after")
    return out


DEFAULT_THREADS = 4


def task_runner():
    """The flows' task runner: threads, at most ``PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS`` (default 4,
    not Prefect's unbounded default: shards and classifiers share one machine's cores or one GPU)."""
    from prefect.settings import get_current_settings
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=get_current_settings().tasks.runner.thread_pool_max_workers
                                or DEFAULT_THREADS)


def _local() -> InProcessBackend:
    """Shards run where the flow runs (in process; in a GPU job on Kubernetes), whatever the backend."""
    return InProcessBackend(Settings())


def configured(t, settings: Settings | None = None):
    """``t`` with the retries of ``settings.flows``."""
    flows = (settings or Settings()).flows
    return t.with_options(retries=flows.task_retries, retry_delay_seconds=flows.retry_delay_s)


def retriable(task, task_run, state) -> bool:
    """Retry unless the failure is one that a retry cannot fix (a refused request, an invalid spec)."""
    from pydantic import ValidationError

    exc = getattr(state, "data", None)
    return not isinstance(exc, BadRequest | ValidationError)


TASK = {"cache_policy": NO_CACHE, "retries": 2, "retry_delay_seconds": 2, "retry_condition_fn": retriable}


# -- synthesis ------------------------------------------------------------------------------------------------


@task(name="plan-synthesis", **TASK)
def plan_synthesis(spec: SynthesisSpec):
    """``meddiffuse.tasks.plan_synthesis``: the pinned generator version and every shard of the run."""
    plan = _call("plan_synthesis", _local().plan, spec)
    get_run_logger().info("plan %s: %s per class from %s, %d shards", plan.fingerprint, plan.per_class,
                          plan.generator_ref, len(plan.shards()))
    return plan


@task(name="pending-shards", **TASK)
def pending_shards(spec: SynthesisSpec, plan) -> list:
    """``meddiffuse.tasks.pending_synthesis_shards``: the plan's shards the store has no committed record of."""
    return _call("pending_shards", _local().pending, spec, plan)


@task(name="run-shard", task_run_name="shard-{shard.label}-{shard.start}", **TASK)
def run_shard(spec: SynthesisSpec, plan, shard) -> int:
    """``meddiffuse.tasks.run_synthesis_shard``: sample and commit one shard (0 if it was committed already)."""
    written = _call("run_shard", _local().run_shard, spec, plan, shard)
    get_run_logger().info("shard %s: %d images written", shard.name, written)
    return written


@task(name="commit-synthesis", **TASK)
def commit_synthesis(spec: SynthesisSpec, plan):
    """``meddiffuse.tasks.commit_synthesis``: the manifest from the committed shards (the dataset's commit)."""
    return _call("commit_synthesis", _local().commit, spec, plan)


@task(name="generate-dataset", task_run_name="generate-{spec.prefix}", **TASK)
def generate_dataset(spec: SynthesisSpec):
    """The whole synthesis in one call (``meddiffuse.tasks.synthesize``, or the generator service's
    ``generate_dataset`` task, which shards and resumes inside the service)."""
    return _call("generate_dataset", get_backend().generate_dataset, spec)


# -- training -------------------------------------------------------------------------------------------------


@task(name="train-generator", task_run_name="train-generator-{spec.domain}", **TASK)
def train_generator(spec: GeneratorSpec):
    """``meddiffuse.tasks.train_and_register_generator`` (in process or on the trainer service)."""
    result = _call("train_generator", get_backend().train_generator, spec)
    get_run_logger().info("generator %s (%d steps)", result.uri or result.prefix, result.steps_trained)
    return result


@task(name="train-classifier", task_run_name="train-{spec.arch}-{spec.domain}", **TASK)
def train_classifier(spec: ClassifierSpec):
    """``meddiffuse.tasks.train_and_register_classifier`` (in process or on the trainer service)."""
    result = _call("train_classifier", get_backend().train_classifier, spec)
    get_run_logger().info("classifier %s: %s", result.uri or result.prefix,
                          {k: round(v, 4) for k, v in result.metrics.items() if k in ("accuracy", "balanced_accuracy")})
    return result


# -- promotion ------------------------------------------------------------------------------------------------


@task(name="promote-if-better", task_run_name="promote-{challenger}", **TASK)
def promote_if_better(challenger: str, test_set: str, alias: str = "champion", metric: str = "balanced_accuracy",
                      min_delta: float = 0.0, bootstrap: int = 1000, seed: int = 0):
    """``meddiffuse.tasks.promote_if_better``: move ``alias`` only on evidence from the same real test split."""
    from meddiffuse import tasks

    decision = _call("promote_if_better", tasks.promote_if_better, challenger, test_set, alias=alias, metric=metric,
                     min_delta=min_delta, bootstrap=bootstrap, seed=seed, settings=Settings())
    get_run_logger().info("%s/%s: %s", decision.name, decision.challenger, decision.reason)
    return decision


# -- stages of the study (meddiffuse.experiment.Experiment, resumable through its stage markers) ---------------


def _experiment(config: ExperimentConfig):
    from meddiffuse.experiment import Experiment

    logger = get_run_logger()
    return Experiment(config, Settings(), progress=False, log=logger.info)


STAGES = frozenset({"ingest", "train_generator", "synthesize", "sample_grids", "filter_synthetic", "audit",
                    "explain", "promote", "write_report"})


@task(name="stage", task_run_name="{stage}-{config.domain}", **TASK)
def experiment_stage(config: ExperimentConfig, stage: str) -> dict[str, Any]:
    """One stage method of the study's ``Experiment`` (``ingest``, ``train_generator``, ``sample_grids``,
    ``audit``, ``explain``, ``promote``, ``write_report``); a committed stage returns its marker at once."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {sorted(STAGES)}")
    return _call(stage, getattr(_experiment(config), stage))


@task(name="classifier", task_run_name="classifier-{arch}-{train_data}-{config.domain}", **TASK)
def classifier_stage(config: ExperimentConfig, arch: str, train_data: str) -> dict[str, Any]:
    """``Experiment.train_one``: ``meddiffuse.tasks.train_and_register_classifier`` at the experiment's prefix
    for ``arch`` x ``train_data``, scored on its real test split; its stage record (metrics, pinned version)."""
    return _call("train_one", _experiment(config).train_one, arch, train_data)


@task(name="study-synthesis-spec", task_run_name="synthesis-spec-{config.domain}", **TASK)
def study_synthesis_spec(config: ExperimentConfig, shard_size: int) -> SynthesisSpec | None:
    """The study's synthetic set as a ``SynthesisSpec`` (``Experiment.synthesis_spec``) with the flow's shard
    size; ``None`` when the ``synthesize`` stage is committed already."""
    exp = _experiment(config)
    if exp.done("synthesize") is not None:
        return None
    if exp.done("generator") is None:
        raise RuntimeError("the generator stage must be committed before the synthetic set is planned")
    return exp.synthesis_spec(shard_size=shard_size)


@task(name="commit-stage", task_run_name="commit-{stage}-{config.domain}", **TASK)
def commit_stage(config: ExperimentConfig, stage: str, info: dict[str, Any]) -> dict[str, Any]:
    """``Experiment.commit``: the stage marker, so the experiment (and ``meddiffuse experiment``) skips it."""
    return _call("commit_stage", _experiment(config).commit, stage, info)
