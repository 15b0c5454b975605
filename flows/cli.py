"""``meddiffuse flow ...``: run the Prefect flows from the command line.

Plugged into the library's CLI through the entry point ``meddiffuse.cli`` → ``flow = "flows.cli:flow_app"``
(the library never imports this package). Without ``PREFECT_API_URL`` a flow runs on Prefect's ephemeral
local API; with it, on that server, where the run shows its task states, logs and artifacts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from meddiffuse.cli.app import console, fail

flow_app = typer.Typer(
    name="flow",
    help="Run the Prefect flows (study, generate, train, promote) on the ephemeral API or PREFECT_API_URL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

DomainOpt = Annotated[str, typer.Option("--domain", "-d", help="brain-mri | all | covid-ct")]


def _prefect_env() -> None:
    """Before prefect is imported: the library's logs go to the run's logs too; no telemetry offline."""
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "meddiffuse")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _parse_sets(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"--set takes FIELD=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def _run(flow_fn, **kwargs: Any) -> Any:
    """Run a flow; a Failed or Crashed run ends the command with its error and exit code 1."""
    state = flow_fn(**kwargs, return_state=True)
    if not state.is_completed():
        try:
            state.result()
        except BaseException as exc:  # noqa: BLE001 - the flow's error, shown as one line
            fail(f"flow {flow_fn.name} ended {state.name}: {exc}", code=1)
        fail(f"flow {flow_fn.name} ended {state.name}: {state.message}", code=1)
    return state.result()


@flow_app.command("study")
def study_cmd(
    domains: Annotated[list[str], typer.Option("--domain", "-d", help="Domain(s) of the study (repeatable).")],
    name: Annotated[str | None, typer.Option(help="Experiment name (several domains: <name>-<domain>).")] = None,
    data: Annotated[Path | None, typer.Option(help="Raw ImageFolder (one domain); omitted = phantoms.")] = None,
    archs: Annotated[list[str] | None, typer.Option("--archs", help="timm architectures (repeatable).")] = None,
    train_data: Annotated[list[str] | None, typer.Option("--train-data", help="real | synthetic | mixed.")] = None,
    generator_preset: Annotated[str | None, typer.Option(help="tiny | cpu-small | cpu-study | gpu-base")] = None,
    generator_steps: Annotated[int | None, typer.Option(help="Generator step budget of every domain "
                                                             "(default: the recipe's budget per domain, as in "
                                                             "`meddiffuse experiment --help`).")] = None,
    resolution: Annotated[int | None, typer.Option(help="Dataset/generator resolution.")] = None,
    phantoms_per_class: Annotated[int | None, typer.Option(help="Phantoms per class when --data is omitted.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Classifier epochs.")] = None,
    weights: Annotated[str | None, typer.Option(help="auto | none | a local weights file.")] = None,
    config_file: Annotated[Path | None, typer.Option("--config", help="ExperimentConfig as JSON.")] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", help="Any ExperimentConfig FIELD=VALUE (JSON values).")]
    = None,
) -> None:
    """The whole study per domain as a flow: ingest → generator → shards → classifiers → audit → LIME → report
    → promote; classifiers fan out concurrently, every model is registered."""
    _prefect_env()
    from pydantic import ValidationError

    from flows.study import study
    from meddiffuse.config import ExperimentConfig, Settings, given_overrides

    base = Settings().experiment.model_dump()
    given: dict = {}
    if config_file is not None:
        try:
            given |= json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            fail(f"--config {config_file}: {exc}")
    flags = {"name": name, "data": data, "archs": archs, "train_data": train_data,
             "generator_preset": generator_preset, "generator_steps": generator_steps, "resolution": resolution,
             "phantoms_per_class": phantoms_per_class, "epochs": epochs, "weights": weights}
    given |= {k: v for k, v in flags.items() if v is not None} | _parse_sets(sets)
    base |= given_overrides(given)
    try:
        config = ExperimentConfig.model_validate(base | {"domain": domains[0]})
    except ValidationError as exc:
        fail(f"invalid study config: {exc}")
    out = _run(study, domains=domains, config=config)
    from meddiffuse.cli.tables import results_table

    for domain, res in out.items():
        console.print(results_table(res["results"], title=f"{domain}: results on unseen real test images"))
        for d in res["promotion"]:
            console.print(f"promote {d['name']}/{d['challenger']}: {'promoted' if d['promoted'] else 'kept'} — "
                          f"{d['reason']}", highlight=False)
        console.print(f"report: [bold]{res['report']}[/] ({res['report_uri']})")


@flow_app.command("generate")
def generate_cmd(
    generator: Annotated[str, typer.Option(help="Registry ref (meddiffuse-generator-D@champion) or store prefix.")],
    per_class: Annotated[int, typer.Option("--per-class", help="Images per class.")],
    prefix: Annotated[str, typer.Option(help="Store prefix of the synthetic Dataset.")],
    classes: Annotated[list[str] | None, typer.Option("--class", help="Only these classes (repeatable).")] = None,
    sampler: Annotated[str | None, typer.Option(help="dpmsolver++-sde | dpmsolver++ | unipc | ddim | ddpm")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Sampling steps.")] = None,
    guidance: Annotated[float | None, typer.Option(help="Classifier-free guidance scale.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the run (each image has its own seed from it).")] = None,
    shard_size: Annotated[int | None, typer.Option(help="Images per shard (default MEDDIFFUSE_FLOWS__SHARD_SIZE).")]
    = None,
    batch_size: Annotated[int | None, typer.Option(help="Sampling batch size.")] = None,
) -> None:
    """Sample a synthetic Dataset as a flow, one task per shard (resumable: committed shards are skipped)."""
    _prefect_env()
    from pydantic import ValidationError

    from flows.generate import generate_dataset
    from meddiffuse.config import Settings, SynthesisSpec

    settings = Settings()
    fields = {"generator": generator, "per_class": per_class, "prefix": prefix, "classes": classes or None,
              "sampler": sampler, "sampling_steps": steps, "guidance": guidance, "seed": seed,
              "shard_size": shard_size or settings.flows.shard_size, "batch_size": batch_size}
    try:
        spec = SynthesisSpec(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        fail(f"invalid generation request: {exc}")
    result = _run(generate_dataset, spec=spec)
    console.print(f"{result.prefix}: {result.n} images ({result.per_class} per class), dataset {result.dataset_id}, "
                  f"generator {result.generator}", highlight=False)


@flow_app.command("train")
def train_cmd(
    domain: DomainOpt,
    train: Annotated[list[str], typer.Option("--train", help="Store prefix of a training Dataset (repeatable).")],
    test: Annotated[str, typer.Option("--test", help="Store prefix of the real Dataset whose test split scores.")],
    arch: Annotated[str, typer.Option(help="timm architecture.")] = "efficientnet_lite0",
    weights: Annotated[str | None, typer.Option(help="auto | none | a local weights file.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs.")] = None,
    input_size: Annotated[int | None, typer.Option(help="Classifier input size.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size.")] = None,
    bootstrap: Annotated[int | None, typer.Option(help="Bootstrap resamples for the intervals.")] = None,
    alias: Annotated[str | None, typer.Option(help="Alias to set on the new version (e.g. challenger).")] = None,
    promote: Annotated[bool, typer.Option("--promote", help="Then promote it to champion if it is better.")] = False,
    sets: Annotated[list[str] | None, typer.Option("--set", help="Any ClassifierSpec FIELD=VALUE.")] = None,
) -> None:
    """Train one classifier as a flow: evaluated on the real test split and registered (pinned version)."""
    _prefect_env()
    from pydantic import ValidationError

    from flows.train import train_classifier
    from meddiffuse.config import ClassifierSpec

    fields = {"domain": domain, "arch": arch, "train": train, "test": test, "weights": weights, "epochs": epochs,
              "input_size": input_size, "batch_size": batch_size, "bootstrap": bootstrap, "alias": alias}
    try:
        spec = ClassifierSpec(**({k: v for k, v in fields.items() if v is not None} | _parse_sets(sets)))
    except ValidationError as exc:
        fail(f"invalid classifier spec: {exc}")
    result = _run(train_classifier, spec=spec, promote=promote)
    console.print(f"{result.uri or result.prefix}: " + ", ".join(
        f"{k} {result.metrics[k]:.3f}" for k in ("accuracy", "balanced_accuracy", "macro_f1") if k in result.metrics),
        highlight=False)


@flow_app.command("promote")
def promote_cmd(
    challenger: Annotated[str, typer.Option(help="models:/name/N (or name/N) of the challenger.")],
    test_set: Annotated[str, typer.Option("--test-set", help="Store prefix of the real Dataset (test split).")],
    alias: Annotated[str, typer.Option(help="The alias to move.")] = "champion",
    metric: Annotated[str, typer.Option(help="Metric of the paired comparison.")] = "balanced_accuracy",
    min_delta: Annotated[float, typer.Option(help="Required improvement.")] = 0.0,
    bootstrap: Annotated[int, typer.Option(help="Paired bootstrap resamples.")] = 1000,
) -> None:
    """Move the alias to the challenger only if it beats the current holder on the same real test split."""
    _prefect_env()
    from flows.promote import promote

    decision = _run(promote, challenger=challenger, test_set=test_set, alias=alias, metric=metric,
                    min_delta=min_delta, bootstrap=bootstrap)
    console.print(f"{decision.name}/{decision.challenger}: {'promoted' if decision.promoted else 'kept'} — "
                  f"{decision.reason}", highlight=False)
