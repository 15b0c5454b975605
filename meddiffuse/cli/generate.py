"""Generator commands: train-generator, generate, sample-grid."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from meddiffuse.cli.app import app, console, fail
from meddiffuse.config import CPU_STUDY, DEFAULT_SEED, Settings
from meddiffuse.data.dataset import DatasetNotFound, open_dataset
from meddiffuse.domains import Domain, UnknownClassError, UnknownDomainError, get_domain
from meddiffuse.store import StoreError, create_store

DomainOpt = Annotated[str, typer.Option("--domain", "-d", help="brain-mri | all | covid-ct")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")]


def _domain(name: str) -> Domain:
    try:
        return get_domain(name)
    except UnknownDomainError as exc:
        fail(str(exc))
        raise


def _errors() -> tuple[type[BaseException], ...]:
    """Errors a user can fix from the message alone (everything else keeps its traceback)."""
    from meddiffuse.generate import GeneratorNotFound, InvalidGeneratorRequest

    return (InvalidGeneratorRequest, GeneratorNotFound, DatasetNotFound, UnknownClassError, StoreError)


@app.command("train-generator")
def train_generator_cmd(
    domain: DomainOpt,
    dataset: Annotated[str, typer.Option("--dataset", help="Store prefix of a real Dataset (its train split).")],
    preset: Annotated[str, typer.Option(help="tiny | cpu-small | cpu-study | gpu-base")] = "cpu-study",
    resolution: Annotated[int | None, typer.Option(help="Generator resolution (default: the preset's).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Stop after this many steps in total.")] = None,
    minutes: Annotated[float | None, typer.Option("--minutes", help="Stop after this wall-clock time.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run of this name.")] = False,
    name: Annotated[str | None, typer.Option(help="Run name; saved under generators/<name>.")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Commit a checkpoint every K steps.")] = 200,
    batch_size: Annotated[int | None, typer.Option(help="Images per step (default: the preset's).")] = None,
    prediction: Annotated[str, typer.Option(help="v_prediction | epsilon")] = "v_prediction",
    seed: Annotated[int | None, typer.Option(help="Seed (default: settings).")] = None,
    no_progress: NoProgress = False,
) -> None:
    """Train a class-conditional diffusion generator on a real dataset (resumable, tracked in MLflow)."""
    from meddiffuse.generate import create_generator_config, train_generator

    settings = Settings()
    dom = _domain(domain)
    store = create_store(settings)
    name = name or f"{dom.name}-{preset}"
    prefix = f"generators/{name}"
    overrides: dict[str, object] = {"prediction_type": prediction}
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    try:
        real = open_dataset(store, dataset)
        config = create_generator_config(preset, dom, resolution, **overrides)
        info = train_generator(
            real, config, store, prefix, max_steps=steps, max_minutes=minutes, resume=resume,
            checkpoint_every=checkpoint_every, seed=DEFAULT_SEED if seed is None else seed,
            settings=settings, progress=not no_progress, overwrite=overwrite,
        )
    except _errors() as exc:
        fail(str(exc))
        return
    table = Table(title=f"generator {info.ref}", show_header=False)
    for key, value in [
        ("domain", info.domain), ("preset", info.preset), ("resolution", f"{info.resolution} px"),
        ("parameters", f"{info.parameters:,}"), ("steps trained", info.steps_trained),
        ("resumed from", info.resumed_from_step), ("stopped by", info.stopped_by),
        ("final loss", f"{info.final_loss:.4f}" if info.final_loss is not None else "-"),
        ("images/s", f"{info.images_per_second:.1f}" if info.images_per_second else "-"),
        ("dataset", info.dataset_id), ("MLflow run", info.run_id),
    ]:
        table.add_row(key, str(value))
    console.print(table)
    console.print(f"generate with: meddiffuse generate --domain {info.domain} --generator {info.ref} "
                  "--per-class N")


@app.command("generate")
def generate_cmd(
    domain: DomainOpt,
    generator: Annotated[str, typer.Option("--generator", "-g",
                                           help="Store prefix (generators/NAME), folder, or models:/ URI.")],
    per_class: Annotated[int, typer.Option("--per-class", "-n", help="Images per class.")],
    sampler: Annotated[str, typer.Option(help="dpmsolver++-sde | dpmsolver++ | unipc | ddim | ddpm")] = CPU_STUDY[
        "sampler"],
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 20,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance w (0 = conditional only).")] = CPU_STUDY[
        "guidance"],
    seed: Annotated[int | None, typer.Option(help="Seed of the run (default: settings).")] = None,
    out: Annotated[str | None, typer.Option("--out", help="Dataset prefix (default datasets/synthetic/...).")] = None,
    classes: Annotated[list[str] | None, typer.Option("--class", help="Only this class (repeatable).")] = None,
    resolution: Annotated[int | None, typer.Option(help="Refuse a generator of another resolution.")] = None,
    shard_size: Annotated[int, typer.Option(help="Images per resumable shard.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Images per sampling batch.")] = 64,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-synthetic dataset at --out.")] = False,
    no_progress: NoProgress = False,
) -> None:
    """Write a labelled synthetic Dataset; re-running a killed run finishes it without duplicates."""
    from meddiffuse.generate import generate_dataset, load_generator

    settings = Settings()
    dom = _domain(domain)
    store = create_store(settings)
    seed = DEFAULT_SEED if seed is None else seed
    try:
        gen = load_generator(generator, store, settings)
        gen.check_compatible(dom, resolution)
        prefix = out or f"datasets/synthetic/{dom.name}-{generator.rstrip('/').rsplit('/', 1)[-1]}-s{seed}"
        ds = generate_dataset(
            gen, store, prefix, per_class, sampler=sampler, steps=steps, guidance=guidance, seed=seed,
            shard_size=shard_size, generator_ref=generator, batch_size=batch_size, classes=classes,
            overwrite=overwrite, progress=not no_progress,
        )
    except _errors() as exc:
        fail(str(exc))
        return
    counts = ds.manifest.counts()["train"]
    table = Table(title=f"synthetic dataset {ds.id} at {ds.prefix}")
    table.add_column("class")
    table.add_column("images", justify="right")
    for cls, n in counts.items():
        table.add_row(cls, str(n))
    console.print(table)


@app.command("sample-grid")
def sample_grid_cmd(
    generator: Annotated[str, typer.Option("--generator", "-g", help="Store prefix, folder or models:/ URI.")],
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")],
    real: Annotated[str | None, typer.Option("--real", help="Real Dataset prefix to show beside.")] = None,
    per_class: Annotated[int, typer.Option("--per-class", "-n", help="Images per class and side.")] = 8,
    label: Annotated[str | None, typer.Option("--class", help="Only this class.")] = None,
    sampler: Annotated[str, typer.Option(help="dpmsolver++-sde | dpmsolver++ | unipc | ddim | ddpm")] = CPU_STUDY[
        "sampler"],
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 20,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance w.")] = CPU_STUDY["guidance"],
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Write a PNG grid of generated samples beside real examples, per class."""
    from meddiffuse.generate import load_generator, sample_grid_png

    settings = Settings()
    store = create_store(settings)
    try:
        gen = load_generator(generator, store, settings)
        real_ds = open_dataset(store, real) if real else None
        png = sample_grid_png(gen, label, per_class, real_dataset=real_ds, seed=seed, sampler=sampler,
                              steps=steps, guidance=guidance)
    except _errors() as exc:
        fail(str(exc))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    console.print(f"wrote {out}")
