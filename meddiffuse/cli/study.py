"""The study command: `meddiffuse experiment`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from meddiffuse.cli.app import app, console, fail
from meddiffuse.cli.tables import results_table
from meddiffuse.config import CPU_STUDY, DOMAIN_BUDGETS_TEXT, ExperimentConfig, Settings, given_overrides, recipe_values


@app.command("experiment")
def experiment_cmd(
    domain: Annotated[str, typer.Option("--domain", "-d", help="brain-mri | all | covid-ct")],
    data: Annotated[Path | None, typer.Option(help="Raw ImageFolder; omitted = phantoms")] = None,
    test_data: Annotated[
        Path | None, typer.Option(help="Separate real test folder (then --data is all train)")
    ] = None,
    archs: Annotated[list[str] | None, typer.Option("--archs", help="timm architectures (repeatable)")] = None,
    recipe: Annotated[str | None, typer.Option(help="Named recipe: cpu-study (the defaults) | gpu-study; "
                                                    "other options override it")] = None,
    preset: Annotated[str | None, typer.Option(help="Architecture preset, e.g. study8, cpu-pair")] = None,
    synthetic_per_class: Annotated[int | None, typer.Option(help="Synthetic images per class (recipe default "
                                                                "512)")] = None,
    synthetic_multiple: Annotated[float | None, typer.Option(help="Synthetic set = K x real train set, instead "
                                                                  "of a number per class")] = None,
    generator_preset: Annotated[str | None, typer.Option(help="tiny | cpu-small | cpu-study | gpu-base")] = None,
    generator_steps: Annotated[int | None, typer.Option(help="Generator step budget of every domain (default "
                                                             f"{CPU_STUDY['generator_steps']}; {DOMAIN_BUDGETS_TEXT}): "
                                                             "the same result on any machine that reaches it")] = None,
    generator_minutes: Annotated[float | None, typer.Option(help="Wall-clock cap on the generator (default 29; a "
                                                                 "slower or busy machine then trains fewer steps)")
                                 ] = None,
    resolution: Annotated[int | None, typer.Option(help="Dataset/generator resolution")] = None,
    epochs: Annotated[int | None, typer.Option(help="Classifier epochs")] = None,
    guidance: Annotated[float | None, typer.Option(help="Classifier-free guidance scale")] = None,
    filter_synthetic: Annotated[bool, typer.Option(help="Filter samples with a real-train classifier")] = False,
    weights: Annotated[str | None, typer.Option(help="auto | none | local weights file")] = None,
    name: Annotated[str | None, typer.Option(help="Experiment name (default: domain)")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")] = False,
) -> None:
    """Run (or resume) the study: ingest → generator → synthetic set → classifiers → audit → LIME → report."""
    from meddiffuse.classify.architectures import resolve_architectures
    from meddiffuse.experiment import run_experiment

    settings = Settings()
    overrides = {
        k: v for k, v in {
            "domain": domain, "data": data, "test_data": test_data, "synthetic_per_class": synthetic_per_class,
            "synthetic_multiple": synthetic_multiple,
            "generator_preset": generator_preset, "generator_minutes": generator_minutes,
            "generator_steps": generator_steps, "resolution": resolution, "epochs": epochs, "guidance": guidance,
            "weights": weights, "name": name, "seed": seed,
        }.items() if v is not None
    }
    if filter_synthetic:
        overrides["filter_synthetic"] = True
    overrides = given_overrides(overrides)  # before the recipe: the user's flags win over it
    try:
        if recipe:
            overrides = recipe_values(recipe) | overrides
        if preset:
            overrides["archs"] = resolve_architectures(preset)
        if archs:
            overrides["archs"] = archs
        config = settings.experiment.model_copy(update=overrides)
        config = ExperimentConfig.model_validate(config.model_dump())
        out = run_experiment(config, settings, progress=not no_progress,
                             log=lambda m: console.print(m, highlight=False, markup=False))
    except (FileNotFoundError, ValueError, KeyError) as exc:
        fail(str(exc))
    console.print(results_table(out["results"], title=f"{config.domain}: results on unseen real test images"))
    console.print(f"report: [bold]{out['report']}[/]")
