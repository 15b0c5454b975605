"""Registry commands: ``meddiffuse models list | promote | load``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from meddiffuse.cli.app import app, console, fail
from meddiffuse.config import Settings
from meddiffuse.registry import (
    CHAMPION,
    UNSET,
    AliasMoved,
    ModelNotFound,
    RegistryError,
    VersionSummary,
    describe_version,
    list_model_names,
    list_versions,
    promote,
)

models_app = typer.Typer(
    help="Registered models (MLflow): list versions, move the champion/challenger aliases, load a version.",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")

_SHOWN_TAGS = ("architecture", "train_data", "pretrained")


def _versions_table(name: str, versions: list[VersionSummary]) -> Table:
    table = Table(title=name)
    for column in ("version", "aliases", *_SHOWN_TAGS, "metrics", "created"):
        table.add_column(column, justify="right" if column == "version" else "left")
    for v in versions:
        metrics = "  ".join(f"{k}={val:.4g}" for k, val in sorted(v.metrics.items()))
        created = v.created_at.strftime("%Y-%m-%d %H:%M") if v.created_at else ""
        aliases = ", ".join(f"[bold green]{a}[/]" if a == CHAMPION else a for a in v.aliases)
        table.add_row(str(v.version), aliases, *(v.tags.get(t, "") for t in _SHOWN_TAGS), metrics, created)
    return table


@models_app.command("list")
def list_command(
    name: Annotated[
        str | None, typer.Option("--name", "-n", help="One registered model, e.g. meddiffuse-classifier-brain-mri.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """List registered meddiffuse models and their versions, aliases, tags and metrics."""
    settings = Settings()
    try:
        names = [name] if name else list_model_names(settings=settings)
        listing = {n: list_versions(n, settings=settings) for n in names}
    except (RegistryError, ValueError) as exc:
        fail(str(exc))
    if as_json:
        console.print_json(json.dumps({n: [_version_json(v) for v in vs] for n, vs in listing.items()}))
        return
    if not listing:
        console.print(f"no registered meddiffuse models in {settings.resolved_tracking_uri}")
        return
    for n, versions in listing.items():
        console.print(_versions_table(n, versions))


@models_app.command("promote")
def promote_command(
    name: Annotated[str, typer.Argument(help="Registered model, e.g. meddiffuse-classifier-brain-mri.")],
    version: Annotated[int, typer.Argument(help="The version to point the alias at.", min=1)],
    alias: Annotated[str, typer.Option("--alias", "-a", help="champion (served) or challenger.")] = CHAMPION,
    expect: Annotated[
        int | None, typer.Option("--expect", help="Refuse unless the alias is at this version now (compare-and-set).")
    ] = None,
) -> None:
    """Move an alias (default: champion, what the services serve) to a version.

    Same effect as moving the alias in the MLflow UI. The previous holder keeps its version and tags;
    promote it again to roll back.
    """
    try:
        result = promote(name, version, alias=alias, settings=Settings(),
                         expected_current=expect if expect is not None else UNSET)
    except (AliasMoved, RegistryError, ValueError) as exc:
        fail(str(exc))
    if result.previous is None:
        console.print(f"{name}: [bold]{alias}[/] -> version {result.version}")
    elif result.previous == result.version:
        console.print(f"{name}: [bold]{alias}[/] already at version {result.version}")
    else:
        console.print(
            f"{name}: [bold]{alias}[/] -> version {result.version} (was {result.previous}; roll back with "
            f"`meddiffuse models promote {name} {result.previous} --alias {alias}`)"
        )


@models_app.command("load")
def load_command(
    ref: Annotated[
        str, typer.Argument(help="NAME@ALIAS, NAME/VERSION or models:/... (a bare NAME means NAME@champion).")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Copy the classifier's files here (must be new or empty).")
    ] = None,
) -> None:
    """Load a registered classifier (checking that it loads) and print its metadata; --out saves its files."""
    settings = Settings()
    try:
        summary = describe_version(ref, settings)
        from meddiffuse.classify import save_classifier  # local: torch only when a model is loaded
        from meddiffuse.classify.registry import load_registered_classifier
        from meddiffuse.store import LocalStore

        clf = load_registered_classifier(summary.uri, settings)
        if out is not None:
            if out.exists() and any(out.iterdir()):
                fail(f"{out} is not empty; choose a new folder for the model")
            save_classifier(clf, LocalStore(out.parent), out.name)
    except (RegistryError, ModelNotFound, ValueError) as exc:
        fail(str(exc))
    metadata = clf.metadata() | {"name": summary.name, "version": summary.version, "uri": summary.uri,
                                 "aliases": summary.aliases, "tags": summary.tags}
    console.print_json(json.dumps(metadata, sort_keys=True))
    if out is not None:
        console.print(f"saved {summary.uri} to {out} (load with meddiffuse.classify.load_classifier)")


def _version_json(v: VersionSummary) -> dict[str, object]:
    return {
        "version": v.version,
        "aliases": v.aliases,
        "tags": v.tags,
        "metrics": v.metrics,
        "run_id": v.run_id,
        "status": v.status,
        "created_at": v.created_at.isoformat() if v.created_at else None,
        "uri": v.uri,
    }
