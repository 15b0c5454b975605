"""Data commands: phantom, ingest, datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from meddiffuse.cli.app import app, console, fail
from meddiffuse.cli.progress import progress_bar
from meddiffuse.config import Settings
from meddiffuse.data.dataset import DatasetNotFound, Manifest, list_datasets, open_dataset
from meddiffuse.data.ingest import IngestReport, default_prefix, ingest_folder
from meddiffuse.data.phantoms import write_phantom_folder
from meddiffuse.domains import Domain, UnknownDomainError, domain_from_folder, get_domain
from meddiffuse.store import create_store

DomainOpt = Annotated[str, typer.Option("--domain", "-d", help="brain-mri | all | covid-ct | custom")]


def resolve_domain(name: str, data: Path | None = None, channels: int = 3) -> Domain:
    try:
        return get_domain(name)
    except UnknownDomainError as exc:
        if name == "custom" and data is not None:
            return domain_from_folder(data, channels=channels)
        fail(str(exc))
        raise  # unreachable; keeps type checkers honest


def counts_table(manifest: Manifest, title: str) -> Table:
    table = Table(title=title)
    table.add_column("class")
    counts = manifest.counts()
    for split in counts:
        table.add_column(split, justify="right")
    table.add_column("total", justify="right")
    for cls in manifest.classes:
        row = [counts[s][cls] for s in counts]
        table.add_row(cls, *map(str, row), str(sum(row)))
    totals = [sum(counts[s].values()) for s in counts]
    table.add_row("[bold]all", *map(str, totals), str(sum(totals)))
    return table


def print_ingest_report(report: IngestReport, manifest: Manifest) -> None:
    console.print(counts_table(manifest, f"{report.domain}: dataset {report.dataset_id} "
                                         f"at {report.dataset_prefix}"))
    if report.skipped:
        t = Table(title=f"skipped {len(report.skipped)} file(s)")
        t.add_column("file")
        t.add_column("reason")
        for s in report.skipped[:50]:
            t.add_row(s.path, s.reason)
        console.print(t)
    if report.duplicates:
        console.print(f"[yellow]removed {len(report.duplicates)} duplicate(s)[/], e.g. "
                      + ", ".join(f"{d.path} = {d.duplicate_of}" for d in report.duplicates[:3]))
    if report.notes:
        console.print(f"{len(report.notes)} file(s) accepted with a remark "
                      "(lying extension, mode conversion)")


@app.command("ingest")
def ingest_cmd(
    domain: DomainOpt,
    data: Annotated[Path, typer.Option("--data", help="ImageFolder: <class>/<files>")],
    name: Annotated[str | None, typer.Option(help="Dataset name (default <domain>-real-<res>px)")] = None,
    resolution: Annotated[int | None, typer.Option(help="Square size in pixels")] = None,
    train_fraction: Annotated[float | None, typer.Option(help="Share of each class in train (0.2)")] = None,
    seed: Annotated[int | None, typer.Option(help="Split seed")] = None,
    channels: Annotated[int, typer.Option(help="Channels of a custom domain (1 or 3)")] = 3,
) -> None:
    """Validate, deduplicate, convert and split an image folder into a real Dataset."""
    settings = Settings()
    dom = resolve_domain(domain, data, channels)
    cfg = settings.ingest
    res = resolution or cfg.resolution
    prefix = default_prefix(dom, res, name)
    store = create_store(settings)
    with progress_bar() as bar:
        task = bar.add_task(f"ingest {dom.name}", total=None)

        def tick(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            dataset, report = ingest_folder(
                data, dom, store, prefix, resolution=res,
                train_fraction=train_fraction if train_fraction is not None else cfg.train_fraction,
                seed=seed if seed is not None else cfg.seed, max_pixels=cfg.max_pixels, progress=tick,
            )
        except (FileNotFoundError, ValueError) as exc:
            fail(str(exc))
    print_ingest_report(report, dataset.manifest)
    console.print(f"report: {store.uri}/{prefix}/ingest-report.json")


@app.command("phantom")
def phantom_cmd(
    domain: DomainOpt,
    n: Annotated[int, typer.Option("--n", help="Images per class")] = 50,
    out: Annotated[
        Path | None, typer.Option(help="Output ImageFolder (default <home>/phantoms/<domain>)")
    ] = None,
    size: Annotated[int, typer.Option(help="Side in pixels")] = 64,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Write a procedural phantom ImageFolder (with lesion masks) for offline demos and tests."""
    settings = Settings()
    dom = resolve_domain(domain)
    if n <= 0:
        fail("--n must be positive")
    target = out or settings.home / "phantoms" / dom.name
    with progress_bar() as bar:
        task = bar.add_task(f"phantom {dom.name}", total=n * dom.num_classes)
        write_phantom_folder(dom, target, n, size=size, seed=seed, progress=lambda k: bar.advance(task, k))
    console.print(f"wrote {n * dom.num_classes} images ({n} per class) + masks to {target}")


datasets_app = typer.Typer(help="List and inspect datasets in the store.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")


@datasets_app.command("list")
def datasets_list() -> None:
    """List committed datasets (those with a manifest)."""
    store = create_store(Settings())
    table = Table(title=f"datasets in {store.uri}")
    for col in ("prefix", "id", "domain", "res", "train", "test"):
        table.add_column(col)
    for prefix in list_datasets(store):
        m = open_dataset(store, prefix).manifest
        c = m.counts()
        table.add_row(prefix, m.dataset_id, m.domain, str(m.resolution),
                      str(sum(c.get("train", {}).values())), str(sum(c.get("test", {}).values())))
    console.print(table)


@datasets_app.command("show")
def datasets_show(
    prefix: Annotated[str, typer.Argument(help="Dataset prefix, e.g. datasets/brain-mri-real-64px")],
) -> None:
    """Per-class counts per split of one dataset."""
    store = create_store(Settings())
    try:
        ds = open_dataset(store, prefix)
    except DatasetNotFound as exc:
        fail(str(exc))
    console.print(counts_table(ds.manifest, f"{prefix} ({ds.id})"))


__all__ = ["ingest_cmd", "phantom_cmd", "resolve_domain"]
