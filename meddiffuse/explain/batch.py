"""Explaining many images, and explaining with a ``meddiffuse.classify.Classifier``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from meddiffuse.explain.lime import Explanation, explain_image
from meddiffuse.explain.perturb import PredictFn
from meddiffuse.explain.segmentation import SegmentationConfig

if TYPE_CHECKING:  # typing only: the explainer works with any predict_fn, not just our classifiers
    from meddiffuse.classify.classifier import Classifier

ProgressArg = bool | Callable[[int], None]


@contextlib.contextmanager
def _progress(progress: ProgressArg, total: int) -> Iterator[Callable[[int], None]]:
    """A step callback: a rich bar on stderr (True), the caller's own callback, or nothing."""
    if callable(progress):
        yield progress
    elif progress:
        with Progress(
            TextColumn("[bold blue]LIME"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=Console(stderr=True), transient=True,
        ) as bar:
            task = bar.add_task("explain", total=total)
            yield lambda n: bar.advance(task, n)
    else:
        yield lambda n: None


def explain_batch(
    predict_fn: PredictFn,
    images: Sequence[np.ndarray] | np.ndarray,
    *,
    labels: Sequence[int | None] | None = None,
    num_samples: int = 1000,
    segmentation: SegmentationConfig | None = None,
    top_k: int = 5,
    batch_size: int | None = None,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    progress: ProgressArg = False,
) -> list[Explanation]:
    """:func:`explain_image` for each image, one batch-size measurement for all of them.

    With ``batch_size`` None the first image measures the fastest batch size and the rest reuse it.
    ``labels[i]`` None (or no ``labels``) explains image i's predicted class. ``class_names`` fills
    each explanation's ``class_name``. ``progress`` True shows a bar; a callable gets step counts.
    """
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    results: list[Explanation] = []
    with _progress(progress, len(images)) as step:
        for i, image in enumerate(images):
            exp = explain_image(
                predict_fn, image,
                label=None if labels is None else labels[i],
                num_samples=num_samples, segmentation=segmentation, top_k=top_k,
                batch_size=batch_size, seed=seed,
            )
            if class_names is not None:
                exp.class_name = class_names[exp.label]
            batch_size = exp.batch_size  # measured once, on the first image
            results.append(exp)
            step(1)
    return results


def classifier_predict_fn(clf: Classifier) -> PredictFn:
    """``clf.predict_proba`` on each batch as given: the explainer already chose the batch size.

    On a GPU a short last batch is padded up to the widest batch seen so far: every new batch shape
    costs a one-off kernel selection there (~1-2 s on an H200, against ~65 ms for a whole warm
    1000-sample explanation), and the deduplicated sample count leaves a different remainder per image.
    """
    clf.optimize_for_inference()  # ~3x on CPU; LIME is all forward passes
    predict = lambda images: clf.predict_proba(images, batch_size=max(1, len(images)))  # noqa: E731
    return pad_short_batches(predict) if clf.device.type == "cuda" else predict


def pad_short_batches(predict: PredictFn) -> PredictFn:
    """``predict`` with every batch shorter than the widest seen so far padded up to it (rows repeated)."""
    widest = 0

    def padded(images: np.ndarray) -> np.ndarray:
        nonlocal widest
        n = len(images)
        widest = max(widest, n)
        if n < widest:
            images = np.concatenate([images, np.repeat(images[-1:], widest - n, axis=0)])
        return predict(images)[:n]

    return padded


def explain_with_classifier(
    clf: Classifier,
    images: Sequence[np.ndarray] | np.ndarray,
    **kwargs,
) -> list[Explanation]:
    """:func:`explain_batch` with a ``Classifier``; explanations carry its class names.

    Keyword arguments are those of :func:`explain_batch` (``labels``, ``num_samples``, ``top_k``,...).
    """
    kwargs.setdefault("class_names", clf.classes)
    return explain_batch(classifier_predict_fn(clf), images, **kwargs)
