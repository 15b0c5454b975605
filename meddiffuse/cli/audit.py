"""`meddiffuse audit`: fidelity, diversity and memorization of a synthetic dataset against the real one."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from meddiffuse.cli.app import app, console, fail
from meddiffuse.config import DEFAULT_SEED, Settings
from meddiffuse.data.dataset import DatasetNotFound, open_dataset
from meddiffuse.store import create_store

if TYPE_CHECKING:
    from meddiffuse.quality.result import AuditResult


def _f(value: float | None, fmt: str = "{:.2f}") -> str:
    return "–" if value is None else fmt.format(value)


def fidelity_table(result: AuditResult) -> Table:
    table = Table(title=f"fidelity of {result.synthetic.prefix} vs {result.real.prefix} (train)")
    for col in ("class", "space", "FD", "KID", "prec", "rec", "dens", "cov", "C2ST"):
        table.add_column(col, justify="left" if col in ("class", "space") else "right")
    for section in (result.overall, *result.per_class.values()):
        for i, (space, s) in enumerate(section.fidelity.items()):
            table.add_row(section.label if i == 0 else "", space, _f(s.frechet_distance, "{:.3g}"),
                          _f(s.kid, "{:.2g}"), _f(s.precision), _f(s.recall), _f(s.density), _f(s.coverage),
                          _f(s.c2st_accuracy))
    return table


def privacy_table(result: AuditResult) -> Table:
    table = Table(title="diversity (MS-SSIM, lower = more diverse) and likely copies")
    for col in ("class", "MS-SSIM synthetic", "MS-SSIM real", "flagged", "share"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for section in (result.overall, *result.per_class.values()):
        m = section.memorization
        table.add_row(section.label, _f(section.diversity.synthetic_ms_ssim),
                      _f(section.diversity.real_ms_ssim), f"{m.n_flagged}/{m.n_synthetic}",
                      f"{m.flagged_share:.1%}")
    return table


@app.command("audit")
def audit_cmd(
    synthetic: Annotated[str, typer.Option("--synthetic", help="Store prefix of the synthetic dataset")],
    real: Annotated[str, typer.Option("--real", help="Store prefix of the real dataset (train + test)")],
    features: Annotated[
        list[str] | None,
        typer.Option("--features", "-f", help="Feature space: imagenet, domain, thumbnails (repeatable; "
                                              "default imagenet + domain)"),
    ] = None,
    classifier: Annotated[
        str | None,
        typer.Option(help="Classifier trained on the real train split for domain features "
                          "(models:/... or store reference); default: train one now"),
    ] = None,
    domain_epochs: Annotated[int, typer.Option(help="Epochs when training the domain classifier")] = 5,
    weights: Annotated[
        Path | None, typer.Option(help="Local weights file: adds a 'local' feature space (with --arch)")
    ] = None,
    arch: Annotated[str, typer.Option(help="timm architecture of --weights")] = "efficientnet_lite0",
    gate: Annotated[
        float, typer.Option(help="Largest share of likely copies a passing dataset may have")
    ] = 0.01,
    percentile: Annotated[
        float, typer.Option(help="Copies are closer than this percentile of real test-to-train distances")
    ] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed (default: settings)")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit with code 1 when the audit fails")] = False,
    track: Annotated[bool, typer.Option("--track/--no-track", help="Log to MLflow, tag the generator")] = True,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars")] = True,
) -> None:
    """Audit a synthetic dataset: fidelity, diversity and copies of real training images."""
    from mlflow.exceptions import MlflowException  # local: keeps every other command's start-up fast

    from meddiffuse.quality.audit import run_audit
    from meddiffuse.quality.features import DOMAIN, IMAGENET, build_extractors
    from meddiffuse.quality.persist import save_audit
    from meddiffuse.quality.tracking import record_audit

    settings = Settings()
    store = create_store(settings)
    seed = DEFAULT_SEED if seed is None else seed
    try:
        syn_ds, real_ds = open_dataset(store, synthetic), open_dataset(store, real)
        extractors = build_extractors(
            features or [IMAGENET, DOMAIN], real_ds, classifier=classifier, epochs=domain_epochs,
            weights=weights, arch=arch, seed=seed, progress=progress, settings=settings,
        )
        result = run_audit(syn_ds, real_ds, extractors=extractors, gate_flagged_share=gate, seed=seed,
                           progress=progress, percentile=percentile)
    except (DatasetNotFound, FileNotFoundError, ValueError, ImportError) as exc:
        fail(str(exc))
        raise  # unreachable: fail exits
    try:
        key = record_audit(result, store, settings) if track else save_audit(result, store)
    except MlflowException as exc:
        console.print(f"[bold]{result.verdict()}[/]")
        fail(f"the audit was saved to {store.uri}/{result.artifacts.get('audit_json')} but logging it to "
             f"MLflow failed: {exc}")
    console.print(fidelity_table(result))
    console.print(privacy_table(result))
    colour = "green" if result.passed else "red"
    console.print(f"[bold {colour}]{result.verdict()}[/]")
    for uri, outcome in result.tracking.get("generator_tags", {}).items():
        console.print(f"generator {uri}: {outcome}")
    console.print(f"audit: {store.uri}/{key}")
    if "closest_pairs_png" in result.artifacts:
        console.print(f"closest pairs: {store.uri}/{result.artifacts['closest_pairs_png']}")
    if strict and not result.passed:
        raise typer.Exit(1)


__all__ = ["audit_cmd", "fidelity_table", "privacy_table"]
