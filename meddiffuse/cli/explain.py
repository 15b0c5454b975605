"""`meddiffuse explain`: LIME overlays, weights and faithfulness scores for image files."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from meddiffuse.cli.app import app, console, fail
from meddiffuse.cli.progress import progress_bar
from meddiffuse.config import Settings


def read_image(path: Path, clf) -> np.ndarray:
    """The file as the classifier's training images were made (decoded, channels, centre crop, resolution),
    or a clear error naming the file."""
    from meddiffuse.data.ingest import ImageRejected
    from meddiffuse.tasks import decode_upload

    if not path.is_file():
        fail(f"image {path} does not exist (or is not a file)")
    try:
        return decode_upload(clf, path.read_bytes())
    except ImageRejected as exc:
        fail(f"cannot read {path} as an image: {exc}")
        raise  # unreachable: fail exits


@app.command("explain")
def explain_cmd(
    images: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, ...)")],
    model: Annotated[str, typer.Option("--model", "-m", help="Classifier: store prefix or models:/name@alias")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for overlays and JSON")] = Path("explanations"),
    samples: Annotated[int, typer.Option("--samples", min=10, help="LIME perturbation samples")] = 1000,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Superpixels shown and reported")] = 5,
    segments: Annotated[
        int | None, typer.Option("--segments", min=2, help="SLIC superpixels (default: from image size)")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Prediction batch (default: measured)")
    ] = None,
    faithfulness: Annotated[
        bool, typer.Option(help="Also score a deletion curve against random removal orders")
    ] = True,
    scale: Annotated[int, typer.Option(min=1, max=16, help="Overlay enlargement factor")] = 4,
    seed: Annotated[int, typer.Option(help="Sampling seed")] = 0,
) -> None:
    """Explain a classifier's predictions with LIME: <stem>.overlay.png and <stem>.lime.json per image."""
    from meddiffuse.classify import ClassifierNotFound, load_classifier  # local: torch/timm load slowly
    from meddiffuse.explain import (
        ImageInputError,
        SegmentationConfig,
        classifier_predict_fn,
        deletion_curve,
        explain_image,
        overlay_png,
    )
    from meddiffuse.store import StoreError, create_store

    settings = Settings()
    stems = [p.stem for p in images]
    if len(set(stems)) != len(stems):
        fail("two images share a file name stem; their outputs would overwrite each other")
    try:
        clf = load_classifier(model, create_store(settings), settings)
    except (ClassifierNotFound, StoreError) as exc:
        fail(f"cannot load classifier {model!r}: {exc}")
    arrays = [read_image(p, clf) for p in images]  # all read before any work starts
    out.mkdir(parents=True, exist_ok=True)
    predict_fn = classifier_predict_fn(clf)
    config = SegmentationConfig(n_segments=segments)

    table = Table(title=f"LIME: {clf.arch} ({model}), {samples} samples")
    for col in ("image", "class", "p", f"top-{top_k} superpixels", "R²", "faithfulness", "s"):
        table.add_column(col, justify="left" if col in ("image", "class") else "right")
    with progress_bar() as bar:
        task = bar.add_task("explain", total=len(images))
        for path, image in zip(images, arrays, strict=True):
            started = time.perf_counter()
            try:
                exp = explain_image(
                    predict_fn, image, num_samples=samples, segmentation=config, top_k=top_k,
                    batch_size=batch_size, seed=seed,
                )
            except ImageInputError as exc:
                fail(f"{path}: {exc}")
            exp.class_name = clf.classes[exp.label]
            batch_size = exp.batch_size  # measured on the first image, reused for the rest
            record = {"image": str(path), "model": model, **exp.to_dict()}
            faith = None
            if faithfulness:
                faith = deletion_curve(predict_fn, image, exp, batch_size=batch_size, seed=seed)
                record["deletion"] = faith.to_dict()
            seconds = time.perf_counter() - started
            record["seconds"] = seconds
            (out / f"{path.stem}.overlay.png").write_bytes(overlay_png(image, exp, top_k, scale=scale))
            (out / f"{path.stem}.lime.json").write_text(json.dumps(record, indent=1))
            table.add_row(
                path.name, exp.class_name, f"{exp.probability:.3f}",
                " ".join(map(str, exp.top_segments)) or "-", f"{exp.score:.2f}",
                f"{faith.faithfulness:+.3f}" if faith else "-", f"{seconds:.1f}",
            )
            bar.advance(task)
    console.print(table)
    console.print(f"wrote {len(images)} overlay(s) and JSON file(s) to {out} (batch size {batch_size})")
